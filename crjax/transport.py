"""Running diffusion tensor from backtracked positions (physics.md §1, §7; seed §2–3).

    K_ij(T) = ⟨r_i r_j⟩(T) / (2T),

averaged over the initial directions (and over field realisations where there are several);
K_∥ = b̂·K·b̂, K_⊥ = (tr K − K_∥)/2, mean free path λ = 3K/v; and the relative diffusion tensor
K̃ of (2.4), over all direction pairs and resolved in their separation. The finite-time Lyapunov
exponent lives in ``crjax.chaos``.
"""

from __future__ import annotations

import functools
import numbers
from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float

from ._checks import check_finite, check_int_at_least, check_positive, is_concrete
from ._sht import expand_to, float_dtype, map_nside
from .sky import healpix_directions, npix_to_nside

__all__ = [
    "BinnedDispersion",
    "binned_relative_dispersion",
    "diffusion_tensor",
    "diffusion_tensor_from_moments",
    "mean_free_path",
    "parallel_perpendicular",
    "relative_diffusion_tensor",
    "second_moments",
]


def _outer_mean(positions):
    """Direction average of r_i r_j: (..., npix, 3) -> (..., 3, 3)."""
    return jnp.einsum("...ni,...nj->...ij", positions, positions) / positions.shape[-2]


def second_moments(positions: ArrayLike) -> Float[Array, "... ntimes 3 3"]:
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
    positions: ArrayLike, times: ArrayLike
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
    moments: ArrayLike, times: ArrayLike
) -> tuple[Float[Array, "ntimes 3 3"], Float[Array, "ntimes 3 3"]]:
    """K and its standard error over realisations from per-realisation ⟨r_i r_j⟩
    (``second_moments``).

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
    K: ArrayLike, b0_direction: ArrayLike | Sequence[float | int]
) -> tuple[Float[Array, "..."], Float[Array, "..."]]:
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


def mean_free_path(K: ArrayLike, v: float = 1.0) -> Float[Array, "..."]:
    """λ = 3K/v (physics.md §1), units of Lc for K in Lc·c."""
    return 3.0 * jnp.asarray(K) / v


# ---------------------------------------------------------------------------------------------
# relative diffusion (2.4)


def _positions_check(positions, name="positions") -> Array:
    r = jnp.asarray(positions)
    if r.ndim < 2 or r.shape[-1] != 3:
        raise ValueError(f"{name} must have shape (..., npix, 3); got {r.shape}")
    map_nside(r[..., 0], name)
    check_finite(name, r)
    return r.astype(float_dtype(r))


def relative_diffusion_tensor(
    positions: ArrayLike, times: ArrayLike
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
        bins = expand_to(jnp.arange(nbins), idx.ndim + 1)
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
    positions: ArrayLike,
    *,
    bins: int | ArrayLike | Sequence[float | int] = 10,
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
