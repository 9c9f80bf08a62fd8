"""The engine's settings Module, solver registry and step plan (host side; no integration here).

References: the plan's defining properties (every save time on the grid, pushes <= dt, the fewest
pushes that do both), diffrax's own solver and controller classes, jax.jit's static-argument cache.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crjax
from crjax.engine import SOLVERS, Engine, Plan, solver_from_name


def test_registry():
    assert tuple(SOLVERS) == ("boris", "tsit5", "dopri8")
    kinds = {"boris": crjax.Boris, "tsit5": diffrax.Tsit5, "dopri8": diffrax.Dopri8}
    for name, cls in kinds.items():
        assert type(solver_from_name(name)) is cls
        assert type(Engine(solver=name).solver) is cls
    with pytest.raises(TypeError):
        SOLVERS["euler"] = diffrax.Euler  # one registry, read-only
    with pytest.raises(ValueError, match=r"one of \('boris', 'tsit5', 'dopri8'\)"):
        solver_from_name("euler")


def test_engine_defaults_equality_and_hash():
    e = Engine()
    assert isinstance(e.solver, crjax.Boris) and e.stepsize_controller is None
    assert e.dtype == jnp.float64 and isinstance(e.adjoint, diffrax.RecursiveCheckpointAdjoint)
    assert crjax.Engine is Engine
    # names resolve to the same object as the solver passed directly: equal and equally hashed
    a = Engine(solver="tsit5", stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-11))
    b = Engine(
        solver=diffrax.Tsit5(), stepsize_controller=diffrax.PIDController(rtol=1e-9, atol=1e-11)
    )
    assert a == b and hash(a) == hash(b)
    assert Engine(dtype=np.float32) == Engine(dtype="float32") != Engine()


def test_engine_as_static_jit_argument():
    traces = []

    def g(x, engine):
        traces.append(engine)
        return x * (2.0 if isinstance(engine.solver, crjax.Boris) else 3.0)

    f = jax.jit(g, static_argnames="engine")
    assert f(1.0, engine=Engine()) == 2.0
    assert f(1.0, engine=Engine(solver="boris")) == 2.0  # equal engine: cached, no new trace
    assert f(1.0, engine=Engine(solver="dopri8")) == 3.0
    assert len(traces) == 2


def test_engine_replace():
    e = Engine(devices=1)
    r = e.replace(dt=0.01, devices=None)  # None keeps the engine's value
    assert r.dt == 0.01 and r.devices == 1 and e.dt is None
    assert e.replace() is e
    with pytest.raises(ValueError, match=r"unknown engine setting\(s\) \['step'\]"):
        e.replace(step=0.1)


@pytest.mark.parametrize(
    "times, dt",
    [
        (np.array([0.05, 0.3, 1.0]), 0.005),
        (np.array([0.8]), 0.005),  # 160 pushes: whole 16-push steps
        (np.array([0.0123, 0.1, 0.1001, 2.0]), 0.01),  # a save interval much shorter than dt
    ],
)
def test_boris_plan(times, dt):
    plan, t = Engine(dt=dt).plan(times, 0.1)
    assert isinstance(plan, Plan) and isinstance(plan.solver, crjax.Boris)
    grid = np.asarray(plan.stepsize_controller.ts)
    k = plan.solver.substeps
    assert 1 <= k <= 16 and plan.max_steps == grid.size - 1
    # every save time is a grid point, exactly (Boris output there is not interpolated)
    assert grid[0] == 0.0 and set(times) <= set(grid)
    np.testing.assert_array_equal(t, times)
    # pushes no longer than dt, and within 1% of the fewest pushes that hit every save time
    assert np.all(np.diff(grid) / k <= dt * (1 + 1e-9))
    fewest = sum(np.ceil(np.diff(np.concatenate([[0.0], times])) / dt - 1e-9))
    assert fewest <= (grid.size - 1) * k <= 1.01 * fewest
    # traced leaves: the grid and the first step only (new values never recompile)
    dynamic = jax.tree_util.tree_leaves(eqx.partition(plan, eqx.is_array)[0])
    assert len(dynamic) == 2


def test_adaptive_plan_defaults_and_dtype():
    times = np.array([0.1, 0.2])
    plan, t = Engine(solver="tsit5", dtype=jnp.float32, devices=1).plan(times, 0.1)
    ctrl = plan.stepsize_controller
    assert isinstance(ctrl, diffrax.PIDController) and plan.devices == 1
    # the documented default tolerances, as traced arrays of the engine's dtype
    assert ctrl.rtol.dtype == jnp.float32 and float(ctrl.rtol) == np.float32(1e-8)
    assert float(ctrl.atol) == np.float32(1e-10) and t.dtype == jnp.float32
    assert float(plan.dt0) == np.float32(0.1 / 20)  # default dt = rL/20
    assert plan.max_steps == 64 * 40 + 4096  # 64x the rL/20 step count + 4096
    # a non-adaptive diffrax solver steps at constant dt
    plan, _ = Engine(solver=diffrax.Heun(), stepsize_controller=diffrax.ConstantStepSize()).plan(
        times, 0.1
    )
    assert isinstance(plan.stepsize_controller, diffrax.ConstantStepSize)
    plan, _ = Engine(solver=diffrax.Euler()).plan(times, 0.1)
    assert isinstance(plan.stepsize_controller, diffrax.ConstantStepSize)


def test_plan_needs_concrete_times_and_dt():
    with pytest.raises(ValueError, match="times must be concrete"):
        jax.jit(lambda t: Engine().plan(t, 0.1)[1])(jnp.array([0.1]))
    with pytest.raises(ValueError, match="dt must be given explicitly"):
        jax.jit(lambda rL: Engine().plan(np.array([0.1]), rL)[1])(0.1)
    with pytest.raises(ValueError, match="dt must be a concrete"):
        jax.jit(lambda dt: Engine(dt=dt).dt)(0.1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (
            {
                "solver": crjax.Boris(),
                "stepsize_controller": diffrax.PIDController(rtol=1e-8, atol=0),
            },
            "Boris",
        ),
        (
            {
                "solver": diffrax.Euler(),
                "stepsize_controller": diffrax.PIDController(rtol=1e-8, atol=0),
            },
            "adaptive solver",
        ),
        ({"dtype": jnp.int32}, "dtype"),
        ({"dtype": jnp.complex128}, "dtype"),
        ({"max_steps": 0}, "max_steps"),
        ({"devices": -2}, "devices"),
        ({"adjoint": diffrax.Tsit5()}, "adjoint"),
        ({"solver": "Tsit5"}, "solver"),  # names are lower case, as in the registry
    ],
)
def test_engine_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Engine(**kwargs)


def test_engine_modules_are_not_shadowed():
    # issue 11: no function shadows its module
    import types

    import crjax.backtracking as bt
    import crjax.chaos as ch
    import crjax.engine as eng
    import crjax.ensemble as ens

    for module in (bt, ch, eng, ens):
        assert isinstance(module, types.ModuleType)
    assert crjax.backtrack is bt.backtrack and crjax.run_ensemble is ens.run_ensemble
    assert crjax.lyapunov_exponent is ch.lyapunov_exponent
