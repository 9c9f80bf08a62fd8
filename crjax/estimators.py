"""Ensemble estimators of the anisotropy spectrum: ⟨C_ℓ⟩, the standard-diffusion dipole, the seed's
noise level (3.1) and Ĉ_ℓ = ⟨C_ℓ⟩ − N, the unbiased :func:`spectrum_estimate` with its covariance
(also as a tensor in the gradient direction), and the sum rules (2.5)–(2.7).

Realisations are on the leading axis of every ensemble input. Conventions and derivations:
``docs/physics.md`` §4.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._checks import check_finite, check_int_at_least, is_concrete
from ._sht import FOUR_PI, check_lmax, expand_to, float_dtype, map_nside
from .sky import npix_to_nside
from .spectra import _apply_mask, cross_power_spectra, power_spectrum

__all__ = [
    "mean_power_spectrum",
    "standard_dipole",
    "noise_level",
    "SeedSpectrumEstimate",
    "spectrum_estimator",
    "SpectrumEstimate",
    "spectrum_estimate",
    "CrossSpectrumEstimate",
    "cross_spectrum_estimate",
    "parseval",
    "SumRules",
    "sum_rules",
]


def _mean_and_sem(x: Array, name: str):
    n = x.shape[0] if x.ndim else 0
    if n < 2:
        raise ValueError(
            f"{name} needs a leading realisation axis of length >= 2; got shape {x.shape}"
        )
    mean = jnp.mean(x, axis=0)
    return mean, jnp.sqrt(jnp.var(x, axis=0, ddof=1) / n)


# ---------------------------------------------------------------------------------------------
# the seed's ensemble quantities (Fig. 2, Fig. 3)


def mean_power_spectrum(
    maps: ArrayLike, *, lmax: int | None = None, mask=None
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Ensemble-averaged ⟨C_ℓ⟩ over the leading realisation axis and its standard error (ddof=1).

    The seed's Fig. 2 black/green/blue lines. Returns ``(mean, stderr)``, each ``(..., lmax+1)``.
    """
    cl = power_spectrum(maps, lmax=lmax, mask=mask)
    return _mean_and_sem(cl, "maps")


def standard_dipole(maps: ArrayLike, *, mask=None) -> Float[Array, "..."]:
    """C_1 of the ensemble-averaged map (realisations on the leading axis): the seed's
    "standard diffusion" dipole (Fig. 2 magenta), i.e. ⟨r1 r2⟩ → ⟨r1⟩⟨r2⟩; compare eq. (1.1).
    """
    maps = jnp.asarray(maps)
    if maps.ndim < 2:
        raise ValueError(f"maps must have shape (nreal, ..., npix); got {maps.shape}")
    return power_spectrum(jnp.mean(maps, axis=0), lmax=1, mask=mask)[..., 1]


def noise_level(
    K: ArrayLike,
    T: ArrayLike,
    g: ArrayLike,
    npix: int,
) -> Float[Array, "..."]:
    """Shot-noise level N = (4π/Npix) · 2T · g·K·g — the seed's (3.1).

    ``K`` ``(..., 3, 3)`` (e.g. ``(ntimes, 3, 3)``), ``T`` broadcastable to ``K``'s leading axes
    (e.g. the save times ``(ntimes,)``), ``g`` ``(3,)``. Only K's symmetric part contributes.

    (3.1) takes the whole pixel variance 2T g·K·g as white. It is exactly the i = j term of the
    pixel pair sum, so ⟨C_ℓ⟩ − N also removes the smooth part's diagonal: it is low by a constant
    δ = Σ_ℓ(2ℓ+1)S_ℓ/Npix at every ℓ (``docs/physics.md`` §4; measured Ĉ_9 ≈ −0.3 N for g ∥ B0 at
    the seed's parameters, tΩ = 200, nside 8). That is the seed's estimator, kept as published
    for the figures; :func:`spectrum_estimate` corrects it.
    """
    K = jnp.asarray(K)
    g = jnp.asarray(g)
    T = jnp.asarray(T)
    if K.ndim < 2 or K.shape[-2:] != (3, 3):
        raise ValueError(f"K must have shape (..., 3, 3); got {K.shape}")
    if g.shape != (3,):
        raise ValueError(f"g must be a 3-vector (shape (3,)); got shape {g.shape}")
    check_int_at_least("npix", npix, 12)
    npix_to_nside(npix)
    if is_concrete(T) and np.any(np.asarray(T) < 0):
        raise ValueError(f"T must be >= 0 (allowed range: [0, inf)); got {T!r}")
    gKg = jnp.einsum("...ij,i,j->...", K, g, g)
    T = expand_to(T, gKg.ndim) if T.ndim <= gKg.ndim else T
    return (FOUR_PI / npix) * 2.0 * T * gKg


class SeedSpectrumEstimate(NamedTuple):
    """The seed's Fig. 3 quantities, each ``(..., lmax+1)``."""

    mean: Array  # ⟨C_ℓ⟩ over realisations
    noise: Array  # N (3.1), broadcast to ℓ
    estimate: Array  # Ĉ_ℓ = ⟨C_ℓ⟩ − N
    variance: Array  # variance of Ĉ_ℓ: var_realisations(C_ℓ)/nreal (N taken as exact)


def spectrum_estimator(
    cls: ArrayLike, noise: ArrayLike
) -> SeedSpectrumEstimate:
    """The seed's Ĉ_ℓ = ⟨C_ℓ⟩ − N with its variance over realisations (§3, Fig. 3; N from (3.1)).

    ``cls``: per-realisation spectra, realisations on the leading axis (≥ 2). ``noise``: N from
    :func:`noise_level`, shape ``cls.shape[1:-1]`` or broadcastable to it (e.g. ``(ntimes,)``).
    The variance is that of the mean, var(C_ℓ)/nreal with ddof = 1; N's own error is neglected.
    Biased low by the constant δ of :func:`noise_level`; kept for the figures. For an unbiased
    estimate with its covariance use :func:`spectrum_estimate`.
    """
    cls = jnp.asarray(cls)
    mean, sem = _mean_and_sem(cls, "cls")
    noise = jnp.asarray(noise, dtype=mean.dtype)
    if noise.ndim > mean.ndim - 1:
        raise ValueError(
            f"noise must have shape {mean.shape[:-1]} (one value per spectrum); got {noise.shape}"
        )
    noise_l = jnp.broadcast_to(expand_to(noise, mean.ndim - 1)[..., None], mean.shape)
    return SeedSpectrumEstimate(mean, noise_l, mean - noise_l, sem * sem)


# ---------------------------------------------------------------------------------------------
# the unbiased estimator


class SpectrumEstimate(NamedTuple):
    """Result of :func:`spectrum_estimate` (and of :meth:`CrossSpectrumEstimate.contract`).

    ``...`` are the maps' axes between realisations and pixels (e.g. times).
    """

    estimate: Array  # (..., L) mean over realisations of the per-realisation estimates
    covariance: Array  # (..., L, L) covariance of the MEAN: sample covariance (ddof 1) / R
    samples: Array  # (R, ..., L) per-realisation estimates Ĉ_ℓ^(r)
    diagonal: Array  # (R, ...) removed pixel diagonal D_r = (4π/Npix²) Σ_i (w_i x_i)²
    offset: Array  # (R, ...) added self-consistent offset δ̂_r (0 where not corrected)

    @property
    def n_realisations(self) -> int:
        """R, the number of independent realisations behind ``covariance``."""
        return int(self.samples.shape[0])

    @property
    def stderr(self) -> Array:
        """Standard error of ``estimate``: sqrt of the covariance diagonal, (..., L)."""
        return jnp.sqrt(jnp.diagonal(self.covariance, axis1=-2, axis2=-1))

    def hartlap_factor(self, n_bins: int) -> float:
        """(R − n_bins − 2)/(R − 1): multiply the inverse of a ``n_bins`` × ``n_bins`` block of
        ``covariance`` by it for an unbiased precision matrix (Hartlap et al. 2007; needs
        R > n_bins + 2)."""
        check_int_at_least("n_bins", n_bins, 1)
        R = self.n_realisations
        if R <= n_bins + 2:
            raise ValueError(
                f"n_bins must be < R - 2 = {R - 2} for a Hartlap-corrected precision; got {n_bins}"
            )
        return (R - n_bins - 2) / (R - 1)


def _summarise(samples: Array, diagonal: Array, offset: Array) -> SpectrumEstimate:
    R = samples.shape[0]
    mean = jnp.mean(samples, axis=0)
    d = samples - mean[None]
    cov = jnp.einsum("r...i,r...j->...ij", d, d) / ((R - 1) * R)
    return SpectrumEstimate(mean, cov, samples, diagonal, offset)


def _check_ensemble(x, name: str, pixel_axis: int) -> tuple[Array, int, int]:
    """Realisations on axis 0 (>= 2), at most one axis (e.g. times) before the pixels."""
    x = jnp.asarray(x)
    core = x.ndim + pixel_axis + 1  # axes up to and including the pixel axis
    if core not in (2, 3):
        shape = "(R, npix)" if pixel_axis == -1 else "(R, npix, 3)"
        shape_t = "(R, ntimes, npix)" if pixel_axis == -1 else "(R, ntimes, npix, 3)"
        raise ValueError(f"{name} must have shape {shape} or {shape_t}; got {x.shape}")
    if x.shape[0] < 2:
        raise ValueError(
            f"{name} needs a leading realisation axis of length R >= 2 (the covariance comes from "
            f"their spread); got shape {x.shape}"
        )
    npix = x.shape[pixel_axis]
    nside = map_nside(jnp.zeros((npix,)), name)
    check_finite(name, x)
    return x.astype(float_dtype(x)), npix, nside


def _estimator_lmax(lmax, nside: int, npix: int) -> int:
    lmax = check_lmax(lmax, nside, default=2 * nside)
    if (lmax + 1) ** 2 >= npix:
        raise ValueError(
            f"lmax must satisfy (lmax+1)**2 < Npix = {npix} (the offset correction divides by "
            f"Npix - (lmax+1)**2), i.e. lmax <= {int(np.ceil(np.sqrt(npix))) - 2}; got {lmax}"
        )
    return lmax


def _offset_correct(cl: Array, diag: Array, npix: int, correct: bool) -> tuple[Array, Array]:
    """Pair-sum estimate C_ℓ − D plus the self-consistent δ̂ (linear in the quadratic forms)."""
    pair = cl - diag[..., None]
    L = cl.shape[-1]
    if not correct:
        return pair, jnp.zeros_like(diag)
    w = 2.0 * jnp.arange(L, dtype=cl.dtype) + 1.0
    delta = jnp.sum(pair * expand_to(w, pair.ndim), axis=-1) / (npix - L * L)
    return pair + delta[..., None], delta


_ESTIMATOR_DOC = """
    **What it estimates.** Model each realisation's map as x = s + n: a correlated part s that is
    statistically isotropic with spectrum S_ℓ, band-limited to ℓ ≤ ℓmax (a monopole is fine), plus
    zero-mean scatter n independent between pixels, of any level, which may differ between pixels
    and between realisations. Then, per realisation r (``docs/physics.md`` §4):

    1. C_ℓ − D_r with D_r = (4π/Npix²) Σ_i x_i² (the i = j term of the pair sum
       C_ℓ = (4π/Npix²) Σ_ij x_i x_j P_ℓ(p̂_i·p̂_j)) removes the scatter exactly, whatever its
       level: E[C_ℓ − D_r] = S_ℓ − δ, with δ = Σ_ℓ(2ℓ+1)S_ℓ/Npix the smooth part's own diagonal,
       the same at every ℓ.
    2. Summing step 1 over ℓ ≤ ℓmax gives Npix·δ − (ℓmax+1)²·δ, so
       δ̂_r = Σ_{ℓ≤ℓmax}(2ℓ+1)(C_ℓ − D_r)/(Npix − (ℓmax+1)²) is unbiased for δ, and
       Ĉ_ℓ^(r) = C_ℓ − D_r + δ̂_r is unbiased for S_ℓ.

    Ĉ_ℓ^(r) is linear in the map's quadratic form, so Ĉ_ℓ of δI = r·g is g_a g_b Ĉ_ℓ^{ab} exactly
    (:func:`cross_spectrum_estimate`). The mean over realisations is the estimate; the covariance
    of the mean is the sample covariance of the Ĉ_ℓ^(r) (ddof 1) over R: it carries the strong
    correlation across ℓ that the common scatter of D_r and δ̂_r causes. Invert it with a Hartlap
    factor (:meth:`SpectrumEstimate.hartlap_factor`) or shrinkage; it is singular for R ≤ ℓmax + 1.

    **Where it fails.**
    - Signal power above ℓmax: it is neither in the sum of step 2 (δ̂ low by
      Σ_{ℓ>ℓmax}(2ℓ+1)S_ℓ/(Npix − (ℓmax+1)²)) nor removed from the pixels (it aliases into
      ℓ ≤ ℓmax). Choose ℓmax above the signal's band.
    - (ℓmax+1)² close to Npix: δ̂ divides by Npix − (ℓmax+1)², so its scatter grows without bound;
      refused at (ℓmax+1)² ≥ Npix. The default ℓmax = 2·nside ((ℓmax+1)² ≈ Npix/3) also keeps the
      HEALPix quadrature (anafast iter = 0) accurate: measured E[C_ℓ^pix]/S_ℓ within the 2-3%
      statistical error of 200 maps for ℓ ≤ 2·nside at nside 8 and 16, but 6% high near
      3·nside − 1.
    - Scatter correlated between pixels (e.g. relative diffusion: neighbouring directions stay
      correlated down to an angle that shrinks with T): only its i = j part is removed; its
      correlated part counts as signal, which is then not band-limited.
    - Pixel quadrature: S_ℓ is recovered to the HEALPix quadrature error of a band-limited map
      (~1e-3 relative at nside 8 for smooth spectra, ∝ nside⁻²).
"""


def spectrum_estimate(
    maps: ArrayLike,
    *,
    lmax: int | None = None,
    mask: ArrayLike | None = None,
    offset: bool = True,
) -> SpectrumEstimate:
    """Unbiased Ĉ_ℓ from an ensemble of maps alone, with the covariance of the mean.

    Corrects the bias of the seed's ⟨C_ℓ⟩ − N (3.1), which removes the smooth part's diagonal too.

    Args:
        maps: ``(R, npix)`` or ``(R, ntimes, npix)`` HEALPix (RING) maps, R ≥ 2 independent
            realisations on the leading axis; finite.
        lmax: highest multipole, an integer with (ℓmax+1)² < Npix; default 2·nside.
        mask: optional ``(npix,)`` (or broadcastable ``(..., npix)``) weight, not all zero. The
            diagonal removed is then the masked one, (4π/Npix²) Σ_i w_i² x_i², which removes the
            scatter exactly from the pseudo-C_ℓ. The offset is NOT corrected with a mask
            (``offset=False`` is required): the masked pair-sum estimate has expectation
            Σ_ℓ' M_ℓℓ' S_ℓ' − f₂·δ with M the mode-coupling matrix, f₂ = mean(w²) and δ the
            full-sky offset above, and the closure of step 2 fails because a masked band-limited
            map is no longer band-limited. A fit must forward-model M·S − f₂·Σ(2ℓ+1)S_ℓ/Npix.
        offset: add the self-consistent δ̂_r (default True); False gives the pair-sum estimate
            C_ℓ − D_r, biased by −δ (−f₂·δ with a mask).

    Returns:
        :class:`SpectrumEstimate` with ``estimate`` ``(..., lmax+1)``, ``covariance``
        ``(..., lmax+1, lmax+1)``, ``samples`` ``(R, ..., lmax+1)``, ``diagonal`` and ``offset``
        ``(R, ...)``; ``n_realisations``. Differentiable in the maps (jax.grad, jit with static
        keywords).
    """
    x, npix, nside = _check_ensemble(maps, "maps", -1)
    lmax = _estimator_lmax(lmax, nside, npix)
    if mask is not None and offset:
        raise ValueError(
            "mask: the offset correction is defined for the full sky only (a masked band-limited "
            "map is not band-limited, so the closure over ℓ <= lmax fails); pass offset=False "
            "to get the diagonal-removed pseudo-spectrum and forward-model M·S − f_sky·δ"
        )
    cl = power_spectrum(x, lmax=lmax, mask=mask)
    xm = _apply_mask(x, mask)
    diag = (FOUR_PI / npix**2) * jnp.sum(xm * xm, axis=-1)
    samples, delta = _offset_correct(cl, diag, npix, offset)
    return _summarise(samples, diag, delta)


spectrum_estimate.__doc__ += _ESTIMATOR_DOC


class CrossSpectrumEstimate(NamedTuple):
    """Result of :func:`cross_spectrum_estimate`: the estimator as a tensor in g's components."""

    estimate: Array  # (..., 3, 3, L) mean of the per-realisation Ĉ_ℓ^{ab}, symmetric in (a, b)
    samples: Array  # (R, ..., 3, 3, L)
    diagonal: Array  # (R, ..., 3, 3) removed pixel diagonals (4π/Npix²) Σ_i w_i² r_a r_b
    offset: Array  # (R, ..., 3, 3) added offsets δ̂^{ab}

    @property
    def n_realisations(self) -> int:
        return int(self.samples.shape[0])

    def contract(self, g: ArrayLike) -> SpectrumEstimate:
        """The scalar :class:`SpectrumEstimate` of δI = r·g: samples g_a g_b Ĉ_ℓ^{ab,(r)}, with
        their mean and covariance. Exact (the estimator is linear in the quadratic form) and
        differentiable in g."""
        g = jnp.asarray(g, dtype=self.samples.dtype)
        if g.shape != (3,):
            raise ValueError(f"g must be a 3-vector (shape (3,)); got shape {g.shape}")
        check_finite("g", g)
        s = jnp.einsum("a,b,...abl->...l", g, g, self.samples)
        diag = jnp.einsum("a,b,...ab->...", g, g, self.diagonal)
        off = jnp.einsum("a,b,...ab->...", g, g, self.offset)
        return _summarise(s, diag, off)


def cross_spectrum_estimate(
    positions: ArrayLike,
    *,
    lmax: int | None = None,
    mask: ArrayLike | None = None,
    offset: bool = True,
) -> CrossSpectrumEstimate:
    """:func:`spectrum_estimate` for every gradient direction at once (tensor spectra).

    Applies the estimator to the cross spectra C_ℓ^{ab} of the position components
    (:func:`crjax.cross_power_spectra`), with diagonals (4π/Npix²) Σ_i r_a r_b and offsets δ̂^{ab}.
    Since δI = r·g, :meth:`CrossSpectrumEstimate.contract` (g) equals
    ``spectrum_estimate(relative_intensity(positions, g))`` up to round-off.

    Args:
        positions: ``(R, npix, 3)`` or ``(R, ntimes, npix, 3)`` backtracked positions, R ≥ 2.
        lmax, mask, offset: as in :func:`spectrum_estimate`.
    """
    r, npix, nside = _check_ensemble(positions, "positions", -2)
    lmax = _estimator_lmax(lmax, nside, npix)
    if mask is not None and offset:
        raise ValueError(
            "mask: the offset correction is defined for the full sky only; pass offset=False "
            "(see spectrum_estimate)"
        )
    cl = cross_power_spectra(r, lmax=lmax, mask=mask)  # (R, ..., 3, 3, L)
    rm = jnp.moveaxis(_apply_mask(jnp.moveaxis(r, -1, -2), mask), -2, -1)
    diag = (FOUR_PI / npix**2) * jnp.einsum("...na,...nb->...ab", rm, rm)
    samples, delta = _offset_correct(cl, diag, npix, offset)
    return CrossSpectrumEstimate(jnp.mean(samples, axis=0), samples, diag, delta)


# ---------------------------------------------------------------------------------------------
# sum rules


def parseval(
    maps: ArrayLike, *, lmax: int | None = None, mask=None
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
    """Both sides of the pixel Parseval relation: (Σ_{ℓ≤ℓmax} (2ℓ+1) C_ℓ/4π, pixel mean of m²).

    Not an identity on a HEALPix grid: the pixel sum is only a quadrature. For smooth maps
    band-limited below ℓmax they agree to the pixelisation error (~1e-3 at nside 8, ∝ nside⁻²);
    for white noise the harmonic side holds only (ℓmax+1)²/Npix of the variance (3/4 at
    ℓmax = 3·nside − 1), the rest lies above ℓmax. With ``mask``, both sides use the masked map.
    """
    maps = jnp.asarray(maps)
    cl = power_spectrum(maps, lmax=lmax, mask=mask)
    ell = jnp.arange(cl.shape[-1], dtype=cl.dtype)
    harmonic = jnp.sum(expand_to(2.0 * ell + 1.0, cl.ndim) * cl, axis=-1) / FOUR_PI
    m = _apply_mask(maps.astype(cl.dtype), mask)
    return harmonic, jnp.mean(m * m, axis=-1)


class SumRules(NamedTuple):
    """Both sides of the seed's sum rules (2.5)–(2.7), each ``(...)``.

    ``*_lhs`` are the harmonic sums (1/4π) Σ (2ℓ+1)⟨C_ℓ⟩ (ℓ ≥ 0, ℓ = 0, ℓ ≥ 1), including
    ``above_lmax``; ``*_rhs`` are 2T g·K·g, 2T g·(K − K̃)·g and 2T g·K̃·g.
    """

    total_lhs: Array  # (2.5)
    total_rhs: Array
    monopole_lhs: Array  # (2.6)
    monopole_rhs: Array
    multipole_lhs: Array  # (2.7)
    multipole_rhs: Array
    above_lmax: Array  # power assigned to ℓ > ℓmax (0 unless ``noise`` is given)


def sum_rules(
    mean_cls: ArrayLike,
    K: ArrayLike,
    K_rel: ArrayLike,
    T: ArrayLike,
    g: ArrayLike,
    *,
    npix: int,
    noise: ArrayLike | None = None,
) -> SumRules:
    """The seed's sum rules (2.5)–(2.7) for ensemble averages, both sides.

    (2.5) (1/4π) Σ_{ℓ≥0} (2ℓ+1)⟨C_ℓ⟩ ≃ 2T K_ij g_i g_j, (2.6) ⟨C_0⟩/4π ≃ 2T (K − K̃)_ij g_i g_j,
    (2.7) (1/4π) Σ_{ℓ≥1} (2ℓ+1)⟨C_ℓ⟩ ≃ 2T K̃_ij g_i g_j, with K = ⟨r rᵀ⟩/2T (direction-averaged,
    e.g. :func:`crjax.diffusion_tensor`) and K̃ from :func:`crjax.relative_diffusion_tensor` at the
    same T, so the right-hand sides equal the pixel means exactly and (2.6) holds to round-off.

    **Power above ℓmax.** ``mean_cls`` stops at ℓmax, but a pixel map has Npix harmonic degrees of
    freedom. Late-time maps are dominated by shot noise, which is white: each of the
    Npix − (ℓmax+1)² unresolved degrees of freedom carries the noise level N (3.1). Passing
    ``noise`` = N adds ``above_lmax`` = N·max(Npix − (ℓmax+1)², 0)/4π to the ℓ ≥ 0 and ℓ ≥ 1 sums;
    without it (smooth, band-limited maps) nothing is added and the sums agree to the HEALPix
    quadrature error (:func:`parseval`).

    Args:
        mean_cls: ⟨C_ℓ⟩ ``(..., ℓmax+1)``; K, K_rel: ``(..., 3, 3)``; T: ``(...)`` (broadcast);
        g: ``(3,)``; npix: pixels per map; noise: N ``(...)`` or None.
    """
    cl = jnp.asarray(mean_cls)
    K, K_rel, g = jnp.asarray(K), jnp.asarray(K_rel), jnp.asarray(g)
    if K.shape[-2:] != (3, 3) or K_rel.shape[-2:] != (3, 3):
        raise ValueError(
            f"K and K_rel must have shape (..., 3, 3); got {K.shape} and {K_rel.shape}"
        )
    if g.shape != (3,):
        raise ValueError(f"g must be a 3-vector (shape (3,)); got shape {g.shape}")
    check_int_at_least("npix", npix, 12)
    npix_to_nside(npix)
    L = cl.shape[-1]
    ell = jnp.arange(L, dtype=cl.dtype)
    weighted = expand_to(2.0 * ell + 1.0, cl.ndim) * cl / FOUR_PI
    lhs0 = weighted[..., 0]
    lhs1 = jnp.sum(weighted[..., 1:], axis=-1)
    if noise is None:
        above = jnp.zeros_like(lhs0)
    else:
        above = jnp.asarray(noise, dtype=cl.dtype) * max(npix - L * L, 0) / FOUR_PI
        above = jnp.broadcast_to(expand_to(above, lhs0.ndim), lhs0.shape)
    T = jnp.asarray(T, dtype=cl.dtype)
    two_t = 2.0 * expand_to(T, K.ndim - 2) if T.ndim <= K.ndim - 2 else 2.0 * T
    gkg = jnp.einsum("...ij,i,j->...", K, g, g)
    gkrg = jnp.einsum("...ij,i,j->...", K_rel, g, g)
    return SumRules(
        total_lhs=lhs0 + lhs1 + above,
        total_rhs=two_t * gkg,
        monopole_lhs=lhs0,
        monopole_rhs=two_t * (gkg - gkrg),
        multipole_lhs=lhs1 + above,
        multipole_rhs=two_t * gkrg,
        above_lmax=above,
    )
