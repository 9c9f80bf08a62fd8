"""Benchmark of B(x), the hot loop of crjax: ns per mode evaluation (one position × one mode).

    python benchmarks/field.py [--npos 1024] [--modes 256] [--repeats 7]

Compares, after jit, for fp64 and fp32:
  * the cosine: exact ``jnp.cos`` (baseline, same run) vs crjax's range-reduced polynomial of
    phase/π (the formulations below multiply the phase by 1/π per element; the shipped ``call``
    folds it into k and β);
  * the mode-sum formulation: matmul (phase = x @ Kᵀ + β, cos, @ A), the same with A padded
    to 4 columns (as shipped), vs broadcasting
    (phase from three broadcast FMAs, output as a broadcast reduction), vs mixed forms.
The CPU is shared, so each figure is the minimum over ``repeats`` timings of a loop of calls.
Ratios are relative to the exact-cos baseline of the *same* formulation and dtype in this run.
Then: blocked vs single-block evaluation at the seed's 12288 positions (fast cos). Pinning to one
core (``taskset -c 0 python benchmarks/field.py``) gives steadier single-core figures.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import crjax  # noqa: F401  (x64)
from crjax.field import _ONE_OVER_PI, TurbulentField, _fast_cospi, paper_2015_field, realise_field


def _fast_cos(phase):
    """crjax's polynomial cosine on a phase (the shipped __call__ folds the 1/π into k and β)."""
    return _fast_cospi(phase * jnp.asarray(_ONE_OVER_PI, phase.dtype))


def _matmul3(f: TurbulentField, x, cos):
    """Today's main before issue 12: the amplitude product with 3 output columns."""
    phase = x @ f.wavevectors.T + f.phases[None, :]
    return cos(phase) @ f.amplitudes + f.b0[None, :]


def _matmul4(f: TurbulentField, x, cos):
    """As shipped: amplitudes padded to (n, 4) (YNNPACK's dot is faster with 4 columns)."""
    a4 = jnp.concatenate([f.amplitudes, jnp.zeros_like(f.amplitudes[:, :1])], axis=1)
    phase = x @ f.wavevectors.T + f.phases[None, :]
    return (cos(phase) @ a4)[:, :3] + f.b0[None, :]


def _broadcast(f: TurbulentField, x, cos):
    k, a = f.wavevectors, f.amplitudes
    phase = (
        x[:, 0:1] * k[None, :, 0] + x[:, 1:2] * k[None, :, 1] + x[:, 2:3] * k[None, :, 2]
    ) + f.phases[None, :]
    c = cos(phase)
    out = jnp.stack([jnp.sum(c * a[None, :, i], axis=1) for i in range(3)], axis=-1)
    return out + f.b0[None, :]


def _matmul_in_broadcast_out(f: TurbulentField, x, cos):
    c = cos(x @ f.wavevectors.T + f.phases[None, :])
    a = f.amplitudes
    out = jnp.stack([jnp.sum(c * a[None, :, i], axis=1) for i in range(3)], axis=-1)
    return out + f.b0[None, :]


def _broadcast_in_matmul_out(f: TurbulentField, x, cos):
    k = f.wavevectors
    phase = (
        x[:, 0:1] * k[None, :, 0] + x[:, 1:2] * k[None, :, 1] + x[:, 2:3] * k[None, :, 2]
    ) + f.phases[None, :]
    return cos(phase) @ f.amplitudes + f.b0[None, :]


FORMULATIONS = {
    "call": None,  # TurbulentField.__call__ as shipped
    "matmul": _matmul3,
    "matmul_4col": _matmul4,
    "broadcast": _broadcast,
    "matmul_in_bcast_out": _matmul_in_broadcast_out,
    "bcast_in_matmul_out": _broadcast_in_matmul_out,
}


def _time(fn, args, repeats: int, inner: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / inner)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--npos", type=int, default=1024)
    ap.add_argument("--modes", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--inner", type=int, default=20)
    ap.add_argument("--only", nargs="*", default=None, help="formulations to run")
    args = ap.parse_args()

    print(f"jax {jax.__version__} on {jax.devices()[0].platform}: {args.npos} positions x "
          f"{args.modes} modes, min of {args.repeats} x {args.inner} calls")
    names = args.only or list(FORMULATIONS)
    results = {}
    for dtype in (jnp.float64, jnp.float32):
        dname = jnp.dtype(dtype).name
        key = jax.random.PRNGKey(0)
        x = jnp.asarray(np.random.default_rng(0).uniform(-50, 50, (args.npos, 3)), dtype)
        for name in names:
            form = FORMULATIONS[name]
            ns = {}
            for exact in (True, False):
                params = paper_2015_field(args.modes)
                field = realise_field(key, params, dtype=dtype, exact_cos=exact)
                cos = jnp.cos if exact else _fast_cos
                if form is None:
                    fn = jax.jit(lambda f, y: f(y))
                else:
                    fn = jax.jit(lambda f, y, form=form, cos=cos: form(f, y, cos))
                t = _time(fn, (field, x), args.repeats, args.inner)
                ns["exact" if exact else "fast"] = 1e9 * t / (args.npos * args.modes)
            ratio = ns["exact"] / ns["fast"]
            results[f"{name}_{dname}"] = ns
            print(f"{dname:8s} {name:22s} exact cos {ns['exact']:7.3f} ns/mode-eval   "
                  f"fast cos {ns['fast']:7.3f} ns/mode-eval   speed-up x{ratio:5.2f}")
    # Blocking (TurbulentField.block_size) at the seed's Npix = 12288: automatic vs one big block.
    big = {}
    for dtype in (jnp.float64, jnp.float32):
        dname = jnp.dtype(dtype).name
        f = realise_field(jax.random.PRNGKey(0), paper_2015_field(args.modes), dtype=dtype)
        xb = jnp.asarray(np.random.default_rng(1).uniform(-50, 50, (12288, 3)), dtype)
        fn = jax.jit(lambda g, y: g(y))
        for label, bs in (("unblocked", 10**9), ("blocked", None)):
            g = TurbulentField(f.b0, f.wavevectors, f.amplitudes, f.phases, block_size=bs)
            t = _time(fn, (g, xb), max(3, args.repeats // 2), max(2, args.inner // 4))
            big[f"{label}_{dname}"] = 1e9 * t / (12288 * args.modes)
        print(f"{dname:8s} 12288 positions: one block {big[f'unblocked_{dname}']:7.3f}, "
              f"blocked {big[f'blocked_{dname}']:7.3f} ns/mode-eval   speed-up "
              f"x{big[f'unblocked_{dname}'] / big[f'blocked_{dname}']:5.2f}")
    results["npix12288"] = big

    if "call" in names:
        for dname in ("float64", "float32"):
            ns = results[f"call_{dname}"]["fast"]
            ratio = results[f"call_{dname}"]["exact"] / ns
            print(f"shipped B(x) {dname}: {ns:.3f} ns/mode-eval -> at most "
                  f"{1e9 / (ns * args.modes):.3g} field evaluations (particle-steps)/s "
                  f"with {args.modes} modes (x{ratio:.1f} vs exact cos)")
    print(json.dumps({k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in results.items()}))


if __name__ == "__main__":
    main()
