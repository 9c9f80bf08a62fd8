"""Chaos of cosmic-ray trajectories: the finite-time Lyapunov exponent (docs/physics.md §8).

Nearby trajectories in a turbulent field separate like e^{λ_L T} once chaotic; this bounds the
horizon of useful pathwise gradients (∂r/∂θ ~ e^{λ_L T}).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, ArrayLike, Float, PyTree

from ._checks import check_open_interval, check_positive
from .backtracking import backtrack, unit_vectors
from .engine import TimesLike, VectorsLike

__all__ = ["lyapunov_exponent"]


def lyapunov_exponent(
    field: PyTree,
    directions: VectorsLike,
    times: TimesLike,
    *,
    rL: ArrayLike,
    delta: float = 1e-9,
    key: ArrayLike | None = None,
    **backtrack_kwargs,
) -> Float[Array, " ntimes"]:
    """Finite-time Lyapunov exponent λ_L(T) = ⟨ln(|δr(T)|/δ)⟩/T (docs/physics.md §8), units 1/(Lc/c).

    Pairs of trajectories whose initial directions differ by a random perpendicular rotation of
    angle ``delta`` (in (0, 0.1): a linearised perturbation) are backtracked together; the
    phase-space separation |δr| + |δp̂|·rL (lengths, rL converts the direction part) grows like
    e^{λ_L T} once chaotic. Keep δ·e^{λ_L T} ≪ rL (fp64) so the pair stays in the linear regime.
    Returns λ_L at each save time, averaged over directions. ``backtrack_kwargs``: ``b_ref``,
    ``engine`` and engine settings (``dt``, ``solver``, ...) as in ``crjax.backtracking.backtrack``.
    """
    check_open_interval("delta", delta, 0.0, 0.1)
    check_positive("rL", rL)
    p = unit_vectors("directions", directions, jnp.result_type(float))
    key = jax.random.PRNGKey(0) if key is None else key
    # A random direction perpendicular to each p̂: the perturbation.
    u = jax.random.normal(key, p.shape, p.dtype)
    u = u - jnp.sum(u * p, axis=-1, keepdims=True) * p
    u = u / jnp.linalg.norm(u, axis=-1, keepdims=True)
    q = p * jnp.cos(delta) + u * jnp.sin(delta)
    both = backtrack(field, jnp.concatenate([p, q]), times, rL=rL, **backtrack_kwargs)
    n = p.shape[0]
    dr = jnp.linalg.norm(both.positions[:, :n] - both.positions[:, n:], axis=-1)
    dv = jnp.linalg.norm(both.velocities[:, :n] - both.velocities[:, n:], axis=-1)
    sep = dr + rL * dv
    d0 = rL * delta  # initial separation in the same metric
    t = jnp.asarray(both.times)
    return jnp.mean(jnp.log(sep / d0), axis=-1) / t
