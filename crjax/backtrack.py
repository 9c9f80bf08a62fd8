"""Backtracking cosmic rays through a magnetic field realisation (seed §3, physics.md §3).

Sign convention (tested in ``tests/test_backtrack.py``): a cosmic ray observed at Earth (x = 0, t = 0)
with momentum direction p̂ was at position r(−T; p̂) with momentum direction p̂(−T) a time T earlier.
Integrating the particle *backward* in time is the same as integrating the **antiparticle** (charge
−q) *forward* in time from x = 0 with velocity −p̂: after time T it sits at r(−T; p̂) and moves with
velocity −p̂(−T). ``backtrack`` does exactly that and returns

* ``positions[t, i]``  = r(−T_t; p̂_i)   — the seed's backtracked position, used in δI = r·g (2.1);
* ``velocities[t, i]`` = p̂_i(−T_t)      — the *particle's* momentum direction at −T (minus the
  antiparticle's velocity), the p̂(−T) of the −3 p̂(−T)·K·∇n term of (2.1).

Consequently the particle started at r(−T) with p̂(−T) and integrated forward for a time T arrives at
the origin with direction p̂ (``propagate(..., charge=+1)``).
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._checks import check_int_at_least, check_positive, check_sorted_times, is_concrete
from .sky import healpix_directions
from .solvers import Boris, LorentzTerm

__all__ = ["SOLVERS", "Trajectory", "backtrack", "propagate", "run_ensemble"]

#: Solver names accepted by ``backtrack``/``propagate``/``run_ensemble``.
SOLVERS = ("boris", "tsit5", "dopri8")
_RK = {"tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8}


class Trajectory(eqx.Module):
    """Positions and velocities at the save times (leading realisation axes in ensembles).

    ``times``: (ntimes,) save times T (units Lc/c; tΩ = T/rL).
    ``positions``: (ntimes, npix, 3); for ``backtrack`` r(−T_t; p̂_i) in units of Lc.
    ``velocities``: (ntimes, npix, 3) unit vectors; for ``backtrack`` the particle's momentum
    direction p̂_i(−T_t) (see the module docstring for the sign convention).
    ``num_steps``: (npix,) integrator steps taken per particle (accepted + rejected for the adaptive
    solvers; the same for every particle with Boris).
    """

    times: Float[Array, " ntimes"]
    positions: Float[Array, "ntimes npix 3"]
    velocities: Float[Array, "ntimes npix 3"]
    num_steps: Int[Array, " npix"]


# ----------------------------------------------------------------------------------------------
# input handling (host side, before jit)


def _float_dtype(dtype):
    dtype = jnp.dtype(jnp.float64 if dtype is None else dtype)
    if dtype not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64 (or None for float64); got {dtype}")
    return jax.dtypes.canonicalize_dtype(dtype)


def _cast(tree, dtype):
    """Cast every floating array leaf of ``tree`` (e.g. a field Module) to ``dtype``."""

    def cast(leaf):
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        if isinstance(leaf, float):
            return jnp.asarray(leaf, dtype)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def _check_vectors(name: str, a) -> None:
    if a.ndim != 2 or a.shape[-1] != 3 or a.shape[0] < 1:
        raise ValueError(f"{name} must have shape (npix, 3) with npix >= 1; got shape {a.shape}")


def _check_solver(solver) -> None:
    if solver not in SOLVERS:
        raise ValueError(f"solver must be one of {SOLVERS}; got {solver!r}")


def _resolve_dt(dt, rL):
    if dt is None:
        if not is_concrete(rL):
            raise ValueError(
                "dt must be given explicitly (a concrete float > 0) when rL is traced "
                "(e.g. differentiated); the default dt = rL/20 needs a concrete rL"
            )
        return float(rL) / 20.0
    if not is_concrete(dt):
        raise ValueError("dt must be a concrete float > 0 (it fixes the number of steps)")
    check_positive("dt", dt)
    return float(dt)


def _step_grid(times: np.ndarray, dt: float, substeps: int = 1) -> np.ndarray:
    """diffrax step times from 0 through every save time; each step makes ``substeps`` Boris pushes.

    Within each interval between save times the pushes have equal length <= dt, and every save time
    is a grid point, so Boris output at save times is exact (no interpolation).
    """
    edges = np.concatenate([[0.0], times])
    pieces = [np.zeros(1)]
    for a, b in itertools.pairwise(edges):
        # 1e-9 slack: an interval that is a whole number of steps up to round-off is not split further
        n = max(1, math.ceil((b - a) / (dt * substeps) - 1e-9))
        seg = a + (b - a) * np.arange(1, n + 1) / n
        seg[-1] = b  # exact save time
        pieces.append(seg)
    return np.concatenate(pieces)


def _auto_substeps(times: np.ndarray, dt: float) -> int:
    """Boris pushes per diffrax step: the largest K ≤ 16 whose rounding up of the pushes in each
    save interval to a multiple of K costs ≤ 1% extra pushes (K = 1 always qualifies)."""
    minimal = _step_grid(times, dt, 1).size - 1
    for k in range(16, 1, -1):
        if (_step_grid(times, dt, k).size - 1) * k <= 1.01 * minimal:
            return k
    return 1


def _default_max_steps(t_end: float, dt: float) -> int:
    # Adaptive steps at rtol 1e-8 in the seed's turbulence are ~2-4x shorter than rL/20;
    # 64x the fixed-step count (+ slack for short runs) is a generous cap that still bounds the loop.
    return 64 * math.ceil(t_end / dt) + 4096


def _b_ref(field, b_ref):
    """The field strength in which rL is the gyroradius: ``b_ref`` or |field.b0| (must be > 0)."""
    if b_ref is not None:
        check_positive("b_ref", b_ref)
        return b_ref
    b0 = getattr(field, "b0", None)
    if b0 is None:
        raise ValueError("b_ref must be given (> 0) for a field without a regular-field vector b0")
    if is_concrete(b0) and not np.all(np.linalg.norm(np.asarray(b0), axis=-1) > 0):
        raise ValueError(
            "field.b0 is zero, so rL (defined in |B0|) is undefined: pass b_ref > 0, the field "
            "strength in which rL is the gyroradius"
        )
    return jnp.linalg.norm(b0, axis=-1)  # differentiable in b0


# ----------------------------------------------------------------------------------------------
# traced core (shared by backtrack, propagate and run_ensemble)


class _Plan(NamedTuple):
    """Static (hashable) integration settings: they fix the compiled code."""

    solver: str
    max_steps: int  # diffrax steps (Boris: macro steps of ``substeps`` pushes)
    substeps: int
    adjoint: diffrax.AbstractAdjoint
    devices: int = 1  # local devices the particles are split over (1: no split)


def _resolve_devices(devices) -> int:
    """Number of local devices to split particles over: ``devices`` or all local devices."""
    available = jax.local_device_count()
    if devices is None:
        return available
    check_int_at_least("devices", devices, 1)
    if devices > available:
        raise ValueError(
            f"devices must be in [1, {available}] (the local {jax.default_backend()} devices; "
            f"for more CPU devices call crjax.use_cpu_cores() before JAX starts); got {devices}"
        )
    return int(devices)


def _integrate(field, x0, v0, times, grid, coupling, rtol, atol, dt0, plan: _Plan):
    """Integrate the Lorentz force from (x0, v0) at t = 0; returns (xs, vs, num_steps).

    With ``plan.devices`` > 1 the particles are split evenly over that many local devices: a vmap
    over a leading device axis, constrained to the device mesh, which XLA partitions into one loop
    per device (particles are independent, so this is exact). On a CPU exposed as one device per
    core (``crjax.use_cpu_cores``) that is one loop per core, measured 1.1-1.5x faster than one
    loop whose single operations XLA spreads over the cores (benchmarks/engine.py). Not
    ``jax.shard_map``: reverse mode through diffrax's checkpointed loop fails inside it (jax 0.10).
    """
    if plan.devices == 1:
        return _integrate_local(field, x0, v0, times, grid, coupling, rtol, atol, dt0, plan)
    nd, n = plan.devices, x0.shape[0]
    pad = -n % nd  # pad with copies of particle 0 so every device gets the same count
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:nd]), ("particles",))
    on_devices = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("particles"))

    def split(a):
        a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, 3))]).reshape(nd, -1, 3)
        return jax.lax.with_sharding_constraint(a, on_devices)

    local = functools.partial(_integrate_local, plan=plan)
    xs, vs, nsteps = jax.vmap(
        local, in_axes=(None, 0, 0, None, None, None, None, None, None), out_axes=(1, 1, 0)
    )(field, split(x0), split(v0), times, grid, coupling, rtol, atol, dt0)
    ntimes = xs.shape[0]
    return (
        xs.reshape(ntimes, -1, 3)[:, :n],
        vs.reshape(ntimes, -1, 3)[:, :n],
        nsteps.reshape(-1)[:n],
    )


def _integrate_local(field, x0, v0, times, grid, coupling, rtol, atol, dt0, plan: _Plan):
    solver, max_steps, substeps, adjoint, _ = plan
    term = LorentzTerm(field, coupling)
    saveat = diffrax.SaveAt(ts=times)
    if solver == "boris":
        # One ODE with the batched state (npix, 3) + (npix, 3): a single while loop, no per-lane
        # predicates or selects. With the 256-mode field the push is field-bound and vmap over
        # per-particle solves measured within ±20% of this (benchmarks/engine.py prints both).
        sol = diffrax.diffeqsolve(
            term,
            Boris(substeps=substeps),
            t0=grid[0],
            t1=grid[-1],
            dt0=None,
            y0=(x0, v0),
            saveat=saveat,
            stepsize_controller=diffrax.StepTo(ts=grid),
            max_steps=max_steps,
            adjoint=adjoint,
        )
        xs, vs = sol.ys
        nsteps = jnp.full(x0.shape[:1], sol.stats["num_steps"] * substeps)
        return xs, vs, nsteps

    controller = diffrax.PIDController(rtol=rtol, atol=atol)

    # Per-particle adaptive stepping: each trajectory chooses its own steps.
    def one(x0i, v0i):
        sol = diffrax.diffeqsolve(
            term,
            _RK[solver](),
            t0=jnp.zeros((), times.dtype),
            t1=times[-1],
            dt0=dt0,
            y0=(x0i, v0i),
            saveat=saveat,
            stepsize_controller=controller,
            max_steps=max_steps,
            adjoint=adjoint,
        )
        xs, vs = sol.ys
        return xs, vs, sol.stats["num_steps"]

    xs, vs, nsteps = jax.vmap(one, out_axes=(1, 1, 0))(x0, v0)
    return xs, vs, nsteps


def _coupling(field, charge, rL, b_ref):
    b = jnp.linalg.norm(field.b0) if b_ref is None else b_ref
    return charge / (rL * b)


@functools.partial(jax.jit, static_argnames=("plan",))
def _propagate_jit(field, x0, v0, times, grid, charge, rL, b_ref, rtol, atol, dt0, *, plan):
    coupling = _coupling(field, charge, rL, b_ref).astype(x0.dtype)
    xs, vs, nsteps = _integrate(field, x0, v0, times, grid, coupling, rtol, atol, dt0, plan)
    return Trajectory(times=times, positions=xs, velocities=vs, num_steps=nsteps)


def _prepare(times, rL, dt, solver, max_steps, dtype, adjoint, devices):
    """Host-side validation; returns (times, grid, dt, plan) with arrays of ``dtype``."""
    _check_solver(solver)
    devices = _resolve_devices(devices)
    check_positive("rL", rL)
    if not is_concrete(times):
        raise ValueError("times must be concrete (numpy or a non-traced array): they fix the steps")
    check_sorted_times("times", times)
    times_np = np.asarray(times, dtype=np.float64)
    dt = _resolve_dt(dt, rL)
    if max_steps is not None:
        check_int_at_least("max_steps", max_steps, 1)
    if adjoint is None:
        adjoint = diffrax.RecursiveCheckpointAdjoint()
    elif not isinstance(adjoint, diffrax.AbstractAdjoint):
        raise ValueError(f"adjoint must be a diffrax.AbstractAdjoint or None; got {adjoint!r}")
    if solver == "boris":
        substeps = _auto_substeps(times_np, dt)
        grid_np = _step_grid(times_np, dt, substeps)
        pushes = (grid_np.size - 1) * substeps
        if max_steps is not None and max_steps < pushes:
            raise ValueError(
                f"max_steps must be >= {pushes} (the Boris steps needed to reach times[-1] "
                f"with dt={dt}); got {max_steps}"
            )
        plan = _Plan(solver, grid_np.size - 1, substeps, adjoint, devices)
        grid = jnp.asarray(grid_np, dtype)
    else:
        if max_steps is None:
            max_steps = _default_max_steps(float(times_np[-1]), dt)
        plan = _Plan(solver, max_steps, 1, adjoint, devices)
        grid = None
    return jnp.asarray(times_np, dtype), grid, dt, plan


def propagate(
    field: Callable,
    positions: Float[Array, "npix 3"],
    velocities: Float[Array, "npix 3"],
    times: Float[Array, " ntimes"],
    *,
    rL: float,
    charge: float = 1.0,
    solver: str = "boris",
    dt: float | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    dtype=None,
    max_steps: int | None = None,
    b_ref: float | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    devices: int | None = None,
) -> Trajectory:
    """Integrate particles forward in time from ``positions``/``velocities`` at t = 0 (physics.md §3).

    dx/dt = v, dv/dt = charge · v × B(x)/(rL B_ref) with |v| = 1 (``velocities`` are normalised).
    Returns the actual positions and velocities at ``times`` (see ``backtrack`` for the CR convention).

    Args:
        field: callable Module, B(x) for positions (..., 3) -> (..., 3), e.g. ``TurbulentField``.
        positions, velocities: (npix, 3) initial state.
        times: (ntimes,) save times, > 0 and strictly increasing (units Lc/c).
        rL: gyroradius in B_ref (units Lc); Ω = 1/rL.
        charge: sign (or ratio) q/|q|.
        solver: "boris" (fixed step ``dt``; save times are always hit exactly), or "tsit5"/"dopri8"
            (adaptive, per particle, PID controller with ``rtol``/``atol``; ``dt`` is the first step).
        dt: Boris step (default rL/20; must be concrete, it fixes the number of steps).
        dtype: float64 (default) or float32; the field, state and times are cast to it.
        max_steps: cap on steps (adaptive default: 64× the rL/20 step count + 4096).
        b_ref: field strength defining rL (default |field.b0|, which must then be > 0).
        adjoint: diffrax adjoint (default ``RecursiveCheckpointAdjoint``: checkpointed reverse
            mode); ``diffrax.ForwardMode()`` for ``jax.jvp``/``jax.jacfwd`` (memory independent of
            the number of steps — the better choice for a few parameters, physics.md §8).
        devices: split the particles evenly over this many local devices (default: all of the
            default backend's; results do not depend on it beyond round-off). A CPU is one device
            unless ``crjax.use_cpu_cores()`` ran before JAX started.
    """
    dtype = _float_dtype(dtype)
    x0 = jnp.asarray(positions, dtype)
    v0 = jnp.asarray(velocities, dtype)
    _check_vectors("positions", x0)
    _check_vectors("velocities", v0)
    if x0.shape != v0.shape:
        raise ValueError(
            f"positions and velocities must have the same shape; got {x0.shape} and {v0.shape}"
        )
    v0 = v0 / jnp.linalg.norm(v0, axis=-1, keepdims=True)
    return _run(
        field,
        x0,
        v0,
        times,
        charge,
        rL,
        solver,
        dt,
        rtol,
        atol,
        dtype,
        max_steps,
        b_ref,
        adjoint,
        devices,
        backward=False,
    )


def _run(
    field,
    x0,
    v0,
    times,
    charge,
    rL,
    solver,
    dt,
    rtol,
    atol,
    dtype,
    max_steps,
    b_ref,
    adjoint,
    devices,
    *,
    backward,
):
    times, grid, dt, plan = _prepare(times, rL, dt, solver, max_steps, dtype, adjoint, devices)
    b_ref = _b_ref(field, b_ref)
    traj = _propagate_jit(
        _cast(field, dtype),
        x0,
        v0,
        times,
        grid,
        jnp.asarray(charge, dtype),
        jnp.asarray(rL, dtype),
        jnp.asarray(b_ref, dtype),
        jnp.asarray(rtol, dtype),
        jnp.asarray(atol, dtype),
        jnp.asarray(dt, dtype),
        plan=plan,
    )
    if backward:
        # antiparticle velocity -> the particle's momentum direction p̂(−T); outside the jit so
        # that backtrack and propagate share one compiled function
        traj = eqx.tree_at(lambda t: t.velocities, traj, -traj.velocities)
    return traj


def backtrack(
    field: Callable,
    directions: Float[Array, "npix 3"] | int,
    times: Float[Array, " ntimes"],
    *,
    rL: float,
    solver: str = "boris",
    dt: float | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    dtype=None,
    max_steps: int | None = None,
    b_ref: float | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    devices: int | None = None,
) -> Trajectory:
    """Backtrack cosmic rays observed at Earth with momentum directions p̂_i (seed §3).

    The antiparticle is integrated forward from x = 0 with velocity −p̂_i (module docstring), so
    ``positions[t, i]`` = r(−T_t; p̂_i) and ``velocities[t, i]`` = p̂_i(−T_t), the particle's momentum
    direction. Jit-compiled; repeated calls with the same shapes, solver and step count reuse the
    compiled code.

    Args:
        field: callable Module B(x), (..., 3) -> (..., 3), with a regular-field vector ``b0``.
        directions: (npix, 3) unit momentum directions, or an int nside for the HEALPix pixel
            centres (RING order, Npix = 12 nside²).
        times: (ntimes,) backtracking times T > 0, strictly increasing (units Lc/c; tΩ = T/rL).
        rL: gyroradius in |B0| (units Lc), > 0.
        solver, dt, rtol, atol, dtype, max_steps, b_ref, adjoint, devices: as in ``propagate``.

    Returns:
        ``Trajectory`` with positions/velocities of shape (ntimes, npix, 3).
    """
    dtype = _float_dtype(dtype)
    if isinstance(directions, (int, np.integer)) and not isinstance(directions, bool):
        directions = healpix_directions(int(directions))
    p = jnp.asarray(directions, dtype)
    _check_vectors("directions", p)
    p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    return _run(
        field,
        jnp.zeros_like(p),
        -p,
        times,
        -1.0,
        rL,
        solver,
        dt,
        rtol,
        atol,
        dtype,
        max_steps,
        b_ref,
        adjoint,
        devices,
        backward=True,
    )


# ----------------------------------------------------------------------------------------------
# ensembles


@functools.partial(jax.jit, static_argnames=("plan", "reducer", "dtype", "realise"))
def _ensemble_chunk(
    params,
    key,
    indices,
    p,
    times,
    grid,
    rL,
    b_ref,
    rtol,
    atol,
    dt0,
    *,
    plan,
    reducer,
    dtype,
    realise,
):
    def one(index):
        field = _cast(realise(jax.random.fold_in(key, index), params), dtype)
        coupling = _coupling(field, -1.0, rL, b_ref).astype(dtype)
        xs, vs, nsteps = _integrate(
            field, jnp.zeros_like(p), -p, times, grid, coupling, rtol, atol, dt0, plan
        )
        return Trajectory(times=times, positions=xs, velocities=-vs, num_steps=nsteps)

    trajectories = jax.vmap(one)(indices)
    return trajectories if reducer is None else reducer(trajectories)


def _check_reducer(reducer, c, ntimes, p):
    """Trace (not run) ``reducer`` on a chunk-shaped Trajectory: per-realisation leading axis?"""
    npix, dtype = p.shape[0], p.dtype
    traj = Trajectory(
        times=jax.ShapeDtypeStruct((c, ntimes), dtype),
        positions=jax.ShapeDtypeStruct((c, ntimes, npix, 3), dtype),
        velocities=jax.ShapeDtypeStruct((c, ntimes, npix, 3), dtype),
        num_steps=jax.ShapeDtypeStruct((c, npix), jnp.int32),
    )
    for leaf in jax.tree_util.tree_leaves(jax.eval_shape(reducer, traj)):
        if len(leaf.shape) < 1 or leaf.shape[0] != c:
            raise ValueError(
                "reducer must return arrays with a leading realisation axis of the chunk's "
                f"length {c}; got a leaf of shape {leaf.shape}"
            )


def _default_realise(key, params):
    from .field import realise_field

    return realise_field(key, params)


def run_ensemble(
    params,
    key: jax.Array,
    n_realisations: int,
    directions: Float[Array, "npix 3"] | int,
    times: Float[Array, " ntimes"],
    *,
    rL: float,
    chunk_size: int = 8,
    reducer: Callable | None = None,
    on_chunk: Callable | None = None,
    start: int = 0,
    solver: str = "boris",
    dt: float | None = None,
    rtol: float = 1e-8,
    atol: float = 1e-10,
    dtype=None,
    max_steps: int | None = None,
    b_ref: float | None = None,
    adjoint: diffrax.AbstractAdjoint | None = None,
    realise: Callable | None = None,
    devices: int | None = None,
):
    """Backtrack ``directions`` through realisations ``start .. n_realisations-1`` of ``params``.

    Realisation r is drawn from ``jax.random.fold_in(key, r)``, so results do not depend on
    ``chunk_size`` and a run resumed at ``start`` reproduces the missing realisations exactly.
    Realisations are processed ``chunk_size`` at a time (``jax.vmap`` inside one jit), so memory is
    bounded by one chunk's trajectories: ~ chunk_size · ntimes · npix · 48 bytes (fp64) in flight.

    Args:
        params: ``FieldParams`` (any pytree accepted by ``realise``).
        key: base PRNG key.
        n_realisations: total number of realisations (>= 1); ``start`` < n_realisations.
        directions, times, rL, solver, dt, rtol, atol, dtype, max_steps, b_ref, adjoint, devices:
            as in ``backtrack``.
        chunk_size: realisations per compiled batch.
        reducer: pure, jittable function mapping a chunk's ``Trajectory`` batch (leading realisation
            axis of length c) to a pytree of arrays whose leading axis is also c (per-realisation
            summaries, e.g. ``crjax.transport.second_moments``). Runs inside the jit, so the full
            trajectories never leave the device. Pass the same function object each call (it is a
            static argument: a new lambda recompiles).
        on_chunk: called as ``on_chunk(first_index, reduced)`` after each chunk (progress bars,
            resumable result files); ``reduced`` is the chunk's reducer output (or Trajectory).
        realise: ``realise(key, params) -> field`` (default ``crjax.field.realise_field``).

    Returns:
        The reducer outputs (or Trajectories) of realisations start..n_realisations-1, concatenated
        along the leading axis.
    """
    check_int_at_least("n_realisations", n_realisations, 1)
    check_int_at_least("chunk_size", chunk_size, 1)
    check_int_at_least("start", start, 0)
    if start >= n_realisations:
        raise ValueError(
            f"start must be in [0, n_realisations - 1] = [0, {n_realisations - 1}]; got {start}"
        )
    dtype = _float_dtype(dtype)
    if isinstance(directions, (int, np.integer)) and not isinstance(directions, bool):
        directions = healpix_directions(int(directions))
    p = jnp.asarray(directions, dtype)
    _check_vectors("directions", p)
    p = p / jnp.linalg.norm(p, axis=-1, keepdims=True)
    times, grid, dt, plan = _prepare(times, rL, dt, solver, max_steps, dtype, adjoint, devices)
    if b_ref is not None:
        check_positive("b_ref", b_ref)
    realise = _default_realise if realise is None else realise
    if reducer is not None:
        _check_reducer(reducer, min(chunk_size, n_realisations - start), times.shape[0], p)

    outputs = []
    for first in range(start, n_realisations, chunk_size):
        indices = jnp.arange(first, min(first + chunk_size, n_realisations))
        out = _ensemble_chunk(
            params,
            key,
            indices,
            p,
            times,
            grid,
            jnp.asarray(rL, dtype),
            None if b_ref is None else jnp.asarray(b_ref, dtype),
            jnp.asarray(rtol, dtype),
            jnp.asarray(atol, dtype),
            jnp.asarray(dt, dtype),
            plan=plan,
            reducer=reducer,
            dtype=dtype,
            realise=realise,
        )
        if on_chunk is not None:
            on_chunk(first, out)
        outputs.append(out)
    if len(outputs) == 1:
        return outputs[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)
