"""Synthetic data made by crjax itself: spectra (BGK shape + realistic scatter, and the shipped example
file) and ensembles of maps with a known spectrum (``synthetic_maps``, for validating estimator and fit).

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
import functools
import os

import healpy as hp
import numpy as np
from scipy import stats

from crjax.theory import bgk_spectrum
from inference.data import NOISE_LEVELS, Spectrum, save_spectrum

__all__ = ["EXAMPLE_PATH", "main", "synthetic_maps", "synthetic_spectrum"]

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


def _check_real(name, v, lo, *, strict):
    ok = isinstance(v, (int, float, np.floating, np.integer)) and not isinstance(v, bool)
    ok = ok and np.isfinite(v) and (v > lo if strict else v >= lo)
    if not ok:
        raise ValueError(
            f"{name} must be a finite number {'>' if strict else '>='} {lo}; got {v!r}"
        )


def synthetic_maps(
    p: float,
    *,
    nside: int = 8,
    n_realisations: int = 100,
    amplitude: float = 10.0,
    monopole: float = 3.0,
    noise_range: tuple[float, float] = (0.5, 2.0),
    lmax: int | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An ensemble of HEALPix (RING) maps with a known spectrum, as ``healpy.synfast`` draws them.

    Each map = a Gaussian isotropic field with S_ℓ = ``amplitude`` · bgk_spectrum(ℓ, p) for
    1 ≤ ℓ ≤ ``lmax`` (default 2·nside; S_ℓ = 0 above: band-limited) + ``monopole`` + white noise of a
    per-realisation level σ_r drawn uniformly from ``noise_range``. a_ℓm are drawn with
    ``numpy.random.default_rng(seed)`` (m = 0 real with variance S_ℓ, m > 0 complex with S_ℓ/2 per part:
    what healpy.synalm does, without healpy's global random state) and synthesised by healpy.alm2map.
    Returns ``(maps (R, npix), S_ℓ (lmax+1,) with S_0 = 0, sigma_r (R,))``.
    """
    if not (isinstance(p, (int, float)) and 0 < p < 1):
        raise ValueError(f"p must lie in (0, 1); got {p!r}")
    for name, v in (("nside", nside), ("n_realisations", n_realisations), ("seed", seed)):
        if (
            isinstance(v, bool)
            or not isinstance(v, (int, np.integer))
            or v < (0 if name == "seed" else 1)
        ):
            raise ValueError(f"{name} must be a non-negative integer (>= 1 for {name}); got {v!r}")
    if not hp.isnsideok(nside):
        raise ValueError(f"nside must be a power of two; got {nside}")
    _check_real("amplitude", amplitude, 0.0, strict=True)
    _check_real("monopole", monopole, float("-inf"), strict=True)
    lo, hi = noise_range
    _check_real("noise_range[0]", lo, 0.0, strict=False)
    if not (np.isfinite(hi) and hi >= lo):
        raise ValueError(
            f"noise_range must be (low, high) with 0 <= low <= high; got {noise_range!r}"
        )
    lmax = 2 * nside if lmax is None else lmax
    if (
        isinstance(lmax, bool)
        or not isinstance(lmax, (int, np.integer))
        or not 1 <= lmax <= 3 * nside - 1
    ):
        raise ValueError(
            f"lmax must be an integer in [1, 3*nside-1 = {3 * nside - 1}]; got {lmax!r}"
        )
    ell = np.arange(lmax + 1)
    s_ell = np.zeros(lmax + 1)
    s_ell[1:] = amplitude * np.asarray(bgk_spectrum(ell[1:], p))
    rng = np.random.default_rng(seed)
    l_idx, m_idx = hp.Alm.getlm(lmax)
    sd = np.sqrt(s_ell[l_idx])
    npix = hp.nside2npix(nside)
    sigma = rng.uniform(lo, hi, n_realisations)
    re, im = rng.standard_normal((2, n_realisations, l_idx.size))
    # a map is linear in (Re a_ℓm, Im a_ℓm): synthesise through healpy.alm2map's images of the unit
    # coefficients (exactly alm2map of each realisation, without R separate transforms)
    re_basis, im_basis = _alm2map_basis(nside, lmax)
    coef_re = np.where(m_idx == 0, sd * re, sd * re / np.sqrt(2.0))
    coef_im = np.where(m_idx == 0, 0.0, sd * im / np.sqrt(2.0))
    noise = rng.standard_normal((n_realisations, npix))
    maps = coef_re @ re_basis + coef_im @ im_basis + monopole + sigma[:, None] * noise
    return maps, s_ell, sigma


@functools.lru_cache(maxsize=4)
def _alm2map_basis(nside: int, lmax: int) -> tuple[np.ndarray, np.ndarray]:
    """healpy.alm2map of each unit Re and Im a_ℓm coefficient, shapes (n_alm, npix)."""
    n = hp.Alm.getsize(lmax)
    eye = np.eye(n)
    re_basis = np.array([hp.alm2map(e.astype(complex), nside, lmax=lmax) for e in eye])
    im_basis = np.array([hp.alm2map(1j * e, nside, lmax=lmax) for e in eye])
    return re_basis, im_basis


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
