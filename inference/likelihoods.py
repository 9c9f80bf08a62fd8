"""Likelihoods of a measured C_ℓ given the BGK model (4.7): per-multipole (diagonal) ones for spectrum
files with asymmetric errors, and the full-covariance Gaussian of an ensemble estimate.

Model (per multipole ℓ of the fit range, ℓ ≥ 1)::

    μ_ℓ(p, A, N) = F[A · bgk_spectrum(·, p)]_ℓ + N

A is the model's full-sky C_1 (``bgk_spectrum`` is 1 at ℓ = 1); N the noise offset — ``"none"`` for
noise-subtracted data or a simulated Ĉ_ℓ, ``"fixed"`` (the header's ``noise_level``, or
``noise_level=``), or ``"free"``; ``"auto"`` picks none / fixed / free from the header. F is the
optional partial-sky forward model (``forward=``, see ``inference.pseudo_cl``): a callable mapping the
full-sky model C_ℓ on ℓ = 0..L (index = ℓ; C_0 = 0 because (4.7) does not determine the monopole) to the
pseudo-C_ℓ the experiment measures, indexed by ℓ.

Diagonal likelihoods for data x̂_ℓ with 68% error distances σ⁻ (err_lo) and σ⁺ (err_hi), r = μ − x̂
(a spectrum file carries no correlations between multipoles, so these treat them as independent):

* ``"lognormal"``: the offset log-normal of Bond, Jaffe & Knox (2000, ApJ 533, 19): Gaussian in
  z = ln(C_ℓ + o), centred on the midpoint of the quoted interval's log-endpoints
  ln(x̂ + o − σ⁻), ln(x̂ + o + σ⁺) with half their distance as σ_z (Δχ² = 1 at both ends), o = the
  subtracted noise level (header ``noise_level`` when ``noise_subtracted: true``, else 0). A C_ℓ
  estimate from ν ≈ (2ℓ+1) f_sky modes scatters like a scaled χ²_ν, whose log has a μ-independent
  width, so this is the appropriate shape for power spectra with few modes per ℓ; linear-space
  likelihoods with data-derived errors over-weight downward fluctuations. Measured on
  ``make_synthetic`` spectra (p = 0.5, 40–80 seeds; pull = (p̂ − p)/σ_p): split normal std(p̂) 0.20
  vs quoted 0.08, 68% coverage 0.40; a split normal in z centred on ln x̂ mean pull −0.45 to −0.78,
  coverage 0.60; this centred form mean pull +0.15 to +0.41, std 1.02–1.06, coverage 0.65–0.70
  (``tests/test_ml.py -m slow``). Needs x̂ + o − σ⁻ > 0 at every fitted ℓ.
* ``"split_normal"``: −2 ln L = Σ r²/σ_±², σ⁺ where the model lies above the data (r > 0), σ⁻
  below. Its normalisation does not depend on μ. Symmetric errors → Gaussian.
* ``"variable_gaussian"``: Barlow's variable-width Gaussian with variance linear in μ
  (R. Barlow, "Asymmetric statistical errors", arXiv:physics/0406120, §3.4):
  V(μ) = σ⁺σ⁻ + (σ⁺ − σ⁻) r, floored at 1e-3 σ⁺σ⁻ (V would turn negative far below x̂ when σ⁺ > σ⁻).
* ``"gaussian"``: symmetrised σ = (σ⁻ + σ⁺)/2, for a simulated Ĉ_ℓ with its realisation variance.
* ``"auto"`` (default): ``"gaussian"`` if all errors are symmetric, else ``"lognormal"`` where it applies,
  else ``"split_normal"``; the fit records the choice.

Full covariance (``hartlap_precision``, ``profiled_chi2``): the Gaussian
χ²(p, A) = (Ĉ − A f_p)ᵀ Ψ (Ĉ − A f_p) of an ensemble mean Ĉ_ℓ whose covariance Σ̂ was estimated from
the same R realisations, with Ψ the Hartlap-debiased inverse of Σ̂; A is profiled out exactly (the model
is linear in it). Used by ``inference.covariance_fit``. See docs/physics.md for the BGK model.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from numbers import Real
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import expit
from jaxtyping import Array, ArrayLike, Float

from crjax.theory import bgk_spectrum
from inference.data import Spectrum

__all__ = [
    "LIKELIHOODS",
    "NOISE_MODES",
    "hartlap_factor",
    "hartlap_precision",
    "profiled_chi2",
]

LIKELIHOODS = ("auto", "split_normal", "lognormal", "variable_gaussian", "gaussian")
NOISE_MODES = ("auto", "none", "fixed", "free")
PARAM_NAMES = ("p", "amplitude", "noise")


# ---------------------------------------------------------------------------------------------------
# diagonal likelihoods: data preparation


@dataclasses.dataclass(frozen=True)
class _Prepared:
    ell: np.ndarray  # (n,) int
    x: np.ndarray  # (n,) data / scale
    lo: np.ndarray
    hi: np.ndarray
    scale: float
    noise_mode: str  # "none" | "fixed" | "free"
    noise_fixed: float  # / scale (0 unless fixed)
    offset: float  # / scale: lognormal offset (the subtracted noise level)
    likelihood: str
    forward: Callable | None
    forward_lmax: int
    spectrum: Spectrum

    @property
    def n_free(self) -> int:
        return 3 if self.noise_mode == "free" else 2


def _check_lmin(lmin) -> int:
    if lmin is None:
        return 1
    if isinstance(lmin, bool) or not isinstance(lmin, numbers.Integral) or lmin < 1:
        raise ValueError(
            "lmin must be an integer >= 1: the BGK spectrum (4.7) does not determine the monopole; "
            f"got {lmin!r}"
        )
    return int(lmin)


def _prepare(
    spectrum, lmin, lmax, noise, noise_level, likelihood, forward, forward_lmax
) -> _Prepared:
    if not isinstance(spectrum, Spectrum):
        raise ValueError(  # noqa: TRY004  (project convention: every bad input is a ValueError)
            f"spectrum must be an inference.data.Spectrum; got {type(spectrum).__name__}"
        )
    if likelihood not in LIKELIHOODS:
        raise ValueError(f"likelihood must be one of {LIKELIHOODS}; got {likelihood!r}")
    if noise not in NOISE_MODES:
        raise ValueError(f"noise must be one of {NOISE_MODES}; got {noise!r}")
    lmin = _check_lmin(lmin)
    sel = spectrum.select(lmin, lmax)
    if noise == "auto":
        if spectrum.noise_subtracted:
            noise = "none"
        elif spectrum.noise_level is not None or noise_level is not None:
            noise = "fixed"
        else:
            noise = "free"
    nfix = 0.0
    if noise == "fixed":
        nfix = noise_level if noise_level is not None else spectrum.noise_level
        if nfix is None:
            raise ValueError(
                "noise='fixed' needs noise_level= or a 'noise_level' header in the spectrum file"
            )
        if (
            isinstance(nfix, bool)
            or not isinstance(nfix, numbers.Real)
            or not (math.isfinite(nfix) and nfix >= 0)
        ):
            raise ValueError(f"noise_level must be a finite number >= 0; got {nfix!r}")
    elif noise_level is not None:
        raise ValueError(
            f"noise_level is only used with noise='fixed' (or 'auto'); got noise={noise!r}"
        )
    if forward is not None and not callable(forward):
        raise ValueError(
            "forward must be a callable mapping full-sky C_ell (index = ell) to pseudo-C_ell"
        )
    lmax_data = int(sel.ell.max())
    if forward_lmax is None:
        forward_lmax = getattr(forward, "lmax_in", lmax_data)
    if (
        isinstance(forward_lmax, bool)
        or not isinstance(forward_lmax, numbers.Integral)
        or forward_lmax < lmax_data
    ):
        raise ValueError(
            f"forward_lmax must be an integer >= the largest fitted ell ({lmax_data}); got {forward_lmax!r}"
        )
    n_free = 3 if noise == "free" else 2
    if sel.ell.size <= n_free:
        raise ValueError(
            f"the ell range {int(sel.ell.min())}..{lmax_data} holds {sel.ell.size} multipoles; fitting "
            f"{n_free} parameters needs at least {n_free + 1}"
        )
    scale = float(np.max(np.abs(sel.cl)))
    if scale == 0.0:
        scale = float(np.max(sel.sigma))
    offset = 0.0
    if spectrum.noise_subtracted and spectrum.noise_level is not None:
        offset = float(spectrum.noise_level)
    low = sel.cl + offset - sel.err_lo
    if likelihood == "auto":
        if np.array_equal(sel.err_lo, sel.err_hi):
            likelihood = "gaussian"
        else:
            likelihood = "lognormal" if np.all(low > 0) else "split_normal"
    if likelihood != "lognormal":
        offset = 0.0
    elif np.any(low <= 0):
        bad = [int(e) for e in sel.ell[low <= 0]]
        raise ValueError(
            f"likelihood='lognormal' needs C_ell + offset - err_lo > 0 (offset = subtracted noise level "
            f"{offset:g}); violated at ell = {bad}: use 'split_normal' or 'variable_gaussian'"
        )
    return _Prepared(
        ell=sel.ell,
        x=sel.cl / scale,
        lo=sel.err_lo / scale,
        hi=sel.err_hi / scale,
        scale=scale,
        noise_mode=noise,
        noise_fixed=float(nfix) / scale,
        offset=offset / scale,
        likelihood=likelihood,
        forward=forward,
        forward_lmax=int(forward_lmax),
        spectrum=sel,
    )


class _Static(NamedTuple):
    """Hashable, shape-fixing part of a fit: jitted functions are cached on it (no recompiles per data set)."""

    noise_mode: str
    likelihood: str
    forward: Callable | None
    forward_lmax: int


def _static(prep: _Prepared) -> _Static:
    return _Static(prep.noise_mode, prep.likelihood, prep.forward, prep.forward_lmax)


def _data(prep: _Prepared, weights: np.ndarray | None = None) -> dict:
    """The data of a fit as JAX arrays (traced arguments of the cached jitted functions).

    ``weights`` (0/1 per multipole, default all 1) select a sub-range without changing the shapes, so
    the fits of an ℓ-range table share one compiled program.
    """
    w = np.ones(prep.ell.size) if weights is None else np.asarray(weights, dtype=float)
    return {
        "ell": jnp.asarray(prep.ell),
        "x": jnp.asarray(prep.x),
        "lo": jnp.asarray(prep.lo),
        "hi": jnp.asarray(prep.hi),
        "w": jnp.asarray(w),
        "noise_fixed": jnp.asarray(prep.noise_fixed),
        "scale": jnp.asarray(prep.scale),
        "offset": jnp.asarray(prep.offset),
    }


def _model(st: _Static, data: dict, p, amp, noise):
    """μ_ℓ / s for the fitted ℓ (traced in p, amp = A/s, noise = N/s)."""
    if st.forward is None:
        return amp * bgk_spectrum(data["ell"].astype(float), p) + noise
    full = jnp.concatenate(
        [jnp.zeros(1), amp * bgk_spectrum(jnp.arange(1.0, st.forward_lmax + 1.0), p)]
    )
    # the forward model sees C_ℓ in data units (a mask coupling is linear, so the scale commutes)
    pseudo = jnp.asarray(st.forward(full * data["scale"])) / data["scale"]
    return pseudo[data["ell"]] + noise


def _chi2_terms(kind, mu, x, lo, hi, offset=0.0):
    """Per-multipole −2 ln L (up to μ-independent constants) of the chosen likelihood."""
    if kind == "lognormal":
        # Gaussian in z = ln(C + offset) through the log-endpoints of the quoted 68% interval
        z_lo, z_hi = jnp.log(x + offset - lo), jnp.log(x + offset + hi)
        r = jnp.log(jnp.maximum(mu + offset, 1e-300)) - 0.5 * (z_lo + z_hi)
        return 4.0 * r * r / ((z_hi - z_lo) * (z_hi - z_lo))
    r = mu - x
    if kind == "gaussian":
        return r * r / (0.5 * (lo + hi)) ** 2
    if kind == "split_normal":
        sig = jnp.where(r > 0, hi, lo)
        return r * r / (sig * sig)
    var = jnp.maximum(hi * lo + (hi - lo) * r, 1e-3 * hi * lo)
    return r * r / var


def _natural(st: _Static, data: dict, u):
    """(p, A/s, N/s) from the unconstrained coordinates u = (logit p, ln(A/s)[, N/s])."""
    p = expit(u[0])
    amp = jnp.exp(u[1])
    noise = u[2] if st.noise_mode == "free" else data["noise_fixed"]
    return p, amp, noise


@functools.partial(jax.jit, static_argnums=0)
def _neg2loglike(st: _Static, data: dict, u):
    """−2 ln L (up to constants) at u, summed over the multipoles with weight 1."""
    p, amp, noise = _natural(st, data, u)
    mu = _model(st, data, p, amp, noise)
    terms = _chi2_terms(st.likelihood, mu, data["x"], data["lo"], data["hi"], data["offset"])
    return jnp.sum(data["w"] * terms)


def _wls_amplitude(prep: _Prepared, p: float, free_noise: bool, weights: np.ndarray):
    """Weighted least squares of (A, N) at fixed p with symmetrised errors (no forward model): start values."""
    f = np.asarray(bgk_spectrum(prep.ell, p))
    w = weights / (0.5 * (prep.lo + prep.hi)) ** 2
    y = prep.x - (0.0 if free_noise else prep.noise_fixed)
    design = np.stack([f, np.ones_like(f)], axis=1) if free_noise else f[:, None]
    coef, *_ = np.linalg.lstsq(design * np.sqrt(w)[:, None], y * np.sqrt(w), rcond=None)
    amp = max(float(coef[0]), 1e-3)
    noise = float(coef[1]) if free_noise else prep.noise_fixed
    return amp, noise


# ---------------------------------------------------------------------------------------------------
# full covariance


def hartlap_factor(n_realisations: Real, n_multipoles: Real) -> float:
    """Hartlap, Simon & Schneider (2007, A&A 464, 399) factor h = (R − L − 2)/(R − 1).

    For R independent Gaussian realisations and an L × L sample covariance Σ̂, E[Σ̂⁻¹] = Σ⁻¹/h, so h Σ̂⁻¹
    is an unbiased precision matrix. Needs R ≥ L + 3 (h > 0); ValueError otherwise.
    """
    for name, v, lo in (("n_realisations", n_realisations, 2), ("n_multipoles", n_multipoles, 1)):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
    if n_realisations < n_multipoles + 3:
        raise ValueError(
            f"n_realisations={n_realisations} is too small for a covariance of {n_multipoles} multipoles: "
            f"the Hartlap-corrected inverse needs n_realisations >= n_multipoles + 3 = {n_multipoles + 3} "
            "(fit fewer multipoles or use more realisations)"
        )
    return (n_realisations - n_multipoles - 2) / (n_realisations - 1)


def hartlap_precision(
    covariance: Float[ArrayLike, "L L"], n_realisations: int
) -> Float[np.ndarray, "L L"]:
    """Ψ = h Σ̂⁻¹ (``hartlap_factor``) of a sample covariance Σ̂ estimated from ``n_realisations``.

    Σ̂ must be symmetric positive definite (checked by a Cholesky factorisation; ValueError otherwise).
    """
    cov = np.asarray(covariance, dtype=float)
    h = hartlap_factor(n_realisations, cov.shape[0])
    try:
        chol = np.linalg.cholesky(cov)
    except np.linalg.LinAlgError:
        raise ValueError(
            "covariance must be positive definite (a sample covariance of n_realisations > n_multipoles "
            "independent realisations is); its Cholesky factorisation failed"
        ) from None
    inv_chol = np.linalg.inv(chol)
    return h * (inv_chol.T @ inv_chol)


def profiled_chi2(
    shapes: Float[ArrayLike, "*batch L"],
    estimate: Float[ArrayLike, " L"],
    precision: Float[ArrayLike, "L L"],
) -> tuple[Float[Array, "*batch"], Float[Array, "*batch"]]:
    """χ² of the model A·f minimised over the amplitude A exactly (the model is linear in A).

    With Ψ the precision: Â = fᵀΨĈ / fᵀΨf and χ²_min = ĈᵀΨĈ − (fᵀΨĈ)²/fᵀΨf. ``shapes`` f may carry
    leading batch axes (e.g. a grid of p). Returns (χ²_min, Â), each of the batch shape.
    """
    return _profiled_chi2(jnp.asarray(shapes), jnp.asarray(estimate), jnp.asarray(precision))


@jax.jit
def _profiled_chi2(f, c, psi):
    # one compiled call per batch shape: a fit evaluates the profile in a few batches (eager jnp ops
    # cost ~10x more in dispatch than the arithmetic here)
    psi_c = psi @ c
    b = f @ psi_c
    a = jnp.sum((f @ psi) * f, axis=-1)
    amp = b / a
    return c @ psi_c - b * amp, amp
