"""Backtracking engine benchmark (issue 2): particle-steps/s of Boris (fp64, fp32) and adaptive RK.

Setup of the CRPropa comparison: N = 1024 particles, the seed's field with 256 modes (σ² = 1,
λ 0.01–100 Lc), rL = 0.1 Lc, tΩ = 200, Boris step rL/20 (4000 pushes). CRPropa 3 on this machine
kind: SIMD Boris 3.7e6 particle-steps/s with 2 threads (2.6e6 with 1), Cash–Karp 4.7e5. Targets:
Boris fp64 ≥ 3.7e6, fp32 ≥ 7.4e6, adaptive ≥ 4.7e5.

Timings are the minimum over repeats (the machine is shared); compile time is the first call minus
the steady-state run. A particle-step is one Boris push, or one adaptive step (accepted or
rejected, 6 field evaluations for Tsit5) of one particle. Baselines measured in the same run
(interleaved, tΩ = 20): the same Boris solver on one device (no particle split), and through
``jax.vmap`` of a per-particle ``diffeqsolve``. The engine runs with one JAX CPU device per core
(``crjax.use_cpu_cores``), its particles split over them.

    python benchmarks/engine.py            # full (a few minutes)
    python benchmarks/engine.py --quick    # tΩ = 20 smoke run

The last line is one JSON object with boris_f64_steps_per_s, boris_f32_steps_per_s,
adaptive_f64_steps_per_s, compile_s (Boris fp64).
"""

from __future__ import annotations

import argparse
import json
import os
import time

import diffrax
import jax
import jax.numpy as jnp
import numpy as np

import crjax

crjax.use_cpu_cores()  # one JAX CPU device per core: particles are split over them (both cores)

from crjax.backtrack import _cast, backtrack  # noqa: E402
from crjax.field import paper_2015_field, realise_field  # noqa: E402
from crjax.solvers import Boris, LorentzTerm  # noqa: E402

CRPROPA = {"boris_2threads": 3.7e6, "boris_1thread": 2.6e6, "cash_karp": 4.7e5}
TARGETS = {"boris_f64": 3.7e6, "boris_f32": 7.4e6, "adaptive_f64": 4.7e5}


def _timed(fn, repeats):
    """(first-call seconds, min steady seconds, result)."""
    t0 = time.perf_counter()
    out = jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    best = first if repeats == 0 else np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return first, best, out


def _directions(n, key):
    v = jax.random.normal(key, (n, 3))
    return v / jnp.linalg.norm(v, axis=-1, keepdims=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tΩ = 20 instead of 200 (smoke run)")
    ap.add_argument("--n", type=int, default=1024, help="particles (default 1024)")
    ap.add_argument("--modes", type=int, default=256, help="field modes (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (min is reported)")
    args = ap.parse_args(argv)

    rL = 0.1
    t_omega = 20.0 if args.quick else 200.0
    T = t_omega * rL
    times = np.linspace(T / 4, T, 4)  # a few save times, as in real runs
    dt = rL / 20
    n = args.n
    field = realise_field(jax.random.PRNGKey(0), paper_2015_field(n_modes=args.modes))
    dirs = _directions(n, jax.random.PRNGKey(1))
    print(
        f"crjax {crjax.__version__}, jax {jax.__version__}, devices {jax.devices()}, "
        f"cpu_count {os.cpu_count()}"
    )
    print(
        f"N = {n} particles, {args.modes} modes, rL = {rL}, tΩ = {t_omega:g}, dt = rL/20, "
        f"{len(times)} save times, repeats {args.repeats} (min)"
    )

    # --- field evaluation alone: ns per mode evaluation
    ns_per_mode = {}
    for name, dtype in (("f64", jnp.float64), ("f32", jnp.float32)):
        f = _cast(field, dtype)
        x = (0.3 * jax.random.normal(jax.random.PRNGKey(2), (n, 3))).astype(dtype)
        # 20 evaluations inside one jit (a loop, as in the integrator): no dispatch overhead
        ev = jax.jit(lambda f, x: jax.lax.fori_loop(0, 20, lambda i, y: y + 1e-6 * f(y), x))
        _, best, _ = _timed(lambda ev=ev, f=f, x=x: ev(f, x), args.repeats)
        ns_per_mode[name] = best / 20 / (n * args.modes) * 1e9
        print(
            f"field B(x) {name}: {best / 20 * 1e6:8.1f} us per call of {n} positions on one device = "
            f"{ns_per_mode[name]:.3f} ns per mode evaluation"
        )

    results, compile_s = {}, {}
    for name, kw in (
        ("boris_f64", {"solver": "boris"}),
        ("boris_f32", {"solver": "boris", "dtype": jnp.float32}),
        ("adaptive_f64", {"solver": "tsit5"}),  # rtol 1e-8, atol 1e-10 (the defaults)
    ):
        if name.startswith("boris"):

            def run(kw=kw):
                return backtrack(field, dirs, times, rL=rL, dt=dt, **kw)

            first, best, tr = _timed(run, args.repeats)
        else:
            # The adaptive run is long: compile on a 20x shorter horizon with the same shapes and
            # max_steps (times are traced values, so the compiled code is shared), then time it.
            max_steps = 64 * int(np.ceil(T / dt)) + 4096

            def run(kw=kw, scale=1.0, max_steps=max_steps):
                return backtrack(
                    field, dirs, times * scale, rL=rL, dt=dt, max_steps=max_steps, **kw
                )

            first_short, short, _ = _timed(lambda: run(scale=0.05), 1)
            first = first_short - short  # compile only
            _, best, tr = _timed(run, max(0, args.repeats - 3))  # default: one (compiled) run
            first += best
        steps = int(np.sum(np.asarray(tr.num_steps, dtype=np.int64)))
        results[name] = steps / best
        compile_s[name] = first - best
        per = steps / n
        print(
            f"{name:13s}: {best:8.3f} s for {per:8.0f} steps/particle -> "
            f"{results[name]:.3e} particle-steps/s (target {TARGETS[name]:.1e}, "
            f"ratio {results[name] / TARGETS[name]:.2f}); compile {compile_s[name]:.2f} s"
        )
        if name.startswith("boris"):
            print(
                f"{'':13s}  = {best / steps * 1e9 * jax.local_device_count() / args.modes:.3f} "
                f"ns per mode evaluation per device (field + push)"
            )
        else:
            print(
                f"{'':13s}  = {results[name] * 6:.3e} particle field evaluations/s "
                f"(Tsit5: 6 per step); {per / (T / dt):.1f} steps per rL/20 step"
            )

    # --- baseline: the same Boris solver, vmap over per-particle diffeqsolve (tΩ = 20)
    tb = 20.0 * rL
    grid = jnp.linspace(0.0, tb, round(tb / dt) + 1)
    coupling = jnp.asarray(-1.0 / rL)

    @jax.jit
    def vmapped(field, p):
        def one(pi):
            sol = diffrax.diffeqsolve(
                LorentzTerm(field, coupling),
                Boris(),
                0.0,
                tb,
                None,
                (jnp.zeros(3), -pi),
                saveat=diffrax.SaveAt(ts=jnp.asarray(times[:1] * tb / T)),
                stepsize_controller=diffrax.StepTo(ts=grid),
                max_steps=grid.size - 1,
            )
            return sol.ys[0]

        return jax.vmap(one)(p)

    # interleave the designs on the same horizon so that load changes hit them alike
    def batched(devices=None):
        return backtrack(field, dirs, np.array([tb]), rL=rL, dt=dt, devices=devices).positions

    designs = {
        "split": batched,  # default: particles split over all local devices
        "one_device": lambda: batched(devices=1),
        "vmap": lambda: vmapped(field, dirs),
    }
    best = dict.fromkeys(designs, np.inf)
    for fn in designs.values():
        jax.block_until_ready(fn())
    for _ in range(args.repeats):
        for name, fn in designs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t0)
    steps = n * (grid.size - 1)
    rate = {k: steps / v for k, v in best.items()}
    print(
        f"design check, Boris fp64, tΩ = 20 (baseline = one device, same run): batched state split "
        f"over {jax.local_device_count()} devices {rate['split']:.3e} (x{rate['split'] / rate['one_device']:.2f}), "
        f"one device {rate['one_device']:.3e} (x1), vmap of per-particle diffeqsolve on one device "
        f"{rate['vmap']:.3e} (x{rate['vmap'] / rate['one_device']:.2f}) particle-steps/s"
    )
    print(
        f"CRPropa 3 on this machine kind: Boris {CRPROPA['boris_2threads']:.1e} (2 threads), "
        f"Cash-Karp {CRPROPA['cash_karp']:.1e}; ratios crjax/CRPropa: Boris fp64 "
        f"{results['boris_f64'] / CRPROPA['boris_2threads']:.2f}, adaptive "
        f"{results['adaptive_f64'] / CRPROPA['cash_karp']:.2f}"
    )
    print(
        json.dumps(
            {
                "boris_f64_steps_per_s": results["boris_f64"],
                "boris_f32_steps_per_s": results["boris_f32"],
                "adaptive_f64_steps_per_s": results["adaptive_f64"],
                "compile_s": compile_s["boris_f64"],
            }
        )
    )


if __name__ == "__main__":
    main()
