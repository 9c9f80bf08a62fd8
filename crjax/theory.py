"""Analytic predictions: the BGK-like steady-state spectrum (seed §4) and the standard dipole (1.1).

The asymptotic ensemble-averaged spectrum of the relative intensity is (4.7)

    ⟨C_ℓ⟩ = (3/2) Q1 / (ℓ(ℓ+1)) ∫_{-1}^{1} dx x P_ℓ(x) / ν_r(x),     Q1 = K_ij ∂_i n ∂_j n / (6π),

the inverse of the forward relation (4.6). For the seed's model ν_r(x) = ν0 (1−x)^p, 0 < p < 1,
the integral has the closed form (Gradshteyn–Ryzhik 7.127 with parity; physics.md §5)

    I_ℓ(p) = ∫ x P_ℓ(x) (1−x)^(−p) dx
           = 2^(1−p) Γ(1−p)/Γ(p) · Γ(ℓ+p−1)/Γ(ℓ+3−p) · [ℓ(ℓ+1) − p(1−p)],

which we evaluate with ``gammaln`` (stable for ℓ of many thousands, differentiable in p), so that
C_ℓ ∝ I_ℓ/(ℓ(ℓ+1)) ∝ ℓ^(2p−4) at large ℓ.

The monopole. For ℓ = 0 the prefactor 1/(ℓ(ℓ+1)) of (4.7) is singular: in (4.6) the k = 0 term
carries the factor k(k+1) = 0, so the BGK relation does not determine ⟨C_0⟩ at all. All functions
here therefore accept ℓ ≥ 1 only and raise ``ValueError`` for ℓ = 0 (with a traced ℓ under ``jit``
no check is possible and ℓ = 0 yields inf/nan). For ℓ ≥ 1 every Γ argument is positive
(ℓ+p−1 ≥ p > 0) and ℓ(ℓ+1) − p(1−p) ≥ 2 − 1/4 > 0, so no sign bookkeeping is needed.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln
from jaxtyping import Array, ArrayLike, Float
from scipy import special as _sp

from ._checks import (
    check_finite,
    check_int_at_least,
    check_open_interval,
    check_positive,
    is_concrete,
)

__all__ = [
    "bgk_amplitude",
    "bgk_integral",
    "bgk_spectrum",
    "diffusion_dipole",
    "diffusion_dipole_vector",
    "source_from_spectrum",
    "spectrum_from_nu",
]


def _check_ell(ell) -> None:
    """ℓ must be integers ≥ 1 (the BGK relation leaves the monopole undetermined, see module doc)."""
    if not is_concrete(ell):
        return
    e = np.asarray(ell)
    if e.size == 0:
        raise ValueError(
            "ell must contain at least one multipole (integers >= 1); got an empty array"
        )
    if not np.all(np.isfinite(e)) or not np.all(e == np.round(e)) or not np.all(e >= 1):
        raise ValueError(
            "ell must be integers >= 1 (eq. 4.7 is singular at ell = 0: the BGK relation (4.6) "
            f"does not determine the monopole); got {ell!r}"
        )


def _check_p(p) -> None:
    check_open_interval("p", p, 0.0, 1.0)


def _gammaln_stack(*args):
    """gammaln of several broadcast arguments through ONE gammaln call: every gammaln call site adds its
    own series expansion (and, under jax.hessian, a polygamma one) to the compiled program, so stacking
    keeps compiles of gradients/Hessians of fits short."""
    shape = jnp.broadcast_shapes(*(jnp.shape(a) for a in args))
    vals = gammaln(jnp.stack([jnp.broadcast_to(a, shape) for a in args]))
    return tuple(vals[i] for i in range(len(args)))


@jax.jit
def _shape_core(ell, p):
    ell, p = _as_float(ell, p)
    # ℓ = 1 reference: I_1 ∝ Γ(p)/Γ(4−p)·(2 − p(1−p)) and ℓ(ℓ+1) = 2
    g_a, g_b, g_p, g_4p = _gammaln_stack(ell + p - 1.0, ell + 3.0 - p, p, 4.0 - p)
    pp = p * (1.0 - p)
    log_shape = (
        g_a
        - g_b
        + jnp.log(ell * (ell + 1.0) - pp)
        - jnp.log(ell * (ell + 1.0))
        - (g_p - g_4p + jnp.log(2.0 - pp) - jnp.log(2.0))
    )
    # XLA may reassociate the log-gamma sums; pin the normalisation point to exactly 1
    return jnp.where(ell == 1.0, 1.0, jnp.exp(log_shape))


@jax.jit
def _integral_core(ell, p):
    ell, p = _as_float(ell, p)
    g_a, g_b, g_1p, g_p = _gammaln_stack(ell + p - 1.0, ell + 3.0 - p, 1.0 - p, p)
    log_pref = (1.0 - p) * jnp.log(2.0) + g_1p - g_p
    return jnp.exp(log_pref + g_a - g_b + jnp.log(ell * (ell + 1.0) - p * (1.0 - p)))


def _as_float(ell, p):
    ell = jnp.asarray(ell)
    p = jnp.asarray(p)
    dtype = jnp.result_type(p.dtype if jnp.issubdtype(p.dtype, jnp.floating) else float, float)
    return ell.astype(dtype), p.astype(dtype)


def bgk_integral(ell: ArrayLike, p: ArrayLike) -> Float[Array, "*batch"]:
    """I_ℓ(p) = ∫_{-1}^{1} x P_ℓ(x) (1−x)^(−p) dx in closed form (the integral of (4.7), ν0 = 1).

    ``ell``: integers ≥ 1 (any shape); ``p`` ∈ (0, 1), broadcast against ``ell``. Dimensionless.
    """
    _check_ell(ell)
    _check_p(p)
    return _integral_core(ell, p)


def bgk_spectrum(ell: ArrayLike, p: ArrayLike) -> Float[Array, "*batch"]:
    """Shape C_ℓ/C_1 of the BGK-like steady-state spectrum (4.7) with ν_r ∝ (1−x)^p.

    Exactly 1 at ℓ = 1; ∝ ℓ^(2p−4) at large ℓ. ``ell``: integers ≥ 1 (any shape, thousands are fine);
    ``p`` ∈ (0, 1) broadcast against ``ell``. Differentiable in ``p`` (grad, vmap); the p-dependent
    prefactor of I_ℓ cancels in the ratio, so the log-gamma differences stay O(ℓ log ℓ) at worst.
    """
    _check_ell(ell)
    _check_p(p)
    return _shape_core(ell, p)


def bgk_amplitude(
    ell: ArrayLike, p: ArrayLike, Q1: ArrayLike, nu0: ArrayLike
) -> Float[Array, "*batch"]:
    """⟨C_ℓ⟩ of (4.7) with ν_r(x) = ν0 (1−x)^p: (3/2) Q1 I_ℓ(p) / (ℓ(ℓ+1) ν0).

    ``Q1 = K_ij ∂_i n ∂_j n/(6π)`` (units of Q1 / ν0 set the units of C_ℓ; with K in Lc·c and
    ∇n/n in 1/Lc both are rates and C_ℓ is dimensionless), ``nu0 > 0`` the relative-scattering rate
    scale. Since ν0 is unknown in practice the *shape* (``bgk_spectrum``) is the prediction.
    """
    _check_ell(ell)
    _check_p(p)
    check_positive("nu0", nu0)
    ell_f, _ = _as_float(ell, p)
    return (
        1.5 * jnp.asarray(Q1) * _integral_core(ell, p) / (ell_f * (ell_f + 1.0) * jnp.asarray(nu0))
    )


def _legendre_table(ells: np.ndarray, x: np.ndarray) -> np.ndarray:
    """P_ℓ(x) for integer ℓ (shape (nell,)) at nodes x (shape (n,)) by the three-term recurrence."""
    lmax = int(ells.max())
    p_prev, p_cur = np.ones_like(x), x.copy()
    table = np.empty((lmax + 1, x.size))
    table[0] = p_prev
    if lmax >= 1:
        table[1] = p_cur
    for ell in range(1, lmax):
        p_prev, p_cur = p_cur, ((2 * ell + 1) * x * p_cur - ell * p_prev) / (ell + 1)
        table[ell + 1] = p_cur
    return table[ells]


def _jacobi_rule(n_nodes: int, endpoint_exponent: float) -> tuple[np.ndarray, np.ndarray]:
    """Gauss–Jacobi nodes/weights for ∫_{-1}^{1} (1−x)^(−q) f(x) dx, exact for polynomial f of degree < 2n."""
    if endpoint_exponent == 0.0:
        return np.polynomial.legendre.leggauss(n_nodes)
    a, n = -endpoint_exponent, n_nodes
    x, _ = _sp.roots_jacobi(n, a, 0.0)
    # scipy's Golub–Welsch weights lose ~1e-13 relative accuracy at n ~ 100, which the cancellation in
    # ∫ x P_ℓ (1−x)^(−q) amplifies to ~1e-10; Newton-polishing the nodes and using the closed-form
    # weights (Szegő 15.3.5) brings the quadrature back to ~1e-12.
    for _ in range(3):
        x = x - _sp.eval_jacobi(n, a, 0.0, x) / (
            0.5 * (n + a + 1) * _sp.eval_jacobi(n - 1, a + 1, 1.0, x)
        )
    dp = 0.5 * (n + a + 1) * _sp.eval_jacobi(n - 1, a + 1, 1.0, x)
    # with β = 0 the Gamma-function prefactor Γ(n+α+1)Γ(n+1)/(Γ(n+α+1) n!) is 1
    w = 2.0 ** (a + 1.0) / ((1.0 - x * x) * dp * dp)
    return x, w


def spectrum_from_nu(
    ell: ArrayLike,
    nu_r: Callable[[Float[Array, " n"]], Float[Array, " n"]],
    *,
    Q1: ArrayLike = 1.0,
    endpoint_exponent: float = 0.0,
    n_nodes: int | None = None,
) -> Float[Array, " nell"]:
    """⟨C_ℓ⟩ of (4.7) for a user-supplied relative scattering rate ν_r(x), by Gauss–Jacobi quadrature.

    ``nu_r`` maps opening-angle cosines x (1-D array in (−1, 1)) to ν_r(x) > 0; it may close over traced
    parameters, so the result is differentiable in them. ν_r vanishes at x = 1 (trajectories along the
    same direction never decorrelate), making 1/ν_r singular there. Give its order as
    ``endpoint_exponent`` q ∈ [0, 1), i.e. ν_r(x) ~ (1−x)^q near x = 1: the rule then carries the weight
    (1−x)^(−q) exactly and only the smooth part (1−x)^q/ν_r(x) is sampled — exact (to round-off) for
    ν_r = ν0 (1−x)^q with n_nodes ≥ ℓmax/2 + 1. ``ell``: concrete integers ≥ 1, shape (nell,).
    ``n_nodes`` (static) defaults to ℓmax + 64. Returns ⟨C_ℓ⟩ with the given ``Q1``, shape (nell,).
    """
    if not is_concrete(ell):
        raise ValueError(
            "ell must be concrete integers >= 1 for spectrum_from_nu (it sets the quadrature)"
        )
    _check_ell(ell)
    ells = np.atleast_1d(np.asarray(ell)).astype(np.int64)
    if ells.ndim != 1:
        raise ValueError(f"ell must be a 1-D array of multipoles; got shape {ells.shape}")
    q = float(endpoint_exponent)
    if not (0.0 <= q < 1.0):
        raise ValueError(f"endpoint_exponent must lie in [0, 1); got {endpoint_exponent!r}")
    if n_nodes is None:
        n_nodes = int(ells.max()) + 64
    check_int_at_least("n_nodes", n_nodes, 2)
    x, w = _jacobi_rule(n_nodes, q)
    # x P_ℓ(x) w_j: a concrete (nell, n) matrix; only ν_r(x) at the nodes is traced.
    kernel = jnp.asarray(_legendre_table(ells, x) * (x * w)[None, :])
    xj = jnp.asarray(x)
    nu = jnp.asarray(nu_r(xj))
    if nu.shape != xj.shape:
        raise ValueError(f"nu_r must map x of shape {xj.shape} to the same shape; got {nu.shape}")
    check_finite("nu_r(x)", nu)
    smooth = jnp.power(1.0 - xj, q) / nu
    ell_f = jnp.asarray(ells, dtype=kernel.dtype)
    return 1.5 * jnp.asarray(Q1) / (ell_f * (ell_f + 1.0)) * (kernel @ smooth)


def source_from_spectrum(
    ell_out: ArrayLike,
    cl: Float[ArrayLike, " nk"],
    nu_r: Callable[[Float[Array, " n"]], Float[Array, " n"]],
    *,
    monopole_weight: ArrayLike = 0.0,
    n_nodes: int | None = None,
) -> Float[Array, " nout"]:
    """Right-hand side of the forward relation (4.6): Σ_k c_k (2k+1)/2 ∫ ν_r P_ℓ P_k dx, c_k = k(k+1)⟨C_k⟩.

    ``cl``: ⟨C_k⟩ for k = 0..K (index = k; its k = 0 entry is multiplied by k(k+1) = 0), ``ell_out``:
    concrete integers ≥ 0. ``monopole_weight`` sets c_0 directly. Why it exists: (4.7) is the exact
    inverse of (4.6) for *all* ℓ ≥ 0 only if c_0 = (3/2) Q1 ∫ x dx/ν_r (the ℓ → 0 limit of ℓ(ℓ+1)⟨C_ℓ⟩
    from (4.7), nonzero); with c_0 = 0 the ℓ = 0 and ℓ = 1 rows of (4.6) are off by
    (c_0/2)∫ν_r P_ℓ dx. So (4.6) with the seed's (4.7) spectrum returns Q1 δ_ℓ1 as K → ∞ when that
    c_0 is supplied (the truncated series converges slowly because 1/ν_r is singular at x = 1).
    Gauss–Legendre with ``n_nodes`` (default 2·max(K, ℓ) + 64) nodes; differentiable in ``cl`` and ν_r.
    """
    cl = jnp.asarray(cl)
    if cl.ndim != 1 or cl.shape[0] < 2:
        raise ValueError(f"cl must be a 1-D array over k = 0..K with K >= 1; got shape {cl.shape}")
    eo = np.atleast_1d(np.asarray(ell_out)).astype(np.int64)
    if eo.ndim != 1 or np.any(eo < 0):
        raise ValueError(f"ell_out must be a 1-D array of integers >= 0; got {ell_out!r}")
    kmax = cl.shape[0] - 1
    if n_nodes is None:
        n_nodes = 2 * max(kmax, int(eo.max())) + 64
    check_int_at_least("n_nodes", n_nodes, 2)
    x, w = np.polynomial.legendre.leggauss(n_nodes)
    k = np.arange(kmax + 1)
    nu = jnp.asarray(nu_r(jnp.asarray(x)))
    c = cl * jnp.asarray(k * (k + 1.0))
    c = c.at[0].set(jnp.asarray(monopole_weight, dtype=c.dtype))
    h = (c * jnp.asarray((2 * k + 1) / 2.0)) @ jnp.asarray(_legendre_table(k, x))
    return jnp.asarray(_legendre_table(eo, x) * w[None, :]) @ (nu * h)


def diffusion_dipole_vector(K: ArrayLike, g: ArrayLike) -> Float[Array, " 3"]:
    """Dipole vector a of standard diffusion, δI(p̂) = a·p̂ with a = −3 K g (from (2.1): 4π⟨f⟩ = n − 3p̂·K∇n).

    ``K`` (3, 3) diffusion tensor [Lc c], ``g = ∇n/n`` (3,) [1/Lc]; p̂ is the momentum direction (pixel
    convention of crjax). Dimensionless.
    """
    K = jnp.asarray(K)
    g = jnp.asarray(g)
    if K.shape[-2:] != (3, 3) or g.shape[-1:] != (3,):
        raise ValueError(
            f"K must have shape (..., 3, 3) and g (..., 3); got {K.shape} and {g.shape}"
        )
    return -3.0 * jnp.einsum("...ij,...j->...i", K, g)


def diffusion_dipole(K: ArrayLike, g: ArrayLike) -> Float[Array, ""]:
    """Dipole power of standard diffusion, eq. (1.1): C_1 = 4π |K g|²  (g = ∇n/n).

    Relation to a pixel map: a map δI = a·p̂ has C_1 = (4π/9)|a|² (since ∫(a·p̂)² dΩ = 4π|a|²/3 =
    Σ(2ℓ+1)C_ℓ = 3C_1); with a = −3Kg (``diffusion_dipole_vector``) this is exactly (1.1). The seed's
    "standard dipole" (Fig. 2, magenta) is the C_1 of the ensemble-averaged map, ⟨r(−T)⟩·g → −3p̂·Kg at
    late times, i.e. this value. Shapes: K (..., 3, 3), g (..., 3) → (...).
    """
    a = diffusion_dipole_vector(K, g)
    return (4.0 * jnp.pi / 9.0) * jnp.sum(a * a, axis=-1)
