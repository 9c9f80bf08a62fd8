"""Benchmark: C_ℓ of 120 HEALPix maps at nside 32 (ℓmax 95), crjax vs a healpy.anafast loop.

    python benchmarks/power_spectrum.py [--nmaps 120] [--nside 32] [--repeats 3] [--dense-nside 16]

Measured in the same run on the same machine: the batched, jitted crjax estimator (ring backend),
a loop of ``healpy.anafast(m, iter=0)`` (the baseline it must equal), forward + gradient of a
scalar of the spectra, and the compile time. The backend choice is re-measured at a smaller
resolution (``--dense-nside``) against the dense real-Y_ℓm matrix product, whose table at nside 32
would be 0.9 GB. Timings are the best of ``--repeats`` runs after compilation. The last line is
one JSON object with keys crjax_s, healpy_s, grad_s, compile_s (seconds).
"""

from __future__ import annotations

import argparse
import json
import time

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np

import crjax  # noqa: F401  (x64)
from crjax import power_spectrum


def _best(fn, repeats):
    out, best = None, float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - t0)
    return best, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nmaps", type=int, default=120)
    ap.add_argument("--nside", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dense-nside", type=int, default=16, help="0 skips the backend comparison")
    args = ap.parse_args()

    nside, lmax = args.nside, 3 * args.nside - 1
    npix = 12 * nside**2
    maps_np = np.random.default_rng(0).normal(size=(args.nmaps, npix))
    maps = jnp.asarray(maps_np)
    print(f"device: {jax.devices()[0]}; {args.nmaps} maps, nside {nside}, lmax {lmax}")

    # Host tables (cached per (nside, lmax)) are built once, outside the timings, like healpy's.
    power_spectrum(maps[:1], lmax=lmax)
    fwd = jax.jit(lambda m: power_spectrum(m, lmax=lmax))
    t0 = time.perf_counter()
    fwd_c = fwd.lower(maps).compile()
    compile_s = time.perf_counter() - t0
    crjax_s, cl = _best(lambda: fwd_c(maps), args.repeats)

    def healpy_loop():
        return np.array([hp.anafast(m, iter=0, lmax=lmax) for m in maps_np])

    healpy_s, ref = _best(healpy_loop, args.repeats)
    rel = float(np.max(np.abs(np.asarray(cl) - ref) / np.abs(ref)))

    w = jnp.asarray(1.0 / (2.0 * np.arange(lmax + 1) + 1.0))
    grad = jax.jit(jax.value_and_grad(lambda m: jnp.sum(power_spectrum(m, lmax=lmax) @ w)))
    t0 = time.perf_counter()
    grad_c = grad.lower(maps).compile()
    grad_compile_s = time.perf_counter() - t0
    grad_s, _ = _best(lambda: grad_c(maps), args.repeats)

    print(f"crjax ring (batched, jit): {crjax_s:.4f} s   compile {compile_s:.2f} s")
    print(f"healpy.anafast loop      : {healpy_s:.4f} s   speed-up x{healpy_s / crjax_s:.2f}")
    print(f"max relative difference  : {rel:.2e}")
    print(f"forward + gradient       : {grad_s:.4f} s   compile {grad_compile_s:.2f} s "
          f"(x{grad_s / crjax_s:.2f} forward)")

    if args.dense_nside:
        dn = args.dense_nside
        dl = 3 * dn - 1
        dmaps = jnp.asarray(np.random.default_rng(1).normal(size=(args.nmaps, 12 * dn**2)))
        for method in ("ring", "dense"):
            power_spectrum(dmaps[:1], lmax=dl, method=method)  # host tables
            f = jax.jit(lambda m, method=method: power_spectrum(m, lmax=dl, method=method))
            f = f.lower(dmaps).compile()
            s, _ = _best(lambda f=f: f(dmaps), args.repeats)
            print(f"backend {method:5s} at nside {dn} (lmax {dl}): {s:.4f} s")

    summary = {"crjax_s": crjax_s, "healpy_s": healpy_s, "grad_s": grad_s, "compile_s": compile_s}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
