"""The integration engine: settings, solver registry, step plan and the particle split over devices.

Equations of motion (docs/physics.md §3), unit speed, c = 1, lengths in Lc, times in Lc/c:

    dx/dt = v,        dv/dt = s · v × B(x) / (rL B_ref),

s the charge sign, rL the gyroradius in the reference field strength B_ref (Ω = 1/rL). The engine
integrates them forward in time from t = 0; the backtracking convention (antiparticle forward =
particle backward) lives in ``crjax.backtracking``.

Settings travel as one Module: the user's ``Engine`` (solver object, dt, step-size controller,
max_steps, adjoint, devices, dtype) is checked on construction and resolved on the host by
``Engine.plan(times, rL)`` into a ``Plan`` (the step grid, Boris substeps, the device count), which
is all the traced core ``integrate`` sees.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import numbers
import types
from collections.abc import Callable, Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, Int

from ._checks import (
    check_int_at_least,
    check_positive,
    check_sorted_times,
    is_concrete,
)
from .solvers import Boris, LorentzTerm

__all__ = [
    "SOLVERS",
    "Engine",
    "Plan",
    "TimesLike",
    "VectorsLike",
    "cast_floats",
    "check_field",
    "coupling",
    "integrate",
    "reference_field_strength",
    "solver_from_name",
]

#: The one registry of solver names (read by ``Engine``, presets and the CLI): name -> constructor.
#: "boris": fixed step ``dt`` on a batched state, save times hit exactly; "tsit5"/"dopri8": adaptive
#: 5th/8th-order Runge–Kutta per particle with a PID step-size controller.
SOLVERS: types.MappingProxyType[str, Callable[[], diffrax.AbstractSolver]] = types.MappingProxyType(
    {"boris": Boris, "tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8}
)

#: Save times and (npix, 3) vectors as public entry points accept them: loosely typed, because
#: the entry points check them themselves (a ValueError naming the parameter).
TimesLike = ArrayLike | Sequence
VectorsLike = ArrayLike | Sequence

#: Tolerances of the default controller for adaptive solvers, PIDController(rtol, atol).
DEFAULT_RTOL, DEFAULT_ATOL = 1e-8, 1e-10

# diffrax counts steps in int32: a plan with more pushes than this cannot be run (or counted).
_MAX_PUSHES = 2**31 - 1


def solver_from_name(name: str) -> diffrax.AbstractSolver:
    """The solver object registered as ``name`` in ``SOLVERS`` (e.g. "boris" -> ``Boris()``)."""
    if not isinstance(name, str) or name not in SOLVERS:
        raise ValueError(
            f"solver must be one of {tuple(SOLVERS)} or a diffrax solver object; got {name!r}"
        )
    return SOLVERS[name]()


def _to_solver(solver) -> diffrax.AbstractSolver:
    if solver is None:
        return Boris()
    if isinstance(solver, str):
        return solver_from_name(solver)
    if isinstance(solver, type) and issubclass(solver, diffrax.AbstractSolver):
        raise ValueError(  # noqa: TRY004  (project convention: bad input is a ValueError)
            f"solver must be a solver object, not a class: pass {solver.__name__}() ; got {solver!r}"
        )
    if not isinstance(solver, diffrax.AbstractSolver):
        raise ValueError(  # noqa: TRY004  (project convention: bad input is a ValueError)
            f"solver must be one of {tuple(SOLVERS)} or a diffrax solver object "
            f"(crjax.Boris(), diffrax.Tsit5(), ...); got {solver!r}"
        )
    return solver


def _float_dtype(dtype) -> np.dtype:
    try:
        resolved = jnp.dtype(jnp.float64 if dtype is None else dtype)
    except TypeError:
        resolved = jnp.dtype(jnp.int8)  # not understood: refused below
    if resolved not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64 (or None for float64); got {dtype!r}")
    return jax.dtypes.canonicalize_dtype(resolved)


def _to_dt(dt) -> float | None:
    if dt is None:
        return None
    if not is_concrete(dt):
        raise ValueError(
            "dt must be a concrete float > 0 (it fixes the number of steps); got a tracer"
        )
    if (
        isinstance(dt, bool)
        or not isinstance(dt, (numbers.Real, np.ndarray, jax.Array))
        or np.ndim(dt) != 0
    ):
        raise ValueError(f"dt must be a float > 0 (a scalar); got {dt!r}")
    check_positive("dt", dt)
    return float(dt)


def _to_count(name: str, value) -> int | None:
    if value is None:
        return None
    check_int_at_least(name, value, 1)
    return int(value)


def _to_adjoint(adjoint) -> diffrax.AbstractAdjoint:
    if adjoint is None:
        return diffrax.RecursiveCheckpointAdjoint()
    if not isinstance(adjoint, diffrax.AbstractAdjoint):
        raise ValueError(  # noqa: TRY004  (project convention: bad input is a ValueError)
            f"adjoint must be a diffrax.AbstractAdjoint or None; got {adjoint!r}"
        )
    return adjoint


def _to_controller(ctrl) -> diffrax.AbstractStepSizeController | None:
    if ctrl is None:
        return None
    if not isinstance(ctrl, diffrax.AbstractStepSizeController):
        raise ValueError(  # noqa: TRY004  (project convention: bad input is a ValueError)
            "stepsize_controller must be a diffrax step-size controller (e.g. "
            f"diffrax.PIDController(rtol=1e-8, atol=1e-10)) or None; got {ctrl!r}"
        )
    if isinstance(ctrl, diffrax.PIDController):
        for name in ("rtol", "atol"):
            value = getattr(ctrl, name)
            if is_concrete(value) and not (
                np.ndim(value) == 0 and np.isfinite(value) and value >= 0
            ):
                raise ValueError(
                    f"stepsize_controller.{name} must be a finite float >= 0; got {value!r}"
                )
        if all(is_concrete(v) and v == 0 for v in (ctrl.rtol, ctrl.atol)):
            raise ValueError("stepsize_controller: rtol and atol must not both be 0")
    return ctrl


class Engine(eqx.Module):
    """How to integrate the equations of motion (docs/physics.md §3); checked on construction.

    Attributes:
        solver: ``crjax.Boris()`` (default: fixed step ``dt``, every save time is a grid point; its
            ``substeps`` is chosen by the plan), an explicit diffrax solver such as
            ``diffrax.Tsit5()``/``diffrax.Dopri8()`` (one solve per particle, steps set by
            ``stepsize_controller``), or a name in ``SOLVERS``.
        dt: Boris step; the first step of other solvers (default rL/20). A concrete float > 0.
        stepsize_controller: for solvers other than Boris (default for adaptive solvers
            ``diffrax.PIDController(rtol=1e-8, atol=1e-10)``, else ``diffrax.ConstantStepSize()``).
            Must be None with Boris, whose steps are the grid built from ``dt`` and the save times.
        max_steps: cap on steps (Boris: must cover the grid; adaptive default 64× the rL/20 count
            + 4096).
        adjoint: diffrax adjoint (default ``RecursiveCheckpointAdjoint``: checkpointed reverse mode);
            ``diffrax.ForwardMode()`` for ``jax.jvp``/``jax.jacfwd`` (docs/physics.md §8).
        devices: split the particles evenly over this many local devices (default: all of them;
            results equal the one-device run to round-off).
        dtype: float64 (default; None) or float32: field, state and times are cast to it.

    Equal settings give equal, equally hashed Engines (``Engine(solver="tsit5") ==
    Engine(solver=diffrax.Tsit5())``), so an Engine can be a static jit argument.
    """

    # Converters check each setting (a ValueError naming it); fields are typed after conversion.
    solver: diffrax.AbstractSolver = eqx.field(default=None, converter=_to_solver)
    dt: float | None = eqx.field(default=None, converter=_to_dt)
    stepsize_controller: diffrax.AbstractStepSizeController | None = eqx.field(
        default=None, converter=_to_controller
    )
    max_steps: int | None = eqx.field(
        default=None, converter=functools.partial(_to_count, "max_steps")
    )
    adjoint: diffrax.AbstractAdjoint = eqx.field(default=None, converter=_to_adjoint)
    devices: int | None = eqx.field(default=None, converter=functools.partial(_to_count, "devices"))
    dtype: np.dtype = eqx.field(default=None, converter=_float_dtype)

    def __check_init__(self):
        ctrl = self.stepsize_controller
        if ctrl is None:
            return
        if isinstance(self.solver, Boris):
            raise ValueError(  # noqa: TRY004  (project convention: bad input is a ValueError)
                "stepsize_controller must be None with the Boris solver (its steps are the grid "
                f"built from dt and the save times); got {ctrl!r}"
            )
        if isinstance(ctrl, diffrax.AbstractAdaptiveStepSizeController) and not isinstance(
            self.solver, diffrax.AbstractAdaptiveSolver
        ):
            raise ValueError(  # noqa: TRY004  (project convention: bad input is a ValueError)
                f"stepsize_controller {type(ctrl).__name__} needs an adaptive solver (with an error "
                f"estimate, e.g. diffrax.Tsit5()); got solver {self.solver!r}"
            )

    def replace(self, **settings) -> Engine:
        """A copy with the settings given (not None) replaced, checked again."""
        given = {k: v for k, v in settings.items() if v is not None}
        unknown = sorted(set(settings) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            hint = (
                "; tolerances go in the controller: stepsize_controller=diffrax.PIDController("
                "rtol=..., atol=...)"
                if {"rtol", "atol"} & set(unknown)
                else ""
            )
            raise ValueError(
                f"unknown engine setting(s) {unknown}; the settings are "
                f"{[f.name for f in dataclasses.fields(self)]}{hint}"
            )
        return dataclasses.replace(self, **given) if given else self

    def plan(self, times: TimesLike, rL: ArrayLike) -> tuple[Plan, Float[Array, " ntimes"]]:
        """Host side: the step plan for save ``times`` and gyroradius ``rL``; returns (plan, times).

        Boris: the step grid hits every save time; within each save interval the pushes have equal
        length <= dt, ``substeps`` of them per diffrax step. Other solvers: per particle from t = 0
        with first step dt. ``times`` come back as an array of ``dtype``.
        """
        dtype = self.dtype
        devices = _resolve_devices(self.devices)
        _check_scalar("rL", rL)
        check_positive("rL", rL)
        if not is_concrete(times):
            raise ValueError(
                "times must be concrete (numpy or a non-traced array): they fix the steps"
            )
        check_sorted_times("times", times)
        times_np = np.asarray(times, dtype=np.float64)
        dt = _resolve_dt(self.dt, rL)
        # An estimate that is exact up to one push per save interval; refuse before building a grid.
        pushes = math.ceil(float(times_np[-1]) / dt) + times_np.size
        if isinstance(self.solver, Boris) and pushes > _MAX_PUSHES:
            raise ValueError(
                f"dt must be >= times[-1]/{_MAX_PUSHES} = {float(times_np[-1]) / _MAX_PUSHES:.3g} "
                f"(diffrax counts steps in int32); got dt={dt} for times[-1]={times_np[-1]}"
            )
        if isinstance(self.solver, Boris):
            substeps = _auto_substeps(times_np, dt)
            grid_np = _step_grid(times_np, dt, substeps)
            pushes = (grid_np.size - 1) * substeps
            if self.max_steps is not None and self.max_steps < pushes:
                raise ValueError(
                    f"max_steps must be >= {pushes} (the Boris steps needed to reach times[-1] "
                    f"with dt={dt}); got {self.max_steps}"
                )
            solver = Boris(substeps=substeps)
            controller = diffrax.StepTo(ts=jnp.asarray(grid_np, dtype))
            max_steps = grid_np.size - 1
        else:
            solver = self.solver
            controller = self.stepsize_controller
            if controller is None:
                controller = (
                    diffrax.PIDController(rtol=DEFAULT_RTOL, atol=DEFAULT_ATOL)
                    if isinstance(solver, diffrax.AbstractAdaptiveSolver)
                    else diffrax.ConstantStepSize()
                )
            if isinstance(controller, diffrax.PIDController):
                # tolerances as arrays: traced, so changing them does not recompile
                controller = eqx.tree_at(
                    lambda c: (c.rtol, c.atol),
                    controller,
                    (jnp.asarray(controller.rtol, dtype), jnp.asarray(controller.atol, dtype)),
                )
            max_steps = self.max_steps
            if max_steps is None:
                max_steps = min(_default_max_steps(float(times_np[-1]), dt), _MAX_PUSHES)
        plan = Plan(
            solver=solver,
            stepsize_controller=controller,
            dt0=jnp.asarray(dt, dtype),
            adjoint=self.adjoint,
            max_steps=max_steps,
            devices=devices,
            dtype=dtype,
        )
        return plan, jnp.asarray(times_np, dtype)


class Plan(eqx.Module):
    """An ``Engine`` resolved for given save times and rL (``Engine.plan``): what ``integrate`` runs.

    Array leaves (the Boris grid in ``StepTo``, PID tolerances, ``dt0``) are traced; the rest is
    static and fixes the compiled code (``eqx.partition(plan, eqx.is_array)``).
    """

    solver: diffrax.AbstractSolver
    stepsize_controller: diffrax.AbstractStepSizeController
    dt0: Float[Array, ""]
    adjoint: diffrax.AbstractAdjoint
    max_steps: int = eqx.field(static=True)  # diffrax steps (Boris: steps of ``substeps`` pushes)
    devices: int = eqx.field(static=True)  # local devices the particles are split over (1: none)
    dtype: np.dtype = eqx.field(static=True)


def _check_scalar(name: str, value) -> None:
    if isinstance(value, bool) or np.ndim(value) != 0:
        raise ValueError(f"{name} must be a real scalar > 0; got {value!r}")


def _resolve_dt(dt, rL) -> float:
    if dt is None:
        if not is_concrete(rL):
            raise ValueError(
                "dt must be given explicitly (a concrete float > 0) when rL is traced "
                "(e.g. differentiated); the default dt = rL/20 needs a concrete rL"
            )
        return float(rL) / 20.0
    return float(dt)


def _resolve_devices(devices) -> int:
    """Number of local devices to split particles over: ``devices`` or all local devices."""
    available = jax.local_device_count()
    if devices is None:
        return available
    if devices > available:
        raise ValueError(
            f"devices must be in [1, {available}] (the local {jax.default_backend()} devices; "
            f"for more CPU devices call crjax.use_cpu_cores() before JAX starts); got {devices}"
        )
    return int(devices)


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


# ----------------------------------------------------------------------------------------------
# host-side helpers shared by backtracking, ensembles and chaos


def cast_floats(tree, dtype):
    """Cast every floating array leaf of ``tree`` (e.g. a field Module) to ``dtype``."""

    def cast(leaf):
        if eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.floating):
            return leaf.astype(dtype)
        if isinstance(leaf, float):
            return jnp.asarray(leaf, dtype)
        return leaf

    return jax.tree_util.tree_map(cast, tree)


def check_field(field) -> None:
    """Raise unless ``field`` is callable and its concrete floating leaves are finite."""
    if not callable(field):
        raise ValueError(  # noqa: TRY004  (project convention: bad input is a ValueError)
            f"field must be a callable Module B(x) (e.g. a TurbulentField); got {field!r}"
        )
    for path, leaf in jax.tree_util.tree_leaves_with_path(field):
        floating = eqx.is_array(leaf) and jnp.issubdtype(leaf.dtype, jnp.inexact)
        if floating and is_concrete(leaf) and not np.all(np.isfinite(np.asarray(leaf))):
            raise ValueError(
                f"field{jax.tree_util.keystr(path)} contains NaN or inf; all must be finite"
            )


def reference_field_strength(field, b_ref):
    """B_ref, the field strength in which rL is the gyroradius: ``b_ref`` or |field.b0| (> 0)."""
    if b_ref is not None:
        _check_scalar("b_ref", b_ref)
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


def coupling(field, charge, rL, b_ref):
    """s/(rL B_ref) of the Lorentz term; ``b_ref`` None: |field.b0| (traced, e.g. in ensembles)."""
    b = jnp.linalg.norm(field.b0) if b_ref is None else b_ref
    return charge / (rL * b)


# ----------------------------------------------------------------------------------------------
# traced core


def integrate(
    plan: Plan,
    field: Callable,
    x0: Float[Array, "npix 3"],
    v0: Float[Array, "npix 3"],
    times: Float[Array, " ntimes"],
    coupling: Float[Array, ""],
) -> tuple[Float[Array, "ntimes npix 3"], Float[Array, "ntimes npix 3"], Int[Array, " npix"]]:
    """Integrate the Lorentz force from (x0, v0) at t = 0; returns (xs, vs, num_steps) at ``times``.

    With ``plan.devices`` > 1 the particles are split evenly over that many local devices: a vmap
    over a leading device axis, constrained to the device mesh, which XLA partitions into one loop
    per device (particles are independent, so this is exact). On a CPU exposed as one device per
    core (``crjax.use_cpu_cores``) that is one loop per core, measured 1.1-1.5x faster than one
    loop whose single operations XLA spreads over the cores (benchmarks/engine.py). Not
    ``jax.shard_map``: reverse mode through diffrax's checkpointed loop fails inside it (jax 0.10).
    """
    if plan.devices == 1:
        return _integrate_local(plan, field, x0, v0, times, coupling)
    nd, n = plan.devices, x0.shape[0]
    pad = -n % nd  # pad with copies of particle 0 so every device gets the same count
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:nd]), ("particles",))
    on_devices = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("particles"))

    def split(a):
        a = jnp.concatenate([a, jnp.broadcast_to(a[:1], (pad, 3))]).reshape(nd, -1, 3)
        return jax.lax.with_sharding_constraint(a, on_devices)

    def local(x, v):
        return _integrate_local(plan, field, x, v, times, coupling)

    xs, vs, nsteps = jax.vmap(local, out_axes=(1, 1, 0))(split(x0), split(v0))
    ntimes = xs.shape[0]
    return (
        xs.reshape(ntimes, -1, 3)[:, :n],
        vs.reshape(ntimes, -1, 3)[:, :n],
        nsteps.reshape(-1)[:n],
    )


def _integrate_local(plan: Plan, field, x0, v0, times, coupling):
    term = LorentzTerm(field, coupling)
    saveat = diffrax.SaveAt(ts=times)
    if isinstance(plan.solver, Boris):
        # One ODE with the batched state (npix, 3) + (npix, 3): a single while loop, no per-lane
        # predicates or selects. With the 256-mode field the push is field-bound and vmap over
        # per-particle solves measured within ±20% of this (benchmarks/engine.py prints both).
        grid = plan.stepsize_controller.ts
        sol = diffrax.diffeqsolve(
            term,
            plan.solver,
            t0=grid[0],
            t1=grid[-1],
            dt0=None,
            y0=(x0, v0),
            saveat=saveat,
            stepsize_controller=plan.stepsize_controller,
            max_steps=plan.max_steps,
            adjoint=plan.adjoint,
        )
        xs, vs = sol.ys
        nsteps = jnp.full(x0.shape[:1], sol.stats["num_steps"] * plan.solver.substeps)
        return xs, vs, nsteps

    # Per-particle stepping: each trajectory chooses its own steps.
    def one(x0i, v0i):
        sol = diffrax.diffeqsolve(
            term,
            plan.solver,
            t0=jnp.zeros((), times.dtype),
            t1=times[-1],
            dt0=plan.dt0,
            y0=(x0i, v0i),
            saveat=saveat,
            stepsize_controller=plan.stepsize_controller,
            max_steps=plan.max_steps,
            adjoint=plan.adjoint,
        )
        xs, vs = sol.ys
        return xs, vs, sol.stats["num_steps"]

    return jax.vmap(one, out_axes=(1, 1, 0))(x0, v0)
