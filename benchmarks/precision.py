"""float32 vs float64 engine on the same realisations (issue 9 item 5): may the paper preset run in float32?

    python benchmarks/precision.py OUT [--nside 8] [--realisations 48] [--chunk-size 8]
        [--t-omega 1 1000 25] [--ell-max 16] [--fit-ell-max 9]

Runs the seed's physics (the ``quick`` preset's field, rL = 0.1 Lc, dt = rL/20) twice with
``crjax.runs.simulate`` into ``OUT/float64`` and ``OUT/float32`` (resumable: a rerun reuses what is
on disk), same seed, so realisation r has the same field and the same directions in both. Only the
engine's precision differs; the estimators run on the stored fp64 summaries.

Compared at every save time listed in the table, per realisation, then over realisations:

- K_∥, K_⊥ (``crjax.transport.diffusion_tensor_from_moments`` per realisation);
- the unbiased estimate Ĉ_ℓ (``crjax.estimators.spectrum_estimate`` samples stored by the run) for
  g ∥ B0 and g ⊥ B0, 1 ≤ ℓ ≤ ``--fit-ell-max``;
- the BGK exponent p of the full-covariance fit (``inference.covariance_fit.fit_p_covariance``)
  at the last save time.

Two measures of the difference d_r = X_r(fp32) − X_r(fp64):

- ``d/σ``: mean(d) over the statistical error σ of one ensemble mean (the fp64 one): the size of the
  difference on the scale of the errors. It is a scale, not a test: once chaos has decorrelated
  the pairs, d is a difference of two nearly independent ensembles, with scatter ≥ √2 σ (more for
  heavy-tailed Ĉ_ℓ^(r)).
- paired ``z`` = mean(d)/(std(d)/√R), a sharper test for a systematic shift once chaos has
  decorrelated the two trajectories of a realisation (λ_L T ≈ 20 at tΩ = 100; the paired error then
  approaches √2 σ). At early times the pairs agree to round-off (relative 1e-7): z can then be large
  while |d/σ| ~ 1e-5 — a deterministic rounding difference, not a statistical one. z is therefore
  counted only from tΩ ≥ 30, where it is meaningful.

Prints one table per quantity and one JSON line (z values, relative differences, wall times).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from crjax import transport
from crjax.presets import quick
from crjax.runs import simulate


def _paired(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean of b − a over axis 0, its standard error, and z = mean/se (se = 0 → z = 0)."""
    d = b - a
    m = d.mean(0)
    se = d.std(0, ddof=1) / math.sqrt(d.shape[0])
    z = np.where(se > 0, m / np.where(se > 0, se, 1.0), 0.0)
    return m, se, z


def _k_par_perp(rr: np.ndarray, times: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    K_r = np.asarray(jax.vmap(lambda m: transport.diffusion_tensor_from_moments(m[None], times)[0])(
        jnp.asarray(rr)))
    kp, kq = transport.parallel_perpendicular(K_r, np.array([0.0, 0.0, 1.0]))
    return np.asarray(kp), np.asarray(kq)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--nside", type=int, default=8)
    ap.add_argument("--realisations", type=int, default=48)
    ap.add_argument("--chunk-size", type=int, default=8)
    ap.add_argument("--t-omega", type=float, nargs=3, default=(1.0, 1000.0, 25),
                    metavar=("MIN", "MAX", "N"))
    ap.add_argument("--ell-max", type=int, default=16)
    ap.add_argument("--fit-ell-max", type=int, default=9)
    ap.add_argument("--no-progress", dest="progress", action="store_false")
    args = ap.parse_args(argv)

    import crjax

    crjax.use_cpu_cores()
    lo, hi, n = args.t_omega
    t = tuple(float(v) for v in np.geomspace(lo, hi, int(n)))
    base = quick().replace(
        nside=args.nside, n_realisations=args.realisations, chunk_size=args.chunk_size,
        t_omega=t, fig3_t_omega=(t[-3], t[-2], t[-1]), ell_max=args.ell_max,
        fit_ell_max=args.fit_ell_max)
    chunks, wall = {}, {}
    for dtype in ("float64", "float32"):
        preset = base.replace(name=f"precision-{dtype}", dtype=dtype)
        t0 = time.perf_counter()
        _, chunks[dtype] = simulate(preset, args.out / dtype, progress=args.progress)
        wall[dtype] = time.perf_counter() - t0
    times = base.times
    t_omega = np.asarray(base.t_omega)
    R = args.realisations
    ells = np.arange(1, args.fit_ell_max + 1)
    # save times shown: every fourth one and the last
    shown = sorted(set(range(0, len(t), 4)) | {len(t) - 1})

    out: dict = {"nside": args.nside, "realisations": R, "t_omega": [t_omega[i] for i in shown],
                 "wall_s": wall}
    a64, a32 = chunks["float64"], chunks["float32"]
    kp64, kq64 = _k_par_perp(a64["rr"], times)
    kp32, kq32 = _k_par_perp(a32["rr"], times)
    dsig_all, zs_all = [], []
    print(f"float32 vs float64, nside {args.nside}, {R} realisations (paired, same fields and "
          f"directions); wall float64 {wall['float64']:.0f} s, float32 {wall['float32']:.0f} s")
    print("\nK (Lc c): tΩ, K64 ± σ, K32 − K64 ± paired se, d/σ, z")
    for name, x64, x32 in (("K_par", kp64, kp32), ("K_perp", kq64, kq32)):
        m, se, z = _paired(x64, x32)
        se64 = x64.std(0, ddof=1) / math.sqrt(R)
        out[name] = {"z": [float(z[i]) for i in shown],
                     "d_over_sigma": [float(m[i] / se64[i]) for i in shown],
                     "rel_diff": [float(m[i] / x64.mean(0)[i]) for i in shown]}
        for i in shown:
            print(f"  {name:6s} {t_omega[i]:8.1f}  {x64.mean(0)[i]:.4e} ± {se64[i]:.1e}   "
                  f"{m[i]:+.2e} ± {se[i]:.1e}   d/σ = {m[i] / se64[i]:+.2f}   z = {z[i]:+.2f}")
        dsig_all += [abs(float(m[i] / se64[i])) for i in shown]
        zs_all += [abs(float(z[i])) for i in shown if t_omega[i] >= 30]
    for side in ("par", "perp"):
        e64, e32 = a64[f"est_{side}"][..., ells], a32[f"est_{side}"][..., ells]  # (R, nt, L)
        m, se, z = _paired(e64, e32)
        se64 = e64.std(0, ddof=1) / math.sqrt(R)
        dsig = m / np.where(se64 > 0, se64, 1.0)
        out[f"chat_{side}"] = {"z": [[float(v) for v in z[i]] for i in shown],
                               "d_over_sigma": [[float(v) for v in dsig[i]] for i in shown]}
        zs_all += [abs(float(v)) for i in shown if t_omega[i] >= 30 for v in z[i]]
        dsig_all += [abs(float(v)) for i in shown for v in dsig[i]]
        print(f"\nĈ_ℓ, g {side} B0, fp32 − fp64, ℓ = {ells[0]}..{ells[-1]}: d/σ | paired z")
        for i in shown:
            print(f"  tΩ {t_omega[i]:8.1f}  " + " ".join(f"{v:+5.2f}" for v in dsig[i]) + "  | "
                  + " ".join(f"{v:+5.1f}" for v in z[i]))
        i = len(t) - 1
        print(f"  last time: Ĉ_ℓ(fp64) ± se   " + " ".join(
            f"{c:.2e}±{s:.0e}" for c, s in zip(e64.mean(0)[i], se64[i])))
        fits = {}
        for dtype, e in (("float64", e64), ("float32", e32)):
            from inference.covariance_fit import fit_p_covariance

            s = e[:, -1]
            try:
                f = fit_p_covariance(ells, s.mean(0), np.cov(s, rowvar=False) / R, R)
                fits[dtype] = {"p": f.p, "p_interval": list(f.p_interval), "chi2": f.chi2,
                               "dof": f.dof}
            except ValueError as err:
                fits[dtype] = {"skipped": str(err)}
        out[f"p_{side}"] = fits
        print(f"  p (full covariance, last time): " + "; ".join(
            f"{k} {v['p']:.3f} [{v['p_interval'][0]:.3f}, {v['p_interval'][1]:.3f}] χ² {v['chi2']:.1f}/{v['dof']}"
            if "p" in v else f"{k} {v['skipped']}" for k, v in fits.items()))
    zs, ds = np.asarray(zs_all), np.asarray(dsig_all)
    out["max_abs_d_over_sigma"] = float(ds.max())
    out["n_compared_z"] = int(zs.size)
    out["n_abs_z_gt_2"] = int((zs > 2).sum())
    out["n_abs_z_gt_3"] = int((zs > 3).sum())
    out["max_abs_z"] = float(zs.max())
    print(f"\nall {ds.size} entries: max |d/σ| = {ds.max():.2f}; paired z at tΩ ≥ 30 "
          f"({zs.size} entries): |z| > 2 in {out['n_abs_z_gt_2']}, > 3 in {out['n_abs_z_gt_3']} "
          f"(Gaussian expectation {0.0455 * zs.size:.1f} and {0.0027 * zs.size:.1f}); "
          f"max |z| = {zs.max():.2f}")
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
