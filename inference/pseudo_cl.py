"""Partial-sky forward models for the fits: the pseudo-C_ℓ mode-coupling matrix of a HEALPix mask
(Hivon et al. 2002, ApJ 567, 2) and the crude f_sky scaling.

A ground observatory sees part of the sky; its pseudo-C_ℓ of an isotropic signal is ⟨C̃_ℓ⟩ = Σ M_ℓℓ' C_ℓ'.
Pass ``coupling_forward(mask, lmax)`` as ``forward=`` to ``inference.ml.fit_p_map`` / ``inference.nuts``.
The project's one declination mask is ``crjax.angular.declination_band_mask`` (pixel = momentum direction
p̂, arrival direction −p̂; see docs/physics.md). M depends on the mask only through its power spectrum
W_L, and the antipodal map p̂ → −p̂ multiplies each a_LM by (−1)^L, leaving W_L unchanged: the coupling of a
mask in momentum pixels equals that of the same mask in arrival pixels, so M applies to data maps too.
Not modelled: the loss of m = 0 modes by time-integration methods.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from numbers import Real

import healpy as hp
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike

from crjax._checks import check_int_at_least

__all__ = ["coupling_forward", "fsky_forward", "mask_coupling_matrix"]


def _check_mask(mask) -> np.ndarray:
    m = np.asarray(mask, dtype=float)
    if m.ndim != 1 or not hp.isnpixok(m.size):
        raise ValueError(
            f"mask must be a 1-D HEALPix map of 12*nside**2 pixels; got shape {m.shape}"
        )
    if not np.all(np.isfinite(m)):
        raise ValueError("mask contains NaN or inf; every pixel weight must be finite")
    if not np.any(m != 0):
        raise ValueError("mask is zero everywhere: it leaves no sky to measure a spectrum on")
    return m


def fsky_forward(f_sky: Real) -> Callable:
    """Crude partial-sky model ⟨C̃_ℓ⟩ ≈ f_sky C_ℓ of an unnormalised pseudo-C_ℓ on a 0/1 mask.

    Exact only for spectra that vary little over the mask's coupling width; prefer ``coupling_forward``.
    Use it only if the experiment did *not* already divide its C_ℓ by f_sky.
    """
    if (
        isinstance(f_sky, bool)
        or not isinstance(f_sky, numbers.Real)
        or not (math.isfinite(f_sky) and 0 < f_sky <= 1)
    ):
        raise ValueError(f"f_sky must lie in (0, 1]; got {f_sky!r}")
    return lambda cl: f_sky * cl


def _log_wigner3j_000_sq(l1, l2, l3):
    """ln of (l1 l2 l3; 0 0 0)² (−inf where it vanishes), closed form via log-factorials (Edmonds 3.7.17)."""
    from scipy.special import gammaln

    L = l1 + l2 + l3
    ok = (L % 2 == 0) & (l3 >= np.abs(l1 - l2)) & (l3 <= l1 + l2)
    g = L // 2

    def lf(n):
        return gammaln(np.maximum(n, 0) + 1.0)

    val = (
        lf(L - 2 * l1)
        + lf(L - 2 * l2)
        + lf(L - 2 * l3)
        - lf(L + 1)
        + 2.0 * (lf(g) - lf(g - l1) - lf(g - l2) - lf(g - l3))
    )
    return np.where(ok, val, -np.inf)


def mask_coupling_matrix(mask: ArrayLike, lmax: Real, *, lmax_in: Real | None = None) -> np.ndarray:
    """Pseudo-C_ℓ coupling M (shape (lmax+1, lmax_in+1)): ⟨C̃_ℓ⟩ = Σ_ℓ' M_ℓℓ' C_ℓ' for an isotropic signal
    multiplied by ``mask`` (HEALPix RING map, any weights). M_ℓℓ' = (2ℓ'+1)/(4π) Σ_L (2L+1) W_L
    (ℓ ℓ' L; 0 0 0)², W_L the mask's power spectrum (healpy.anafast; Hivon et al. 2002, ApJ 567, 2).
    ``lmax_in`` defaults to lmax; a model should extend well beyond the fitted ℓ (power leaks down).
    """
    mask = _check_mask(mask)
    nside = hp.npix2nside(mask.size)
    lmax_in = lmax if lmax_in is None else lmax_in
    check_int_at_least("lmax", lmax, 0)
    check_int_at_least("lmax_in", lmax_in, 0)
    lmask = min(lmax + lmax_in, 3 * nside - 1)
    wl = hp.anafast(mask, lmax=lmask, iter=3)
    l1 = np.arange(lmax + 1)[:, None, None]
    l2 = np.arange(lmax_in + 1)[None, :, None]
    L = np.arange(lmask + 1)[None, None, :]
    w3 = np.exp(_log_wigner3j_000_sq(l1, l2, L))
    return (
        (2 * l2[..., 0] + 1)
        / (4 * np.pi)
        * np.einsum("abl,l->ab", w3, (2 * np.arange(lmask + 1) + 1) * wl)
    )


def coupling_forward(mask: ArrayLike, lmax: Real, *, lmax_in: Real | None = None) -> Callable:
    """Forward model C_ℓ (ℓ = 0..lmax_in) ↦ pseudo-C_ℓ (ℓ = 0..lmax) of ``mask``; pass as ``forward=``.

    The callable carries ``lmax_in`` (the fit evaluates the model up to it). Limitation: the m = 0
    modes removed by time-integration methods are not modelled.
    """
    check_int_at_least("lmax", lmax, 0)
    lmax_in = 2 * lmax if lmax_in is None else lmax_in
    M = jnp.asarray(mask_coupling_matrix(mask, lmax, lmax_in=lmax_in))

    def forward(cl):
        return M @ cl

    forward.lmax_in = lmax_in
    return forward
