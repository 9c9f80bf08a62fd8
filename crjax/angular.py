"""Anisotropy observables: relative-intensity maps, angular power spectra, noise, relative
diffusion.

Seed §2–§3 (equation numbers refer to the seed paper; see ``../shared/physics.md`` §4).

**Sky convention.** Pixel i (HEALPix RING) of every map is the particle's *momentum* direction p̂_i
at Earth, as in :func:`crjax.healpix_directions`. The *arrival* direction on the sky is −p̂_i.
C_ℓ is invariant under the parity flip p̂ → −p̂, so spectra do not care; masks of a sky region do
(:func:`declination_band_mask` takes the declination of the arrival direction).

**Power-spectrum backend (why "ring").** The estimator is the seed's (2.2) with equal-area pixels,
a_ℓm = (4π/Npix) Σ_i δI_i Y*_ℓm(p̂_i), C_ℓ = Σ_m |a_ℓm|²/(2ℓ+1) — identical to
``healpy.anafast(map, iter=0)``. HEALPix pixels lie on 4·nside − 1 iso-latitude rings with
equally spaced φ, so Y_ℓm factorises into λ_ℓm(θ_r) e^{imφ} and

    a_ℓm = (4π/Npix) Σ_rings λ_ℓm(θ_r) F_m(r),   F_m(r) = Σ_{j∈r} δI_j e^{−imφ_j}.

F_m(r) comes from one real FFT of the ring (ring r has φ_j = φ0_r + 2πj/n_r, so
F_m = e^{−imφ0_r} X_{m mod n_r}; one batched FFT per ring length), the ℓ sum is a batched matrix
product over m against λ_ℓm(θ_r) from the standard stable three-term recursion; the tables are
host-precomputed and cached per (nside, ℓmax, dtype): O(Npix·ℓmax) work per map. The FFT
replaced an explicit cos/sin matrix per ring (1.6x faster at nside 32; compile 0.9 → 2.3 s). The dense
real-Y_ℓm alternative (``method="dense"``) needs an Npix × (ℓmax+1)² matrix — 0.9 GB and
O(Npix·ℓmax²) work per map at nside 32, ℓmax 95 — and measured slower on CPU
(``benchmarks/power_spectrum.py``); it is kept as an independent cross-check. s2fft is not used:
its HEALPix transform needs L ≥ 2·nside and compiles slowly. Because the phases are explicit, the
ring backend is exact for any ℓmax; ℓmax > 3·nside − 1 is allowed (as in anafast) but there the
pixel sums alias and C_ℓ is no longer a meaningful estimate.

Array layouts (``docs/design.md``): positions ``(..., npix, 3)``, maps ``(..., npix)``, spectra
``(..., ℓmax+1)``; ensemble functions take the realisations on the leading axis.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import NamedTuple

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._checks import check_finite, check_int_at_least, is_concrete
from .sky import healpix_directions, npix_to_nside

__all__ = [
    "relative_intensity",
    "power_spectrum",
    "declination_band_mask",
    "sky_fraction",
    "mean_power_spectrum",
    "standard_dipole",
    "noise_level",
    "SpectrumEstimate",
    "spectrum_estimator",
    "relative_diffusion_tensor",
    "BinnedDispersion",
    "binned_relative_dispersion",
    "parseval",
    "SumRules",
    "sum_rules",
]

_FOUR_PI = 4.0 * math.pi


# ---------------------------------------------------------------------------------------------
# helpers


def _float_dtype(x) -> np.dtype:
    """Floating dtype of ``x``; integers/bools promote to JAX's default float (float64 in crjax)."""
    dt = jnp.result_type(x)
    return dt if jnp.issubdtype(dt, jnp.floating) else jnp.result_type(float)


def _expand_to(x: Array, ndim: int) -> Array:
    """Prepend unit axes so ``x`` has ``ndim`` axes (explicit: tests run rank_promotion='raise')."""
    return jnp.reshape(x, (1,) * (ndim - x.ndim) + x.shape)


def _map_nside(maps: Array, name: str = "maps") -> int:
    if maps.ndim < 1:
        raise ValueError(
            f"{name} must have a trailing pixel axis of length 12*nside**2; got a scalar"
        )
    try:
        return npix_to_nside(maps.shape[-1])
    except ValueError as err:
        raise ValueError(f"{name}: {err}") from None


def _check_lmax(lmax, nside: int) -> int:
    if lmax is None:
        return 3 * nside - 1
    check_int_at_least("lmax", lmax, 0)
    return int(lmax)


# ---------------------------------------------------------------------------------------------
# host-side tables (numpy, float64, cached per resolution)


def _legendre_table(cos_theta: np.ndarray, lmax: int) -> np.ndarray:
    """λ_ℓm(θ) = Y_ℓm(θ, 0) for 0 ≤ m ≤ ℓ ≤ lmax; shape (len(θ), lmax+1 [ℓ], lmax+1 [m]), 0 for
    m > ℓ.

    Standard stable recursion (fixed-m upward in ℓ from the sectoral λ_mm), Condon–Shortley phase.
    Very small λ_mm near the poles underflow gracefully to 0 (they are below 1e-300 there).
    """
    x = np.asarray(cos_theta, dtype=np.float64)
    s = np.sqrt(np.clip(1.0 - x * x, 0.0, None))
    nr, L = x.shape[0], lmax + 1
    lam = np.zeros((nr, L, L))
    m = np.arange(L)
    # sectoral: λ_mm = −sqrt((2m+1)/(2m)) sinθ λ_{m−1,m−1}
    diag = np.empty((nr, L))
    diag[:, 0] = 1.0 / math.sqrt(_FOUR_PI)
    for mm in range(1, L):
        diag[:, mm] = -math.sqrt((2 * mm + 1) / (2 * mm)) * s * diag[:, mm - 1]
    lam[:, m, m] = diag
    if L > 1:
        # λ_{m+1,m} = sqrt(2m+3) cosθ λ_mm
        mm = m[:-1]
        lam[:, mm + 1, mm] = np.sqrt(2 * mm + 3)[None, :] * x[:, None] * diag[:, :-1]
    for ell in range(2, L):
        mm = np.arange(ell - 1)  # m ≤ ℓ−2: three-term recursion in ℓ
        a = np.sqrt((4.0 * ell * ell - 1.0) / (ell * ell - mm * mm))
        b = np.sqrt(((ell - 1.0) ** 2 - mm * mm) / (4.0 * (ell - 1.0) ** 2 - 1.0))
        lam[:, ell, mm] = a[None, :] * (
            x[:, None] * lam[:, ell - 1, mm] - b[None, :] * lam[:, ell - 2, mm]
        )
    return lam


@functools.lru_cache(maxsize=16)
def _ring_tables_np(nside: int, lmax: int):
    """Host tables for the ring backend (float64, read-only), rings grouped by length.

    HEALPix RING pixels sit on rings of equal θ, equally spaced in φ: φ_j = φ0_r + 2πj/n_r. So the
    ring sums F_m(r) = Σ_j x_j e^{−imφ_j} = e^{−imφ0_r} X_{m mod n_r} with X = FFT of the ring,
    and X_k = conj(X_{n−k}) for k > n/2 (real maps). Returns ``groups``: per ring length n,
    (pixels (g, n) int32, k (L,) int32 rfft index of each m, s (L,) ±1 sign of the imaginary
    part); ``shift`` (nrings, 2, L) = [cos mφ0, sin mφ0]; ``lam`` (L [m], nrings, L [ℓ]) =
    (4π/Npix)·λ_ℓm(θ_r), m-major for one batched matmul over m; rings in group order.
    """
    npix = 12 * nside * nside
    start, length, cos_theta, _, _ = hp.ringinfo(nside, np.arange(1, 4 * nside))
    _, phi0 = hp.pix2ang(nside, start)
    m = np.arange(lmax + 1)
    groups, order = [], []
    for n in np.unique(length):
        members = np.flatnonzero(length == n)
        pixels = (start[members][:, None] + np.arange(n)[None, :]).astype(np.int32)
        k = m % n
        flip = k > n // 2
        groups.append((pixels, np.where(flip, n - k, k).astype(np.int32), np.where(flip, -1.0, 1.0)))
        order.append(members)
    order = np.concatenate(order)
    mphi = phi0[order][:, None] * m[None, :]
    shift = np.stack([np.cos(mphi), np.sin(mphi)], axis=1)
    lam = _legendre_table(cos_theta[order], lmax) * (_FOUR_PI / npix)  # (rings, ℓ, m)
    lam = np.ascontiguousarray(np.transpose(lam, (2, 0, 1)))
    for arr in (shift, lam, *(a for g in groups for a in g)):
        arr.setflags(write=False)
    return tuple(groups), shift, lam


@functools.lru_cache(maxsize=16)
def _ring_tables(nside: int, lmax: int, dtype: np.dtype):
    """Device copies of :func:`_ring_tables_np` in the maps' dtype (immutable constants)."""
    groups, shift, lam = _ring_tables_np(nside, lmax)
    # First use may happen inside jit/vmap: force concrete arrays so no tracer is ever cached.
    with jax.ensure_compile_time_eval():
        groups = tuple(
            (jnp.asarray(pix), jnp.asarray(k), jnp.asarray(sign, dtype=dtype))
            for pix, k, sign in groups
        )
        return groups, jnp.asarray(shift, dtype=dtype), jnp.asarray(lam, dtype=dtype)


@functools.lru_cache(maxsize=4)
def _dense_ylm_np(nside: int, lmax: int):
    """Real orthonormal Y_ℓm at the pixel centres, (npix, (lmax+1)²), scaled by 4π/Npix, and the
    ℓ of each column."""
    npix = 12 * nside * nside
    theta, phi = hp.pix2ang(nside, np.arange(npix))
    lam = _legendre_table(np.cos(theta), lmax)  # (npix, L, L)
    cols, ells = [], []
    for ell in range(lmax + 1):
        cols.append(lam[:, ell, 0])
        ells.append(ell)
        for m in range(1, ell + 1):
            cols.append(math.sqrt(2.0) * lam[:, ell, m] * np.cos(m * phi))
            cols.append(math.sqrt(2.0) * lam[:, ell, m] * np.sin(m * phi))
            ells += [ell, ell]
    ylm = np.stack(cols, axis=-1) * (_FOUR_PI / npix)
    return ylm, np.asarray(ells, dtype=np.int32)


# ---------------------------------------------------------------------------------------------
# power spectrum


@jax.jit
def _ring_cl(maps: Float[Array, "b npix"], groups, shift, lam) -> Float[Array, "b L"]:
    """C_ℓ (b, L) by one real FFT per ring length and Legendre sums (:func:`_ring_tables_np`)."""
    b, L = maps.shape[0], lam.shape[0]
    re, im = [], []
    for pixels, k, sign in groups:  # 2·nside ring lengths
        xk = jnp.fft.rfft(maps[:, pixels], axis=-1)[..., k]  # (b, g, L): X_{m mod n}
        re.append(xk.real)
        im.append(xk.imag * sign[None, None, :])
    re, im = jnp.concatenate(re, axis=1), jnp.concatenate(im, axis=1)  # (b, rings, L)
    c, s = shift[None, :, 0], shift[None, :, 1]
    f = jnp.stack([re * c + im * s, im * c - re * s])  # F_m = e^{−imφ0}·X: (2, b, rings, L)
    f = jnp.reshape(jnp.transpose(f, (3, 0, 1, 2)), (L, 2 * b, -1))  # m-major: (m, 2b, rings)
    a = jnp.matmul(f, lam)  # Re/Im a_ℓm: (m, 2b, ℓ)
    w = jnp.concatenate([jnp.ones((1,), maps.dtype), jnp.full((L - 1,), 2.0, maps.dtype)])
    ell = jnp.arange(L, dtype=maps.dtype)
    return jnp.einsum("mbl,m->bl", jnp.reshape(a * a, (L, 2, b, L)).sum(1), w) / (
        2.0 * ell + 1.0
    )[None, :]


@functools.partial(jax.jit, static_argnums=(2,))
def _dense_cl(maps: Float[Array, "b npix"], ylm, lmax: int) -> Float[Array, "b L"]:
    a = maps @ ylm  # (b, (lmax+1)²) real-basis coefficients
    ells = jnp.repeat(
        jnp.arange(lmax + 1), 2 * jnp.arange(lmax + 1) + 1, total_repeat_length=ylm.shape[1]
    )
    s = jax.ops.segment_sum((a * a).T, ells, num_segments=lmax + 1).T
    return s / (2.0 * jnp.arange(lmax + 1, dtype=maps.dtype) + 1.0)[None, :]


def power_spectrum(
    maps: Float[ArrayLike, "... npix"],
    *,
    lmax: int | None = None,
    mask: Float[ArrayLike, "... npix"] | None = None,
    method: str = "ring",
) -> Float[Array, "... lmax+1"]:
    """Angular power spectrum C_ℓ, ℓ = 0…ℓmax, of HEALPix (RING) maps — the seed's (2.2).

    a_ℓm = (4π/Npix) Σ_i m_i Y*_ℓm(p̂_i), C_ℓ = Σ_m |a_ℓm|²/(2ℓ+1): identical to
    ``healpy.anafast(m, iter=0)`` (equal-area weights, no ring weights). Units: those of the map
    squared (δI is dimensionless).

    Args:
        maps: ``(..., npix)`` with npix = 12·nside²; any leading batch shape. float32 maps give
            float32 spectra; everything else is computed in float64.
        lmax: highest multipole (default 3·nside − 1). Larger values are exact transforms of the
            pixel values (as anafast) but aliased, see the module docstring.
        mask: optional ``(..., npix)`` weight (binary or apodised) multiplied into the maps first:
            the result is the raw pseudo-C_ℓ of the masked sky, as ``anafast(m * mask, iter=0)``
            (divide by :func:`sky_fraction` for a rough full-sky level). Leading axes broadcast.
        method: ``"ring"`` (default, fast) or ``"dense"`` (real-Y_ℓm matrix; a cross-check).

    Returns:
        ``(..., lmax+1)``. Jittable (``lmax``/``method`` static) and differentiable in the maps
        and the mask.
    """
    maps = jnp.asarray(maps)
    nside = _map_nside(maps, "maps")
    lmax = _check_lmax(lmax, nside)
    if method not in ("ring", "dense"):
        raise ValueError(f"method must be 'ring' or 'dense'; got {method!r}")
    check_finite("maps", maps)
    dtype = _float_dtype(maps)
    maps = maps.astype(dtype)
    if mask is not None:
        mask = jnp.asarray(mask)
        if mask.ndim < 1 or mask.shape[-1] != maps.shape[-1] or mask.ndim > maps.ndim:
            raise ValueError(
                f"mask must have shape (..., {maps.shape[-1]}) broadcastable to the maps' shape "
                f"{maps.shape}; got {mask.shape}"
            )
        check_finite("mask", mask)
        mask = _expand_to(mask.astype(dtype), maps.ndim)
        try:
            shape = jnp.broadcast_shapes(maps.shape, mask.shape)
        except ValueError:
            raise ValueError(
                f"mask shape {mask.shape} does not broadcast against the maps' shape {maps.shape}"
            ) from None
        maps = jnp.broadcast_to(maps, shape) * jnp.broadcast_to(mask, shape)
    batch = maps.shape[:-1]
    flat = jnp.reshape(maps, (-1, maps.shape[-1]))
    if method == "ring":
        cl = _ring_cl(flat, *_ring_tables(nside, lmax, np.dtype(dtype)))
    else:
        ylm, _ = _dense_ylm_np(nside, lmax)
        cl = _dense_cl(flat, ylm.astype(dtype), lmax)
    return jnp.reshape(cl, batch + (lmax + 1,))


def declination_band_mask(
    nside: int,
    dec_min: float,
    dec_max: float,
    *,
    pole: Float[ArrayLike, "3"] = (0.0, 0.0, 1.0),
    dtype=None,
) -> Float[Array, "npix"]:
    """Binary sky mask: 1 where the *arrival* direction's declination lies in [dec_min, dec_max].

    A ground observatory sees a declination band (seed Fig. 1: IceCube the south, e.g. −90°…−20°;
    HAWC the north, e.g. −30°…+70°). Pixel i is the momentum direction p̂_i, the arrival direction
    is −p̂_i, so sin(dec_i) = −p̂_i·n̂ with n̂ = ``pole`` the celestial north pole in the
    simulation frame (normalised here). Degrees. Shape (12·nside²,).
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
    return jnp.asarray((dec >= dec_min) & (dec <= dec_max), dtype=dtype or jnp.result_type(float))


def sky_fraction(mask: Float[ArrayLike, "npix"]) -> Float[Array, ""]:
    """f_sky = mean of mask² over pixels: the usual first-order pseudo-C_ℓ correction,
    ⟨C̃_ℓ⟩ ≈ f_sky C_ℓ."""
    mask = jnp.asarray(mask)
    return jnp.mean(mask * mask, axis=-1)


# ---------------------------------------------------------------------------------------------
# relative intensity


def relative_intensity(
    positions: Float[ArrayLike, "... npix 3"],
    g: Float[ArrayLike, "3"],
    *,
    velocities: Float[ArrayLike, "... npix 3"] | None = None,
    K: Float[ArrayLike, "... 3 3"] | None = None,
) -> Float[Array, "... npix"]:
    """Relative intensity δI(p̂) = r(−T; p̂)·g [− 3 p̂(−T)·K·g]: the seed's (2.1) without δf(−T).

    Args:
        positions: backtracked positions r(−T; p̂_i), ``(..., npix, 3)`` in units of Lc (e.g.
            ``Trajectory.positions``, ``(nreal, ntimes, npix, 3)``); pixel i = momentum p̂_i.
        g: ∇n/n, ``(3,)`` in 1/Lc (its magnitude scales δI linearly, C_ℓ quadratically).
        velocities: optional ``(..., npix, 3)`` momentum directions p̂(−T; p̂_i) of the particle
            at −T, as in ``Trajectory.velocities`` of :func:`crjax.backtrack.backtrack` (the
            particle's, not the backtracked antiparticle's, direction). Given together with ``K``,
            the (2.1) term −3 p̂(−T)·K·g is added (bounded, while r·g grows ∝ √T).
        K: diffusion tensor ``(3, 3)`` or ``(..., 3, 3)`` whose leading axes match ``positions``'
            leading axes (without the pixel axis), e.g. ``(ntimes, 3, 3)``. In Lc (c = 1).

    Returns:
        Maps ``(..., npix)`` (dimensionless).
    """
    r = jnp.asarray(positions)
    g = jnp.asarray(g)
    if r.ndim < 2 or r.shape[-1] != 3:
        raise ValueError(f"positions must have shape (..., npix, 3); got {r.shape}")
    _map_nside(r[..., 0], "positions")
    if g.shape != (3,):
        raise ValueError(f"g must be a 3-vector (shape (3,)); got shape {g.shape}")
    check_finite("g", g)
    if (velocities is None) != (K is None):
        raise ValueError(
            "velocities and K must be given together (the −3 p̂(−T)·K·g term needs both)"
        )
    dtype = jnp.result_type(_float_dtype(r), _float_dtype(g))
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
        Kg = _expand_to(Kg[..., None, :], r.ndim)  # broadcast over the pixel axis
        try:
            jnp.broadcast_shapes(Kg.shape, r.shape)
        except ValueError:
            raise ValueError(
                f"K shape {K.shape} does not match the positions' leading axes {r.shape[:-2]}"
            ) from None
        di = di - 3.0 * jnp.sum(v * jnp.broadcast_to(Kg, r.shape), axis=-1)
    return di


# ---------------------------------------------------------------------------------------------
# ensemble statistics


def mean_power_spectrum(
    maps: Float[ArrayLike, "nreal ... npix"], *, lmax: int | None = None, mask=None
) -> tuple[Float[Array, "... lmax+1"], Float[Array, "... lmax+1"]]:
    """Ensemble-averaged ⟨C_ℓ⟩ over the leading realisation axis and its standard error (ddof=1).

    The seed's Fig. 2 black/green/blue lines. Returns ``(mean, stderr)``, each ``(..., lmax+1)``.
    """
    cl = power_spectrum(maps, lmax=lmax, mask=mask)
    return _mean_and_sem(cl, "maps")


def _mean_and_sem(x: Array, name: str):
    n = x.shape[0] if x.ndim else 0
    if n < 2:
        raise ValueError(
            f"{name} needs a leading realisation axis of length >= 2; got shape {x.shape}"
        )
    mean = jnp.mean(x, axis=0)
    return mean, jnp.sqrt(jnp.var(x, axis=0, ddof=1) / n)


def standard_dipole(maps: Float[ArrayLike, "nreal ... npix"], *, mask=None) -> Float[Array, "..."]:
    """C_1 of the ensemble-averaged map (realisations on the leading axis): the seed's
    "standard diffusion" dipole (Fig. 2 magenta), i.e. ⟨r1 r2⟩ → ⟨r1⟩⟨r2⟩; compare eq. (1.1).
    """
    maps = jnp.asarray(maps)
    if maps.ndim < 2:
        raise ValueError(f"maps must have shape (nreal, ..., npix); got {maps.shape}")
    return power_spectrum(jnp.mean(maps, axis=0), lmax=1, mask=mask)[..., 1]


def noise_level(
    K: Float[ArrayLike, "... 3 3"],
    T: Float[ArrayLike, "..."],
    g: Float[ArrayLike, "3"],
    npix: int,
) -> Float[Array, "..."]:
    """Shot-noise level N = (4π/Npix) · 2T · g·K·g — the seed's (3.1).

    ``K`` ``(..., 3, 3)`` (e.g. ``(ntimes, 3, 3)``), ``T`` broadcastable to ``K``'s leading axes
    (e.g. the save times ``(ntimes,)``), ``g`` ``(3,)``. Only K's symmetric part contributes.

    (3.1) takes the whole pixel variance 2T g·K·g as white. When the low multipoles carry a sizeable
    share of it (g ∥ B0 at the seed's parameters: Ĉ_1 ≈ 11, N ≈ 0.37 at tΩ = 200, nside 8) the
    true white level is lower by that share, so Ĉ_ℓ = ⟨C_ℓ⟩ − N turns slightly negative at high ℓ
    (measured Ĉ_9 ≈ −0.3 N there). That is the seed's estimator, kept as published.
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
    T = _expand_to(T, gKg.ndim) if T.ndim <= gKg.ndim else T
    return (_FOUR_PI / npix) * 2.0 * T * gKg


class SpectrumEstimate(NamedTuple):
    """The seed's Fig. 3 quantities, each ``(..., lmax+1)``."""

    mean: Array  # ⟨C_ℓ⟩ over realisations
    noise: Array  # N (3.1), broadcast to ℓ
    estimate: Array  # Ĉ_ℓ = ⟨C_ℓ⟩ − N
    variance: Array  # variance of Ĉ_ℓ: var_realisations(C_ℓ)/nreal (N taken as exact)


def spectrum_estimator(
    cls: Float[ArrayLike, "nreal ... L"], noise: Float[ArrayLike, "..."]
) -> SpectrumEstimate:
    """Ĉ_ℓ = ⟨C_ℓ⟩ − N with its variance over realisations (seed §3, Fig. 3).

    ``cls``: per-realisation spectra, realisations on the leading axis (≥ 2). ``noise``: N from
    :func:`noise_level`, shape ``cls.shape[1:-1]`` or broadcastable to it (e.g. ``(ntimes,)``).
    The variance is that of the mean, var(C_ℓ)/nreal with ddof = 1; N's own error is neglected.
    """
    cls = jnp.asarray(cls)
    mean, sem = _mean_and_sem(cls, "cls")
    noise = jnp.asarray(noise, dtype=mean.dtype)
    if noise.ndim > mean.ndim - 1:
        raise ValueError(
            f"noise must have shape {mean.shape[:-1]} (one value per spectrum); got {noise.shape}"
        )
    noise_l = jnp.broadcast_to(_expand_to(noise, mean.ndim - 1)[..., None], mean.shape)
    return SpectrumEstimate(mean, noise_l, mean - noise_l, sem * sem)


# ---------------------------------------------------------------------------------------------
# relative diffusion


def _positions_check(positions, name="positions") -> Array:
    r = jnp.asarray(positions)
    if r.ndim < 2 or r.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., npix, 3); got {r.shape}")
    _map_nside(r[..., 0], name)
    check_finite(name, r)
    return r.astype(_float_dtype(r))


def relative_diffusion_tensor(
    positions: Float[ArrayLike, "... ntimes npix 3"], times: Float[ArrayLike, "ntimes"]
) -> tuple[Float[Array, "ntimes 3 3"], Float[Array, "ntimes 3 3"]]:
    """Relative diffusion tensor K̃_ij(T) of the seed's (2.4), averaged over all direction pairs.

    K̃_ij(T) = ⟨(r1 − r2)_i (r1 − r2)_j⟩ / (4T) over all N² ordered pixel pairs (the pixel
    quadrature of ∫dp̂1/4π ∫dp̂2/4π, self-pairs included as in the continuum integral). Computed
    exactly in O(N) memory from Σ_pairs (r1 − r2)(r1 − r2)ᵀ = 2N Σ r rᵀ − 2 (Σ r)(Σ r)ᵀ: K̃ is the
    pixel covariance of r divided by 2T (no finite-T limit is taken; the seed's (2.4) is its
    large-T value).

    Args:
        positions: r(−T; p̂) ``(..., ntimes, npix, 3)`` (Lc); every leading axis counts as a
            realisation axis and is averaged over.
        times: backtracking times T ``(ntimes,)`` (units of Lc/c), > 0.

    Returns:
        ``(K_rel, stderr)``, each ``(ntimes, 3, 3)``; the symmetric K̃ in Lc·c, and the standard
        error of the mean over realisations (ddof = 1; NaN with a single realisation).
    """
    r = _positions_check(positions)
    if r.ndim < 3:
        raise ValueError(f"positions must have shape (..., ntimes, npix, 3); got {r.shape}")
    t = jnp.asarray(times, dtype=r.dtype)
    if t.ndim != 1 or t.shape[0] != r.shape[-3]:
        raise ValueError(
            f"times must have shape ({r.shape[-3]},) to match positions; got {t.shape}"
        )
    if is_concrete(t) and not np.all(np.asarray(t) > 0):
        raise ValueError(f"times must be > 0 (allowed range: (0, inf)); got {times!r}")
    r = jnp.reshape(r, (-1,) + r.shape[-3:])
    dr = r - jnp.mean(r, axis=-2, keepdims=True)  # centred: the identity without cancellation
    cov = jnp.einsum("...ni,...nj->...ij", dr, dr) / r.shape[-2]
    k_rel = cov / (2.0 * t)[None, :, None, None]
    mean = jnp.mean(k_rel, axis=0)
    n = k_rel.shape[0]
    if n < 2:
        return mean, jnp.full_like(mean, jnp.nan)
    return mean, jnp.sqrt(jnp.var(k_rel, axis=0, ddof=1) / n)


class BinnedDispersion(NamedTuple):
    """⟨Δr_i Δr_j⟩ of pixel pairs binned in their separation x = p̂1·p̂2."""

    edges: Array  # (nbins+1,) bin edges in x
    mean: Array  # (..., nbins, 3, 3) mean of (r1 − r2)(r1 − r2)ᵀ over a bin's pairs; NaN if empty
    counts: Array  # (nbins,) number of ordered pairs (self-pairs excluded)


@functools.partial(jax.jit, static_argnums=(3, 4))
def _binned_sums(r, d, edges, nbins: int, chunk: int):
    # r: (npix, B, 3) centred positions; d: (npix, 3) pixel directions.
    npix, B, _ = r.shape
    q = jnp.einsum("nbi,nbj->nbij", r, r)
    z = jnp.concatenate(
        [
            jnp.ones((npix, 1), r.dtype),
            jnp.reshape(r, (npix, 3 * B)),
            jnp.reshape(q, (npix, 9 * B)),
        ],
        axis=1,
    )
    nchunks = -(-npix // chunk)
    pad = nchunks * chunk - npix
    rows_d = jnp.pad(d, ((0, pad), (0, 0)))
    rows_r = jnp.pad(r, ((0, pad), (0, 0), (0, 0)))
    rows_w = jnp.pad(jnp.ones((npix,), r.dtype), (0, pad))
    lo, hi = edges[0], edges[-1]

    def onehot(x):
        idx = jnp.clip(jnp.searchsorted(edges, x, side="right") - 1, 0, nbins - 1)
        inside = (x >= lo) & (x <= hi)
        bins = _expand_to(jnp.arange(nbins), idx.ndim + 1)
        return ((idx[..., None] == bins) & inside[..., None]).astype(r.dtype)

    def body(carry, k):
        tot, cnt = carry
        sl = k * chunk
        di = jax.lax.dynamic_slice_in_dim(rows_d, sl, chunk)
        ri = jax.lax.dynamic_slice_in_dim(rows_r, sl, chunk)
        wi = jax.lax.dynamic_slice_in_dim(rows_w, sl, chunk)
        x = jnp.clip(di @ d.T, -1.0, 1.0)  # (c, npix)
        h = onehot(x)  # (c, npix, nbins)
        s = jnp.einsum("cnb,nk->cbk", h, z)  # one GEMM: pair counts, Σ r_j, Σ r_j r_jᵀ per bin
        n_ib = s[..., 0]
        s1 = jnp.reshape(s[..., 1 : 1 + 3 * B], (chunk, nbins, B, 3))
        s2 = jnp.reshape(s[..., 1 + 3 * B :], (chunk, nbins, B, 3, 3))
        # Σ_{j∈bin} (r_i − r_j)(r_i − r_j)ᵀ = n r_i r_iᵀ − r_i S1ᵀ − S1 r_iᵀ + S2
        rr = jnp.einsum("cbi,cbj->cbij", ri, ri)
        cross = jnp.einsum("cbi,cnbj->cnbij", ri, s1)
        term = (
            n_ib[:, :, None, None, None] * rr[:, None]
            - cross
            - jnp.swapaxes(cross, -1, -2)
            + s2
        )
        tot = tot + jnp.einsum("c,cnbij->bnij", wi, term)
        self_bin = onehot(jnp.clip(jnp.sum(di * di, axis=-1), -1.0, 1.0))  # x_ii = 1: not a pair
        cnt = cnt + wi @ n_ib - wi @ self_bin
        return (tot, cnt), None

    init = (jnp.zeros((B, nbins, 3, 3), r.dtype), jnp.zeros((nbins,), r.dtype))
    (tot, cnt), _ = jax.lax.scan(body, init, jnp.arange(nchunks))
    return tot, cnt


def binned_relative_dispersion(
    positions: Float[ArrayLike, "... npix 3"],
    *,
    bins: int | Float[ArrayLike, "nb1"] = 10,
    chunk_size: int | None = None,
) -> BinnedDispersion:
    """⟨Δr_i Δr_j⟩ = ⟨(r1 − r2)_i (r1 − r2)_j⟩ over pixel pairs binned in x = p̂1·p̂2 (seed (2.4)).

    Dividing by 4T gives the separation-resolved relative diffusion tensor; the count-weighted sum
    over bins divided by Npix² equals 4T·K̃ of :func:`relative_diffusion_tensor` (self-pairs add 0).

    Args:
        positions: r(−T; p̂_i) ``(..., npix, 3)`` on the HEALPix grid (RING); leading axes are kept.
        bins: number of equal-width bins in x ∈ [−1, 1] (equal solid angle of separation), or
            increasing edges ``(nbins+1,)`` within [−1, 1]; pairs outside the edges are dropped.
        chunk_size: pixel rows per step (memory ∝ chunk_size·Npix·nbins); default keeps each
            step's temporaries near 32 MB, so nside 32 fits easily.

    Returns:
        :class:`BinnedDispersion` (edges, mean ``(..., nbins, 3, 3)``, counts ``(nbins,)``).

    Cost: one (chunk·nbins × Npix) @ (Npix × (1 + 12·B)) product per chunk, B = number of maps
    (leading axes), i.e. O(Npix²·nbins·B); the pair one-hot is shared by all B maps, so batch them.
    Measured ~30 s for 2 maps at nside 32 with 20 bins on a loaded 2-core CPU.
    """
    r = _positions_check(positions)
    npix = r.shape[-2]
    nside = npix_to_nside(npix)
    if isinstance(bins, numbers.Integral) and not isinstance(bins, bool):
        check_int_at_least("bins", bins, 1)
        edges = np.linspace(-1.0, 1.0, int(bins) + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if (
            edges.ndim != 1
            or edges.size < 2
            or not np.all(np.isfinite(edges))
            or np.any(np.diff(edges) <= 0)
            or edges[0] < -1.0
            or edges[-1] > 1.0
        ):
            raise ValueError(
                "bins must be an integer >= 1 or strictly increasing edges within [-1, 1]; "
                f"got {bins!r}"
            )
    nbins = edges.size - 1
    batch = r.shape[:-2]
    rb = jnp.moveaxis(jnp.reshape(r, (-1, npix, 3)), 0, 1)  # (npix, B, 3)
    rb = rb - jnp.mean(rb, axis=0, keepdims=True)  # differences are translation invariant
    nb = rb.shape[1]
    if chunk_size is None:
        budget = 2**22  # elements (32 MB in float64) per temporary
        chunk_size = max(1, min(npix, budget // (nbins * npix), budget // (nbins * (1 + 12 * nb))))
    check_int_at_least("chunk_size", chunk_size, 1)
    d = healpix_directions(nside, dtype=r.dtype)
    tot, cnt = _binned_sums(rb, d, jnp.asarray(edges, dtype=r.dtype), nbins, int(chunk_size))
    safe = jnp.where(cnt > 0, cnt, 1.0)
    mean = jnp.where((cnt > 0)[None, :, None, None], tot / safe[None, :, None, None], jnp.nan)
    mean = jnp.reshape(mean, batch + (nbins, 3, 3))
    return BinnedDispersion(jnp.asarray(edges, dtype=r.dtype), mean, cnt)


# ---------------------------------------------------------------------------------------------
# sum rules


def parseval(
    maps: Float[ArrayLike, "... npix"], *, lmax: int | None = None, mask=None
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
    harmonic = jnp.sum(_expand_to(2.0 * ell + 1.0, cl.ndim) * cl, axis=-1) / _FOUR_PI
    m = maps.astype(cl.dtype)
    if mask is not None:
        mk = _expand_to(jnp.asarray(mask, dtype=cl.dtype), m.ndim)
        shape = jnp.broadcast_shapes(m.shape, mk.shape)
        m = jnp.broadcast_to(m, shape) * jnp.broadcast_to(mk, shape)
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
    mean_cls: Float[ArrayLike, "... L"],
    K: Float[ArrayLike, "... 3 3"],
    K_rel: Float[ArrayLike, "... 3 3"],
    T: Float[ArrayLike, "..."],
    g: Float[ArrayLike, "3"],
    *,
    npix: int,
    noise: Float[ArrayLike, "..."] | None = None,
) -> SumRules:
    """The seed's sum rules (2.5)–(2.7) for ensemble averages, both sides.

    (2.5) (1/4π) Σ_{ℓ≥0} (2ℓ+1)⟨C_ℓ⟩ ≃ 2T K_ij g_i g_j, (2.6) ⟨C_0⟩/4π ≃ 2T (K − K̃)_ij g_i g_j,
    (2.7) (1/4π) Σ_{ℓ≥1} (2ℓ+1)⟨C_ℓ⟩ ≃ 2T K̃_ij g_i g_j, with K = ⟨r rᵀ⟩/2T (direction-averaged,
    e.g. ``crjax.transport.diffusion_tensor``) and K̃ from :func:`relative_diffusion_tensor` at the
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
    weighted = _expand_to(2.0 * ell + 1.0, cl.ndim) * cl / _FOUR_PI
    lhs0 = weighted[..., 0]
    lhs1 = jnp.sum(weighted[..., 1:], axis=-1)
    if noise is None:
        above = jnp.zeros_like(lhs0)
    else:
        above = jnp.asarray(noise, dtype=cl.dtype) * max(npix - L * L, 0) / _FOUR_PI
        above = jnp.broadcast_to(_expand_to(above, lhs0.ndim), lhs0.shape)
    T = jnp.asarray(T, dtype=cl.dtype)
    two_t = 2.0 * _expand_to(T, K.ndim - 2) if T.ndim <= K.ndim - 2 else 2.0 * T
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
