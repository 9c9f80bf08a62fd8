"""Relative-intensity maps and their angular power spectra: C_ℓ, cross spectra C_ℓ^{ab}, masks.

Seed §2–§3 (equation numbers refer to the seed paper; conventions in ``docs/physics.md``).

**Sky convention (the one mask convention of crjax).** Pixel i (HEALPix RING) of every crjax map
is the particle's *momentum* direction p̂_i at Earth, as in :func:`crjax.healpix_directions`. The
*arrival* direction on the sky — where an observatory sees the particle come from — is −p̂_i.
So a data sky map indexed by arrival direction is the antipodal map of a crjax map:
``data[i] = crjax_map[antipode(i)]``. C_ℓ is invariant under the parity flip p̂ → −p̂, so spectra
do not care; masks of a sky region do: :func:`declination_band_mask` takes the declination of the
*arrival* direction and returns a mask in crjax's (momentum) pixel order.

Backends: :mod:`crjax._sht` (ring FFT + Legendre by default, dense real Y_ℓm as a cross-check).
Array layouts (``docs/design.md``): positions ``(..., npix, 3)``, maps ``(..., npix)``, spectra
``(..., ℓmax+1)``, cross spectra ``(..., 3, 3, ℓmax+1)``.
"""

from __future__ import annotations

import numbers

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._checks import check_finite, is_concrete
from ._sht import check_lmax, cross_cl, expand_to, float_dtype, map_nside
from .sky import healpix_directions

__all__ = [
    "relative_intensity",
    "power_spectrum",
    "cross_power_spectra",
    "declination_band_mask",
    "sky_fraction",
]


# ---------------------------------------------------------------------------------------------
# relative intensity


def relative_intensity(
    positions: ArrayLike,
    g: ArrayLike,
    *,
    velocities: ArrayLike | None = None,
    K: ArrayLike | None = None,
) -> Float[Array, "... npix"]:
    """Relative intensity δI(p̂) = r(−T; p̂)·g [− 3 p̂(−T)·K·g]: the seed's (2.1) without δf(−T).

    Args:
        positions: backtracked positions r(−T; p̂_i), ``(..., npix, 3)`` in units of Lc (e.g.
            ``Trajectory.positions``, ``(nreal, ntimes, npix, 3)``); pixel i = momentum p̂_i.
        g: ∇n/n, ``(3,)`` in 1/Lc (its magnitude scales δI linearly, C_ℓ quadratically).
        velocities: optional ``(..., npix, 3)`` momentum directions p̂(−T; p̂_i) of the particle
            at −T, as in ``Trajectory.velocities`` of :func:`crjax.backtrack` (the particle's, not
            the backtracked antiparticle's, direction). Given together with ``K``, the (2.1) term
            −3 p̂(−T)·K·g is added (bounded, while r·g grows ∝ √T).
        K: diffusion tensor ``(3, 3)`` or ``(..., 3, 3)`` whose leading axes match ``positions``'
            leading axes (without the pixel axis), e.g. ``(ntimes, 3, 3)``. In Lc (c = 1).

    Returns:
        Maps ``(..., npix)`` (dimensionless). Linear in g: the spectra of every gradient direction
        follow from :func:`cross_power_spectra` of the positions.
    """
    r = jnp.asarray(positions)
    g = jnp.asarray(g)
    if r.ndim < 2 or r.shape[-1] != 3:
        raise ValueError(f"positions must have shape (..., npix, 3); got {r.shape}")
    map_nside(r[..., 0], "positions")
    if g.shape != (3,):
        raise ValueError(f"g must be a 3-vector (shape (3,)); got shape {g.shape}")
    check_finite("g", g)
    if (velocities is None) != (K is None):
        raise ValueError(
            "velocities and K must be given together (the −3 p̂(−T)·K·g term needs both)"
        )
    dtype = jnp.result_type(float_dtype(r), float_dtype(g))
    di = r.astype(dtype) @ g.astype(dtype)
    if velocities is not None:
        v = jnp.asarray(velocities, dtype=dtype)
        if v.shape != r.shape:
            raise ValueError(f"velocities must have the positions' shape {r.shape}; got {v.shape}")
        K = jnp.asarray(K, dtype=dtype)
        if K.ndim < 2 or K.shape[-2:] != (3, 3) or K.ndim - 2 > r.ndim - 2:
            raise ValueError(
                f"K must have shape (3, 3) or (..., 3, 3) with ... ⊆ {r.shape[:-2]}; got {K.shape}"
            )
        Kg = K @ g.astype(dtype)  # (..., 3)
        Kg = expand_to(Kg[..., None, :], r.ndim)  # broadcast over the pixel axis
        try:
            jnp.broadcast_shapes(Kg.shape, r.shape)
        except ValueError:
            raise ValueError(
                f"K shape {K.shape} does not match the positions' leading axes {r.shape[:-2]}"
            ) from None
        di = di - 3.0 * jnp.sum(v * jnp.broadcast_to(Kg, r.shape), axis=-1)
    return di


# ---------------------------------------------------------------------------------------------
# masks


def check_mask(mask, npix: int, ndim: int, dtype) -> Array:
    """A finite, not all-zero mask ``(..., npix)`` with at most ``ndim`` axes, in ``dtype``,
    expanded to ``ndim`` axes; ValueError naming ``mask`` otherwise (values checked if concrete)."""
    mask = jnp.asarray(mask)
    if mask.ndim < 1 or mask.shape[-1] != npix or mask.ndim > ndim:
        raise ValueError(
            f"mask must have shape (..., {npix}) with at most {ndim} axes, broadcastable to the "
            f"maps; got {mask.shape}"
        )
    check_finite("mask", mask)
    if is_concrete(mask) and np.any(np.all(np.asarray(mask) == 0, axis=-1)):
        raise ValueError("mask is zero at every pixel: it leaves no sky to analyse")
    return expand_to(mask.astype(dtype), ndim)


def _apply_mask(maps: Array, mask) -> Array:
    """maps·mask with both broadcast to a common shape (mask may have fewer leading axes)."""
    if mask is None:
        return maps
    # the pixel axis is -1 for maps, but positions carry a component axis after it
    mask = check_mask(mask, maps.shape[-1], maps.ndim, maps.dtype)
    try:
        shape = jnp.broadcast_shapes(maps.shape, mask.shape)
    except ValueError:
        raise ValueError(
            f"mask shape {mask.shape} does not broadcast against the maps' shape {maps.shape}"
        ) from None
    return jnp.broadcast_to(maps, shape) * jnp.broadcast_to(mask, shape)


def declination_band_mask(
    nside: int,
    dec_min: float | int,
    dec_max: float | int,
    *,
    pole: ArrayLike | tuple[float | int, ...] = (0.0, 0.0, 1.0),
    dtype=None,
) -> Float[Array, " npix"]:
    """Binary sky mask in crjax pixel order: 1 where the *arrival* direction's declination lies in
    [dec_min, dec_max] (degrees).

    Convention (module docstring): pixel i is the momentum direction p̂_i and the particle arrives
    from −p̂_i, so sin(dec_i) = −p̂_i·n̂ with n̂ = ``pole`` the celestial north pole in the
    simulation frame (normalised here). Multiply crjax maps (momentum order) by it directly; for a
    data map indexed by arrival direction use the antipodal pixels of this mask. A ground
    observatory sees a declination band (seed Fig. 1: IceCube the south, e.g. −90°…−20°; HAWC the
    north, e.g. −30°…+70°). Shape (12·nside²,).
    """
    for name, v in (("dec_min", dec_min), ("dec_max", dec_max)):
        if not isinstance(v, numbers.Real) or not -90.0 <= v <= 90.0:
            raise ValueError(f"{name} must be a declination in degrees within [-90, 90]; got {v!r}")
    if not dec_min < dec_max:
        raise ValueError(f"dec_min must be < dec_max; got dec_min={dec_min}, dec_max={dec_max}")
    n = np.asarray(pole, dtype=np.float64)
    if n.shape != (3,) or not np.all(np.isfinite(n)) or np.linalg.norm(n) == 0:
        raise ValueError(f"pole must be a finite non-zero 3-vector; got {pole!r}")
    n = n / np.linalg.norm(n)
    p = np.asarray(healpix_directions(nside), dtype=np.float64)
    dec = np.degrees(np.arcsin(np.clip(-(p @ n), -1.0, 1.0)))
    band = (dec >= dec_min) & (dec <= dec_max)
    if not band.any():
        raise ValueError(
            f"the band [{dec_min}, {dec_max}] deg contains no pixel centre at nside {nside}; "
            "widen it or raise nside"
        )
    return jnp.asarray(band, dtype=dtype or jnp.result_type(float))


def sky_fraction(mask: ArrayLike) -> Float[Array, "..."]:
    """f_sky = mean of mask² over pixels: the usual first-order pseudo-C_ℓ correction,
    ⟨C̃_ℓ⟩ ≈ f_sky C_ℓ. An all-zero mask is refused."""
    mask = jnp.asarray(mask)
    map_nside(mask, "mask")
    mask = check_mask(mask, mask.shape[-1], mask.ndim, float_dtype(mask))
    return jnp.mean(mask * mask, axis=-1)


# ---------------------------------------------------------------------------------------------
# power spectra


def _prepare(maps, lmax, method, name):
    maps = jnp.asarray(maps)
    nside = map_nside(maps, name)
    lmax = check_lmax(lmax, nside)
    if method not in ("ring", "dense"):
        raise ValueError(f"method must be 'ring' or 'dense'; got {method!r}")
    check_finite(name, maps)
    return maps.astype(float_dtype(maps)), lmax


def power_spectrum(
    maps: ArrayLike,
    *,
    lmax: int | None = None,
    mask: ArrayLike | None = None,
    method: str = "ring",
) -> Float[Array, "... L"]:
    """Angular power spectrum C_ℓ, ℓ = 0…ℓmax, of HEALPix (RING) maps — the seed's (2.2).

    a_ℓm = (4π/Npix) Σ_i m_i Y*_ℓm(p̂_i), C_ℓ = Σ_m |a_ℓm|²/(2ℓ+1): identical to
    ``healpy.anafast(m, iter=0)`` (equal-area weights, no ring weights). Units: those of the map
    squared (δI is dimensionless).

    Args:
        maps: ``(..., npix)`` with npix = 12·nside²; any leading batch shape. float32 maps give
            float32 spectra; everything else is computed in float64. NaN/inf are refused.
        lmax: highest multipole (default 3·nside − 1). Larger values are exact transforms of the
            pixel values (as anafast) but aliased (:mod:`crjax._sht`).
        mask: optional ``(..., npix)`` weight (binary or apodised, not all zero) multiplied into
            the maps first: the result is the raw pseudo-C_ℓ of the masked sky, as
            ``anafast(m * mask, iter=0)`` (divide by :func:`sky_fraction` for a rough full-sky
            level). Leading axes broadcast.
        method: ``"ring"`` (default, fast) or ``"dense"`` (real-Y_ℓm matrix; a cross-check).

    Returns:
        ``(..., lmax+1)``. Jittable (``lmax``/``method`` static) and differentiable in the maps
        and the mask.
    """
    maps, lmax = _prepare(maps, lmax, method, "maps")
    maps = _apply_mask(maps, mask)
    batch = maps.shape[:-1]
    flat = jnp.reshape(maps, (-1, 1, maps.shape[-1]))
    cl = cross_cl(flat, lmax, method)[:, 0, 0]
    return jnp.reshape(cl, batch + (lmax + 1,))


def cross_power_spectra(
    positions: ArrayLike,
    *,
    lmax: int | None = None,
    mask: ArrayLike | None = None,
    method: str = "ring",
) -> Float[Array, "... 3 3 L"]:
    """Cross spectra C_ℓ^{ab} of the three position-component maps r_a(−T; p̂), a, b ∈ {x, y, z}.

    δI = r·g is linear in g, so C_ℓ(δI) = g_a g_b C_ℓ^{ab} for every gradient g (``docs/physics.md``
    §4): one run gives the spectrum of every gradient direction, and derivatives with respect to
    g's direction are exact contractions, free of the chaos in ∂r/∂θ. C_ℓ^{ab} =
    Σ_m Re(a^a_ℓm a^b*_ℓm)/(2ℓ+1), as ``anafast(r_a, r_b, iter=0)``; symmetric in (a, b).

    Args:
        positions: r(−T; p̂_i) ``(..., npix, 3)`` (Lc); any leading batch shape.
        lmax, mask, method: as in :func:`power_spectrum` (the mask multiplies every component).

    Returns:
        ``(..., 3, 3, lmax+1)`` in Lc². Differentiable in the positions and the mask.
    """
    r = jnp.asarray(positions)
    if r.ndim < 2 or r.shape[-1] != 3:
        raise ValueError(f"positions must have shape (..., npix, 3); got {r.shape}")
    maps, lmax = _prepare(jnp.moveaxis(r, -1, -2), lmax, method, "positions")  # (..., 3, npix)
    if mask is not None:
        mask = jnp.asarray(mask)
        mask = check_mask(mask, maps.shape[-1], maps.ndim - 1, maps.dtype)[..., None, :]
        maps = _apply_mask(maps, mask)
    batch = maps.shape[:-2]
    cl = cross_cl(jnp.reshape(maps, (-1, 3, maps.shape[-1])), lmax, method)
    return jnp.reshape(cl, batch + (3, 3, lmax + 1))
