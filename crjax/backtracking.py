"""Backtracking cosmic rays through a magnetic field realisation (seed §3, docs/physics.md §3).

Sign convention (tested in ``tests/test_backtracking.py``): a cosmic ray observed at Earth (x = 0,
t = 0) with momentum direction p̂ was at position r(−T; p̂) with momentum direction p̂(−T) a time T
earlier. Integrating the particle *backward* in time is the same as integrating the
**antiparticle** (charge −q) *forward* in time from x = 0 with velocity −p̂: after time T it sits
at r(−T; p̂) and moves with velocity −p̂(−T). ``backtrack`` does exactly that and returns

* ``positions[t, i]``  = r(−T_t; p̂_i)   — the seed's backtracked position, used in δI = r·g (2.1);
* ``velocities[t, i]`` = p̂_i(−T_t)      — the *particle's* momentum direction at −T (minus the
  antiparticle's velocity), the p̂(−T) of the −3 p̂(−T)·K·∇n term of (2.1).

Consequently the particle started at r(−T) with p̂(−T) and integrated forward for a time T arrives at
the origin with direction p̂ (``propagate(..., charge=+1)``). How the equations are integrated
(solver, steps, devices) is set by ``crjax.Engine`` (``crjax.engine``).
"""

from __future__ import annotations

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int, PyTree

from ._checks import is_concrete
from .engine import (
    Engine,
    TimesLike,
    VectorsLike,
    cast_floats,
    check_field,
    coupling,
    integrate,
    reference_field_strength,
)
from .sky import healpix_directions

__all__ = [
    "Trajectory",
    "backtrack",
    "directions_array",
    "engine_from",
    "propagate",
    "unit_vectors",
]


class Trajectory(eqx.Module):
    """Positions and velocities at the save times (leading realisation axes in ensembles).

    ``times``: (ntimes,) save times T (units Lc/c; tΩ = T/rL).
    ``positions``: (ntimes, npix, 3); for ``backtrack`` r(−T_t; p̂_i) in units of Lc.
    ``velocities``: (ntimes, npix, 3) unit vectors; for ``backtrack`` the particle's momentum
    direction p̂_i(−T_t) (see the module docstring for the sign convention).
    ``num_steps``: (npix,) integrator steps taken per particle (accepted + rejected for the adaptive
    solvers; the same for every particle with Boris).
    """

    times: Float[Array, "*batch ntimes"]
    positions: Float[Array, "*batch ntimes npix 3"]
    velocities: Float[Array, "*batch ntimes npix 3"]
    num_steps: Int[Array, "*batch npix"]


# ----------------------------------------------------------------------------------------------
# input handling (host side, before jit)


def engine_from(engine, settings: dict) -> Engine:
    """``engine`` (default ``Engine()``) with the keyword ``settings`` given (not None) replacing its
    fields; a ValueError names unknown settings."""
    if engine is None:
        engine = Engine()
    elif not isinstance(engine, Engine):
        raise ValueError(f"engine must be a crjax.Engine or None; got {engine!r}")
    return engine.replace(**settings)


def _vectors(name: str, a, dtype) -> Float[Array, "npix 3"]:
    try:
        a = jnp.asarray(a, dtype)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be a real array of shape (npix, 3); got {a!r}") from err
    if a.ndim != 2 or a.shape[-1] != 3 or a.shape[0] < 1:
        raise ValueError(f"{name} must have shape (npix, 3) with npix >= 1; got shape {a.shape}")
    if is_concrete(a) and not np.all(np.isfinite(np.asarray(a))):
        rows = np.flatnonzero(~np.all(np.isfinite(np.asarray(a)), axis=-1))
        raise ValueError(f"{name} must be finite; rows {rows[:5].tolist()} hold NaN or inf")
    return a


def unit_vectors(name: str, a, dtype) -> Float[Array, "npix 3"]:
    """``a`` (npix, 3) as unit vectors of ``dtype``; finite, non-zero rows (checked when concrete)."""
    a = _vectors(name, a, dtype)
    norm = jnp.linalg.norm(a, axis=-1, keepdims=True)
    if is_concrete(norm) and not np.all(np.asarray(norm) > 0):
        rows = np.flatnonzero(~(np.asarray(norm)[:, 0] > 0))
        raise ValueError(
            f"{name} must be non-zero vectors (they are normalised); rows {rows[:5].tolist()} have "
            f"zero length in {jnp.dtype(dtype).name}"
        )
    return a / norm


def directions_array(directions, dtype) -> Float[Array, "npix 3"]:
    """Unit momentum directions p̂ (npix, 3) from an array, or an int nside for the HEALPix pixel
    centres (RING order, Npix = 12 nside²)."""
    if isinstance(directions, (int, np.integer)) and not isinstance(directions, bool):
        directions = healpix_directions(int(directions))
    return unit_vectors("directions", directions, dtype)


def _check_charge(charge) -> None:
    if is_concrete(charge) and (
        isinstance(charge, bool) or np.ndim(charge) != 0 or not np.isfinite(charge)
    ):
        raise ValueError(f"charge must be a finite real scalar (q/|q|); got {charge!r}")


# ----------------------------------------------------------------------------------------------
# one compiled function for backtrack and propagate


@functools.partial(jax.jit, static_argnames=("static",))
def _propagate_jit(dynamic, field, x0, v0, times, charge, rL, b_ref, *, static):
    plan = eqx.combine(dynamic, static)
    c = coupling(field, charge, rL, b_ref).astype(x0.dtype)
    xs, vs, nsteps = integrate(plan, field, x0, v0, times, c)
    return Trajectory(times=times, positions=xs, velocities=vs, num_steps=nsteps)


def _run(field, x0, v0, times, *, charge, rL, b_ref, engine: Engine, backward: bool) -> Trajectory:
    plan, times = engine.plan(times, rL)
    b_ref = reference_field_strength(field, b_ref)
    dtype = plan.dtype
    dynamic, static = eqx.partition(plan, eqx.is_array)
    traj = _propagate_jit(
        dynamic,
        cast_floats(field, dtype),
        x0,
        v0,
        times,
        jnp.asarray(charge, dtype),
        jnp.asarray(rL, dtype),
        jnp.asarray(b_ref, dtype),
        static=static,
    )
    if backward:
        # antiparticle velocity -> the particle's momentum direction p̂(−T); outside the jit so
        # that backtrack and propagate share one compiled function
        traj = eqx.tree_at(lambda t: t.velocities, traj, -traj.velocities)
    return traj


def propagate(
    field: PyTree,
    positions: VectorsLike,
    velocities: VectorsLike,
    times: TimesLike,
    *,
    rL: ArrayLike,
    charge: ArrayLike = 1.0,
    b_ref: ArrayLike | None = None,
    engine=None,  # a crjax.Engine; checked by engine_from (ValueError), so not annotated
    **settings,
) -> Trajectory:
    """Integrate particles forward in time from ``positions``/``velocities`` at t = 0
    (docs/physics.md §3): dx/dt = v, dv/dt = charge · v × B(x)/(rL B_ref), |v| = 1.

    Returns the actual positions and velocities at ``times`` (see ``backtrack`` for the CR
    convention); ``velocities`` are normalised.

    Args:
        field: callable Module, B(x) for positions (..., 3) -> (..., 3), e.g. ``TurbulentField``.
        positions, velocities: (npix, 3) initial state (finite; velocities non-zero).
        times: (ntimes,) save times, > 0 and strictly increasing (units Lc/c).
        rL: gyroradius in B_ref (units Lc), > 0; Ω = 1/rL.
        charge: sign (or ratio) q/|q|.
        b_ref: field strength defining rL (default |field.b0|, which must then be > 0).
        engine: a ``crjax.Engine`` (default ``Engine()``: Boris at dt = rL/20, float64, all devices).
        **settings: ``Engine`` fields replacing the engine's: ``solver`` (``crjax.Boris()``,
            ``diffrax.Tsit5()``, ``diffrax.Dopri8()`` or a name in ``crjax.engine.SOLVERS``),
            ``dt``, ``stepsize_controller`` (e.g. ``diffrax.PIDController(rtol=1e-10,
            atol=1e-12)``), ``max_steps``, ``adjoint``, ``devices``, ``dtype``.
    """
    engine = engine_from(engine, settings)
    check_field(field)
    _check_charge(charge)
    x0 = _vectors("positions", positions, engine.dtype)
    v0 = unit_vectors("velocities", velocities, engine.dtype)
    if x0.shape != v0.shape:
        raise ValueError(
            f"positions and velocities must have the same shape; got {x0.shape} and {v0.shape}"
        )
    return _run(
        field, x0, v0, times, charge=charge, rL=rL, b_ref=b_ref, engine=engine, backward=False
    )


def backtrack(
    field: PyTree,
    directions: VectorsLike | int,
    times: TimesLike,
    *,
    rL: ArrayLike,
    b_ref: ArrayLike | None = None,
    engine=None,  # a crjax.Engine; checked by engine_from (ValueError), so not annotated
    **settings,
) -> Trajectory:
    """Backtrack cosmic rays observed at Earth with momentum directions p̂_i (seed §3).

    The antiparticle is integrated forward from x = 0 with velocity −p̂_i (module docstring), so
    ``positions[t, i]`` = r(−T_t; p̂_i) and ``velocities[t, i]`` = p̂_i(−T_t), the particle's momentum
    direction. Jit-compiled; repeated calls with the same shapes and static settings reuse the
    compiled code.

    Args:
        field: callable Module B(x), (..., 3) -> (..., 3), with a regular-field vector ``b0``.
        directions: (npix, 3) momentum directions (finite, non-zero; normalised here), or an int
            nside for the HEALPix pixel centres (RING order, Npix = 12 nside²).
        times: (ntimes,) backtracking times T > 0, strictly increasing (units Lc/c; tΩ = T/rL).
        rL: gyroradius in |B0| (units Lc), > 0.
        b_ref, engine, **settings: as in ``propagate``.

    Returns:
        ``Trajectory`` with positions/velocities of shape (ntimes, npix, 3).
    """
    engine = engine_from(engine, settings)
    check_field(field)
    p = directions_array(directions, engine.dtype)
    return _run(
        field,
        jnp.zeros_like(p),
        -p,
        times,
        charge=-1.0,
        rL=rL,
        b_ref=b_ref,
        engine=engine,
        backward=True,
    )
