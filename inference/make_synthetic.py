"""Synthetic spectra made by crjax itself (BGK shape + realistic scatter), and the shipped example file.

``python -m inference.make_synthetic`` regenerates ``inference/data/synthetic_bgk_p0.5_icecube_like.txt``.

Model of a measurement (what a real analysis of an isotropic signal with a sky mask would give):
true C_ℓ = C1 · bgk_spectrum(ℓ, p); the raw estimate C_ℓ + N scatters like a scaled χ² with
ν_ℓ = (2ℓ+1) f_sky degrees of freedom (cosmic variance of the observed modes plus white shot noise N);
the quoted errors are the exact 68% Neyman interval of the true C_ℓ + N given the observed value
(μ ∈ [x/q84, x/q16] with q the χ²_ν/ν quantiles), so they are asymmetric and derived from the data,
not from the truth. N is subtracted from the quoted C_ℓ (header: noise_subtracted: true).
"""

from __future__ import annotations

import argparse
import os

import numpy as np
from scipy import stats

from crjax.theory import bgk_spectrum
from inference.data import NOISE_LEVELS, Spectrum, save_spectrum

__all__ = ["EXAMPLE_PATH", "main", "synthetic_spectrum"]

EXAMPLE_PATH = os.path.join(
    os.path.dirname(__file__), "data", "synthetic_bgk_p0.5_icecube_like.txt"
)


def synthetic_spectrum(
    p: float,
    *,
    lmin: int = 1,
    lmax: int = 30,
    c1: float = 1.0e-6,
    f_sky: float = NOISE_LEVELS["IceCube"].f_sky,
    noise: float = NOISE_LEVELS["IceCube"].noise,
    seed: int = 0,
) -> Spectrum:
    """A noise-subtracted synthetic spectrum for ℓ = lmin..lmax with asymmetric 68% errors (module doc).

    ``p`` ∈ (0, 1) BGK exponent, ``c1`` > 0 the true C_1, ``f_sky`` ∈ (0, 1], ``noise`` ≥ 0 the shot-noise
    level N. Deterministic given ``seed``. Defaults: the IceCube-like numbers of the seed's Fig. 1.
    """
    if not (isinstance(lmin, int) and isinstance(lmax, int) and 1 <= lmin <= lmax):
        raise ValueError(
            f"lmin and lmax must be integers with 1 <= lmin <= lmax; got {lmin}, {lmax}"
        )
    if not (0 < f_sky <= 1):
        raise ValueError(f"f_sky must lie in (0, 1]; got {f_sky}")
    if not (c1 > 0) or not (noise >= 0):
        raise ValueError(f"c1 must be > 0 and noise >= 0; got c1={c1}, noise={noise}")
    ell = np.arange(lmin, lmax + 1)
    truth = c1 * np.asarray(bgk_spectrum(ell, p))
    dof = (2 * ell + 1) * f_sky
    rng = np.random.default_rng(seed)
    raw = (truth + noise) * rng.chisquare(dof) / dof
    q16, q84 = stats.chi2.ppf([[0.15865525393145707], [0.8413447460685429]], dof) / dof
    err_lo = raw - raw / q84
    err_hi = raw / q16 - raw
    return Spectrum(
        ell=ell,
        cl=raw - noise,
        err_lo=err_lo,
        err_hi=err_hi,
        experiment="synthetic (IceCube-like noise and sky fraction)",
        f_sky=float(f_sky),
        noise_level=float(noise),
        noise_subtracted=True,
        synthetic=True,
        provenance=(
            f"crjax inference.make_synthetic: C1*bgk_spectrum(ell, p={p}) with C1={c1}, scaled-chi2 scatter "
            f"with (2l+1)*f_sky dof around C_l+N, N={noise} subtracted, exact 68% Neyman errors, seed={seed}"
        ),
    )


def main(argv=None) -> int:
    """Write the example spectrum (or one with other parameters) to a file."""
    ap = argparse.ArgumentParser(
        prog="python -m inference.make_synthetic", description=__doc__.splitlines()[0]
    )
    ap.add_argument("--p", type=float, default=0.5)
    ap.add_argument("--lmax", type=int, default=30)
    ap.add_argument("--seed", type=int, default=2015)
    ap.add_argument("--output", default=EXAMPLE_PATH)
    args = ap.parse_args(argv)
    spec = synthetic_spectrum(args.p, lmax=args.lmax, seed=args.seed)
    save_spectrum(args.output, spec)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
