"""Running diffusion tensor from backtracked positions (physics.md §1, §7; seed §2–3).

    K_ij(T) = ⟨r_i r_j⟩(T) / (2T),

averaged over the initial directions (and over field realisations where there are several);
K_∥ = b̂·K·b̂, K_⊥ = (tr K − K_∥)/2, mean free path λ = 3K/v. The relative diffusion tensor K̃ of
(2.4) lives in ``crjax.angular``. Also a finite-time Lyapunov exponent estimate (physics.md §8).
"""

from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float

from ._checks import check_positive

__all__ = [
    "diffusion_tensor",
    "diffusion_tensor_from_moments",
    "mean_free_path",
    "parallel_perpendicular",
    "second_moments",
]


def _outer_mean(positions):
    """Direction average of r_i r_j: (..., npix, 3) -> (..., 3, 3)."""
    return jnp.einsum("...ni,...nj->...ij", positions, positions) / positions.shape[-2]


def second_moments(positions: Float[Array, "... ntimes npix 3"]) -> Float[Array, "... ntimes 3 3"]:
    """⟨r_i r_j⟩ over directions (the pixel axis −2), keeping all leading axes.

    A ready-made per-realisation reducer summary for ``run_ensemble``: e.g.
    ``reducer=lambda tr: second_moments(tr.positions)`` gives (c, ntimes, 3, 3) per chunk.
    """
    _check_positions(positions, min_ndim=2)
    return _outer_mean(positions)


def _check_positions(positions, min_ndim):
    if positions.ndim < min_ndim or positions.shape[-1] != 3:
        raise ValueError(
            f"positions must have shape (..., ntimes, npix, 3) with at least {min_ndim} axes; "
            f"got shape {positions.shape}"
        )


def _over_2t(m, times):
    times = jnp.asarray(times, m.dtype)
    if times.ndim != 1 or times.shape[0] != m.shape[-3]:
        raise ValueError(
            f"times must have shape (ntimes,) = ({m.shape[-3]},) matching the positions; "
            f"got shape {times.shape}"
        )
    check_positive("times", times)
    return m / (2.0 * times)[:, None, None]


def diffusion_tensor(
    positions: Float[Array, "... ntimes npix 3"], times: Float[Array, " ntimes"]
) -> tuple[Float[Array, "ntimes 3 3"], Float[Array, "ntimes 3 3"]]:
    """Running diffusion tensor K_ij(T) = ⟨r_i r_j⟩/(2T) and its standard error (physics.md §1).

    Args:
        positions: r(−T; p̂) of shape (ntimes, npix, 3) for one realisation, or
            (nreal, ntimes, npix, 3) (any number of leading realisation axes, flattened).
        times: (ntimes,) backtracking times T > 0.

    Returns:
        (K, K_err), each (ntimes, 3, 3). With ≥ 2 realisations K_err is the standard error of the
        mean over realisations (each realisation's direction-average is one independent sample).
        With a single realisation it is the standard error over directions, std(r_i r_j)/√npix,
        which treats directions as independent: trajectories of neighbouring directions are
        correlated (strongly at early times, through the shared field always), so this is a
        lower bound on the true ensemble error.
    """
    positions = jnp.asarray(positions)
    _check_positions(positions, min_ndim=3)
    if positions.ndim == 3:
        rr = positions[..., :, None] * positions[..., None, :]  # (ntimes, npix, 3, 3)
        npix = positions.shape[-2]
        m = jnp.mean(rr, axis=1)
        err = jnp.std(rr, axis=1, ddof=1) / jnp.sqrt(npix) if npix > 1 else jnp.zeros_like(m)
        return _over_2t(m, times), _over_2t(err, times)
    moments = _outer_mean(positions.reshape((-1,) + positions.shape[-3:]))
    return diffusion_tensor_from_moments(moments, times)


def diffusion_tensor_from_moments(
    moments: Float[Array, "nreal ntimes 3 3"], times: Float[Array, " ntimes"]
) -> tuple[Float[Array, "ntimes 3 3"], Float[Array, "ntimes 3 3"]]:
    """K and its standard error over realisations from per-realisation ⟨r_i r_j⟩ (``second_moments``).

    ``moments`` (nreal, ntimes, 3, 3); for nreal = 1 the error is returned as NaN (unknown).
    """
    moments = jnp.asarray(moments)
    if moments.ndim != 4 or moments.shape[-2:] != (3, 3):
        raise ValueError(
            f"moments must have shape (nreal, ntimes, 3, 3); got shape {moments.shape}"
        )
    n = moments.shape[0]
    m = jnp.mean(moments, axis=0)
    if n >= 2:
        err = jnp.std(moments, axis=0, ddof=1) / jnp.sqrt(n)
    else:
        err = jnp.full_like(m, jnp.nan)
    return _over_2t(m, times), _over_2t(err, times)


def parallel_perpendicular(
    K: Float[Array, "... 3 3"], b0_direction: Float[Array, 3]
) -> tuple[Float[Array, ...], Float[Array, ...]]:
    """K_∥ = b̂·K·b̂ and K_⊥ = (tr K − K_∥)/2 for the regular-field direction b̂ (normalised here).

    Works on any leading axes of K (..., 3, 3) (e.g. times, realisations). For errors, apply it to
    per-realisation tensors and take their spread (it is linear in K).
    """
    K = jnp.asarray(K)
    if K.shape[-2:] != (3, 3):
        raise ValueError(f"K must have shape (..., 3, 3); got shape {K.shape}")
    b = jnp.asarray(b0_direction, K.dtype)
    if b.shape != (3,):
        raise ValueError(f"b0_direction must have shape (3,); got shape {b.shape}")
    check_positive("|b0_direction|", jnp.linalg.norm(b))
    b = b / jnp.linalg.norm(b)
    k_par = jnp.einsum("i,...ij,j->...", b, K, b)
    k_perp = 0.5 * (jnp.trace(K, axis1=-2, axis2=-1) - k_par)
    return k_par, k_perp


def mean_free_path(K: Float[Array, ...], v: float = 1.0) -> Float[Array, ...]:
    """λ = 3K/v (physics.md §1), units of Lc for K in Lc·c."""
    return 3.0 * jnp.asarray(K) / v

