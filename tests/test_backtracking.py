"""Backtracking: analytic helices, invariants, reversibility, sign convention, devices, gradients.

References we did not write: the analytic helix in a uniform field (and the Boris map's known
exact discrete helix, Ω' = (2/h) arctan(Ωh/2)), Taylor expansion of the Lorentz force at t → 0,
healpy pixel centres, finite differences (``jax.test_util.check_grads``) and physics.md §7.
"""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import crjax
from crjax.backtracking import Trajectory, _propagate_jit, backtrack, propagate
from crjax.engine import _auto_substeps, _step_grid
from crjax.field import FieldParams, realise_field, uniform_field

RL = 0.1
# rtol 1e-10, atol 1e-12: the adaptive reference's tolerances in the tests below
TIGHT = diffrax.PIDController(rtol=1e-10, atol=1e-12)
TIMES = np.array([0.05, 0.3, 1.0])  # tΩ = 0.5, 3, 10
EPS64 = np.finfo(np.float64).eps


@pytest.fixture(scope="module")
def dirs():
    return crjax.healpix_directions(2)  # 48 directions


@pytest.fixture(scope="module")
def turb():
    """A small seed-like realisation (σ² = 1, λ 0.01–100 Lc) with 64 modes: cheap but chaotic."""
    return realise_field(jax.random.PRNGKey(7), FieldParams(n_modes=64))


@pytest.fixture(scope="module")
def b0_only(turb):
    """Pure B0 = ẑ as a 64-mode field with zero amplitudes: same shapes as ``turb``, so the tests
    share compiled code (checked against ``uniform_field`` below)."""
    return eqx.tree_at(lambda f: f.amplitudes, turb, jnp.zeros_like(turb.amplitudes))


def test_b0_only_is_uniform(b0_only):
    x = jax.random.normal(jax.random.PRNGKey(0), (5, 3))
    np.testing.assert_allclose(b0_only(x), uniform_field()(x), atol=1e-15)


def _helix(p, times, rL, phase):
    """Antiparticle (charge −1) from 0 with velocity −p̂ in B = ẑ: returns particle-convention
    (positions r(−T), velocities p̂(−T)). ``phase`` is the gyration phase Φ(T) (ΩT exactly)."""
    w0 = -(p[:, 0] + 1j * p[:, 1])  # antiparticle's transverse velocity, complex
    # dw/dt = −i s Ω w with s = −1: w = w0 e^{iΦ}; position = ∫w dt = w0 (e^{iΦ} − 1)/(iΩ).
    e = np.exp(1j * phase[:, None])
    pos_perp = w0[None] * (e - 1) * rL / 1j
    vel_perp = w0[None] * e
    pos = np.stack([pos_perp.real, pos_perp.imag, -p[None, :, 2] * times[:, None]], -1)
    vel = -np.stack(
        [vel_perp.real, vel_perp.imag, -np.broadcast_to(p[None, :, 2], vel_perp.shape)], -1
    )
    return pos, vel


def _boris_phase(times, rL, dt):
    """Gyration phase of the Boris map: each push of length h rotates v by 2 arctan(Ωh/2)."""
    k = _auto_substeps(times, dt)
    grid = _step_grid(times, dt, k)
    h = np.repeat(np.diff(grid) / k, k)
    t = np.concatenate([[0.0], np.cumsum(h)])
    phase = np.concatenate([[0.0], np.cumsum(2 * np.arctan(h / (2 * rL)))])
    return np.interp(times, t, phase)


# --------------------------------------------------------------------------------------------
# pure B0: analytic helices


def test_boris_is_exact_discrete_helix(dirs, b0_only):
    p = np.asarray(dirs)
    tr = backtrack(b0_only, dirs, TIMES, rL=RL)
    assert isinstance(tr, Trajectory)
    assert tr.positions.shape == (3, 48, 3) and tr.velocities.shape == (3, 48, 3)
    assert tr.positions.dtype == jnp.float64
    pos, vel = _helix(p, TIMES, RL, _boris_phase(TIMES, RL, RL / 20))
    # The Boris orbit in a uniform field is exactly a helix of radius rL with phase Σ 2arctan(Ωh/2):
    # only round-off differs, ~ steps (~200) · eps · |r| ≲ 1e-13.
    np.testing.assert_allclose(tr.positions, pos, rtol=0, atol=1e-12)
    np.testing.assert_allclose(tr.velocities, vel, rtol=0, atol=1e-12)


@pytest.mark.slow
def test_boris_second_order_in_dt(dirs, b0_only):
    p = np.asarray(dirs)
    times = np.array([0.8])  # 80 or 160 pushes: whole numbers of 16-push diffrax steps, so h = dt
    exact, _ = _helix(p, times, RL, times / RL)
    errs = []
    for dt in (RL / 10, RL / 20):
        tr = backtrack(b0_only, dirs, times, rL=RL, dt=dt)
        errs.append(np.abs(np.asarray(tr.positions) - exact).max())
    # Phase error Ω³h²T/12 → halving h divides the error by 4 (3.8–4.2 allows the O(h⁴) term).
    assert 3.8 < errs[0] / errs[1] < 4.2
    # and its size is the known phase error times rL (chord ≤ rL·ΔΦ)
    assert errs[1] <= RL * (times[0] / RL) * (0.05**2) / 12 * 1.01


@pytest.fixture(scope="module")
def b0_rk(dirs, b0_only):
    return backtrack(b0_only, dirs, TIMES, rL=RL, solver=diffrax.Tsit5(), stepsize_controller=TIGHT)


def test_adaptive_rk_matches_helix(dirs, b0_rk):
    pos, vel = _helix(np.asarray(dirs), TIMES, RL, TIMES / RL)
    # rtol 1e-10 per step, ~100 steps, dense output at save times: 1e-8 absolute is ample.
    np.testing.assert_allclose(b0_rk.positions, pos, rtol=0, atol=1e-8)
    np.testing.assert_allclose(b0_rk.velocities, vel, rtol=0, atol=1e-8)


@pytest.mark.slow
def test_dopri8_matches_helix(dirs, b0_only):
    pos, _vel = _helix(np.asarray(dirs), TIMES, RL, TIMES / RL)
    tr = backtrack(b0_only, dirs, TIMES, rL=RL, solver="dopri8", stepsize_controller=TIGHT)
    np.testing.assert_allclose(tr.positions, pos, rtol=0, atol=1e-8)


def test_pure_b0_moments_isotropic_formulae(dirs, b0_rk):
    """⟨Δz²⟩ = t²/3, ⟨Δx²⟩ = (2/3)rL²(1 − cos Ωt) (physics.md §7) over HEALPix nside 2."""
    p = np.asarray(dirs)
    # The only deviation allowed is the HEALPix quadrature error of ⟨μ²⟩ (healpy pixel centres:
    # 0.0081 at nside 2).
    quad = abs((p[:, 2] ** 2).mean() - 1 / 3)
    r = np.asarray(b0_rk.positions)
    z2 = (r[..., 2] ** 2).mean(-1)
    np.testing.assert_allclose(z2 / TIMES**2, 1 / 3, rtol=0, atol=quad + 1e-9)
    x2 = (r[..., 0] ** 2).mean(-1)
    bound = 2 / 3 * RL**2 * (1 - np.cos(TIMES / RL))
    # ⟨Δx²⟩ ∝ ⟨(1 − μ²)⟩/2 = 1/3 + quad/2 on the grid: relative quadrature error 1.5·quad.
    np.testing.assert_allclose(x2, bound, rtol=1.5 * quad + 1e-8)


BALLISTIC_T = np.array([1e-3 * RL, 2e-3 * RL])


def test_sign_convention_taylor(dirs, b0_only):
    """r(−T) = −p̂T + a T²/2 + O(T³) with the *particle's* acceleration a = p̂ × B/rL (charge +):
    Taylor expansion of the particle's own trajectory backwards in time."""
    p = np.asarray(dirs)
    T = BALLISTIC_T
    tr = backtrack(b0_only, dirs, T, rL=RL, dt=T[0] / 4)
    a = np.cross(p, [0.0, 0.0, 1.0]) / RL
    expect = -p[None] * T[:, None, None] + 0.5 * a[None] * T[:, None, None] ** 2
    # next Taylor term ~ T³/(6 rL²) = 3e-3 T²/(2 rL)·(T/1e-4): a tolerance of 1% of the T² term
    np.testing.assert_allclose(tr.positions, expect, rtol=0, atol=1e-2 * 0.5 * T[-1] ** 2 / RL)
    # e.g. p̂ ⊥ ẑ: a positive particle gyrates clockwise seen from +z; the opposite sense fails
    wrong = -p[None] * T[:, None, None] - 0.5 * a[None] * T[:, None, None] ** 2
    assert not np.allclose(tr.positions, wrong, rtol=0, atol=1e-2 * 0.5 * T[-1] ** 2 / RL)


# --------------------------------------------------------------------------------------------
# turbulence: limits and invariants


def test_ballistic_limit(dirs, turb):
    T = BALLISTIC_T
    tr = backtrack(turb, dirs, T, rL=RL, dt=T[0] / 4)
    p = np.asarray(dirs)
    # |dv/dt| ≤ max|B|/(rL B0) ≤ (B0 + Σ|A_n|)/rL, so |r(−T) + p̂T| ≤ T²·that/2 (Taylor remainder).
    bmax = 1.0 + float(jnp.sum(jnp.linalg.norm(turb.amplitudes, axis=-1)))
    dev = np.linalg.norm(np.asarray(tr.positions) + p[None] * T[:, None, None], axis=-1)
    assert np.all(dev <= 0.5 * T[:, None] ** 2 * bmax / RL)
    # ⟨x_i²⟩/T² → 1/3 up to the HEALPix quadrature (< 0.0082 at nside 2) and O(T/rL) = 2e-3
    m2 = (np.asarray(tr.positions) ** 2).mean(1) / T[:, None] ** 2
    np.testing.assert_allclose(m2, 1 / 3, atol=0.0082 + 4e-3)


def test_boris_speed_and_reversibility(dirs, turb):
    T = np.array([0.8])  # tΩ = 8, 160 pushes through strong turbulence
    tr = backtrack(turb, dirs, T, rL=RL)
    speed = np.linalg.norm(np.asarray(tr.velocities), axis=-1)
    # Boris rotates v exactly: only round-off, a random walk of ~√160·eps per component.
    assert np.abs(speed - 1).max() < 100 * EPS64
    fwd = propagate(turb, tr.positions[-1], tr.velocities[-1], T, rL=RL, charge=1.0)
    # Back then forward returns to the origin with direction p̂: the drift–kick–drift Boris map is
    # time symmetric, so only round-off (amplified by chaos, e^{λT} with λT ≲ 10) remains.
    np.testing.assert_allclose(fwd.positions[-1], 0.0, atol=1e-9)
    np.testing.assert_allclose(fwd.velocities[-1], dirs, atol=1e-9)


def test_rk_reversibility(dirs, turb):
    tr = backtrack(turb, dirs, TIMES, rL=RL, solver="tsit5", stepsize_controller=TIGHT)
    fwd = propagate(
        turb,
        tr.positions[-1],
        tr.velocities[-1],
        TIMES,
        rL=RL,
        solver=diffrax.Tsit5(),
        stepsize_controller=TIGHT,
    )
    # rtol 1e-10 per step, ~1000 steps each way, chaos over tΩ = 10 (e^{λT} ≲ 1e3): 1e-5
    np.testing.assert_allclose(fwd.positions[-1], 0.0, atol=1e-5)
    np.testing.assert_allclose(fwd.velocities[-1], dirs, atol=1e-5)
    assert np.all(tr.num_steps > 0)


def test_float32_option(dirs, turb):
    t64 = backtrack(turb, dirs, TIMES, rL=RL)
    t32 = backtrack(turb, dirs, TIMES, rL=RL, dtype=jnp.float32)
    assert t32.positions.dtype == jnp.float32 and t32.velocities.dtype == jnp.float32
    # fp32 round-off 6e-8 per operation, ~60 pushes to tΩ = 3, the field summed over 64 modes:
    # ~1e-6 relative; 2e-5 absolute on |r| ≲ 0.3 leaves room for the short-horizon chaos.
    np.testing.assert_allclose(t32.positions[:2], t64.positions[:2], atol=2e-5)
    speed = np.linalg.norm(np.asarray(t32.velocities, np.float64), axis=-1)
    assert np.abs(speed - 1).max() < 200 * 1.2e-7  # |v|: fp32 round-off walk over 200 pushes


# --------------------------------------------------------------------------------------------
# particles split over devices (conftest exposes 2 CPU devices; the default uses both)


def test_two_devices_in_the_suite():
    # the device-split tests below would silently compare a path with itself otherwise
    assert jax.local_device_count() == 2


@pytest.mark.parametrize("n", [48, 7])  # even split, and padding with copies of particle 0
def test_device_split_matches_one_device(dirs, turb, n):
    p = dirs[:n]
    one = backtrack(turb, p, TIMES, rL=RL, devices=1)
    two = backtrack(turb, p, TIMES, rL=RL, devices=2)
    assert two.positions.shape == (TIMES.size, n, 3) and two.num_steps.shape == (n,)
    # the same per-particle arithmetic on either device: equal to round-off (observed: bitwise)
    np.testing.assert_allclose(two.positions, one.positions, rtol=0, atol=1e-13)
    np.testing.assert_allclose(two.velocities, one.velocities, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(two.num_steps, one.num_steps)


def test_device_split_adaptive(turb):
    # Adaptive steps are chosen per particle, so the split cannot change them.
    p = crjax.healpix_directions(1)[:5]
    one, two = (
        backtrack(turb, p, np.array([0.05]), rL=RL, solver="tsit5", devices=d) for d in (1, 2)
    )
    np.testing.assert_array_equal(two.num_steps, one.num_steps)
    np.testing.assert_allclose(two.positions, one.positions, rtol=0, atol=1e-13)


def _split_observable(field, rL, devices):
    tr = backtrack(
        field,
        crjax.healpix_directions(1)[:5],
        np.array([0.05]),
        rL=rL,
        dt=RL / 20,
        devices=devices,
    )
    return jnp.sum(tr.positions[-1] ** 2 * jnp.arange(1.0, 6.0)[:, None])


def test_device_split_reverse_mode_gradients(turb):
    # (Forward mode through the split is test_gradients_forward_mode: the default uses 2 devices.)
    # Cotangents of the (replicated) field must be summed over the devices' particles: a missing
    # sum would drop one device's share.
    g1, g2 = (eqx.filter_grad(_split_observable)(turb, RL, n) for n in (1, 2))
    for a, b in zip(jax.tree_util.tree_leaves(g1), jax.tree_util.tree_leaves(g2)):
        np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-14)


def test_devices_bad_input(dirs, turb):
    with pytest.raises(ValueError, match=r"devices must be in \[1, 2\]"):
        backtrack(turb, dirs, TIMES, rL=RL, devices=3)
    with pytest.raises(ValueError, match="devices"):
        backtrack(turb, dirs, TIMES, rL=RL, devices=0)
    # JAX has started with 2 CPU devices: asking for another count now is a clear error
    assert crjax.use_cpu_cores(2) == 2
    with pytest.raises(RuntimeError, match="before JAX runs"):
        crjax.use_cpu_cores(3)


# --------------------------------------------------------------------------------------------
# API: compile cache, bad input


def test_no_recompile_same_shapes(dirs, turb):
    backtrack(turb, dirs, TIMES, rL=RL)
    size = _propagate_jit._cache_size()
    # Different rL (same dt), directions and field values with the same shapes: no recompile.
    other = realise_field(jax.random.PRNGKey(8), FieldParams(n_modes=64, sigma2=0.5))
    backtrack(other, jnp.roll(dirs, 1, axis=0), TIMES, rL=0.11, dt=RL / 20)
    propagate(turb, jnp.ones((48, 3)), dirs, TIMES, rL=RL)
    assert _propagate_jit._cache_size() == size


def test_no_recompile_adaptive_tolerances(turb):
    # PID tolerances are traced leaves of the plan: new values, same code. (A new dt changes the
    # default max_steps, a static loop bound, so it does recompile.)
    p, t = crjax.healpix_directions(1)[:5], np.array([0.05])
    a = backtrack(turb, p, t, rL=RL, solver="tsit5", devices=1)
    size = _propagate_jit._cache_size()
    ctrl = diffrax.PIDController(rtol=1e-6, atol=1e-8)
    b = backtrack(turb, p, t, rL=RL, solver="tsit5", stepsize_controller=ctrl, devices=1)
    assert _propagate_jit._cache_size() == size
    # and they are used: looser tolerances take fewer steps
    assert np.all(b.num_steps < a.num_steps)


def test_solver_objects_and_names_agree(turb):
    p, t = crjax.healpix_directions(1)[:5], np.array([0.05])
    by_name = backtrack(turb, p, t, rL=RL, solver="tsit5", devices=1)
    by_object = backtrack(turb, p, t, rL=RL, solver=diffrax.Tsit5(), devices=1)
    default_pid = diffrax.PIDController(rtol=1e-8, atol=1e-10)  # the documented default
    explicit = backtrack(
        turb, p, t, rL=RL, solver=diffrax.Tsit5(), stepsize_controller=default_pid, devices=1
    )
    for tr in (by_object, explicit):
        np.testing.assert_array_equal(tr.positions, by_name.positions)
        np.testing.assert_array_equal(tr.num_steps, by_name.num_steps)


def test_engine_module_and_keyword_override(dirs, turb):
    # crjax.Boris() with any substeps: the plan chooses substeps, so the result is the default's.
    default = backtrack(turb, dirs, TIMES, rL=RL)
    engine = crjax.Engine(solver=crjax.Boris(substeps=3), devices=1)
    via_engine = backtrack(turb, dirs, TIMES, rL=RL, engine=engine)
    # keywords replace the engine's fields: devices=2 (the default) again
    overridden = backtrack(turb, dirs, TIMES, rL=RL, engine=engine, devices=2)
    np.testing.assert_allclose(via_engine.positions, default.positions, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(overridden.positions, default.positions)


NAN3 = np.array([[1.0, 0.0, 0.0], [np.nan, 0.0, 1.0], [0.0, 1.0, 0.0]])
INF3 = np.array([[1.0, 0.0, 0.0], [0.0, np.inf, 1.0], [0.0, 1.0, 0.0]])
ZERO3 = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        # rL: zero, negative, non-finite
        ({"rL": 0.0}, "rL"),
        ({"rL": -1.0}, "rL"),
        ({"rL": np.nan}, "rL"),
        ({"rL": np.inf}, "rL"),
        ({"rL": np.array([0.1, 0.2])}, "rL must be a real scalar"),
        # dt: zero, negative, non-finite, not a scalar, not a number, too small to count in int32
        ({"rL": 0.1, "dt": 0.0}, "dt"),
        ({"rL": 0.1, "dt": -0.01}, "dt"),
        ({"rL": 0.1, "dt": np.nan}, "dt"),
        ({"rL": 0.1, "dt": np.inf}, "dt"),
        ({"rL": 0.1, "dt": [0.01, 0.02]}, "dt"),
        ({"rL": 0.1, "dt": "0.01"}, "dt"),
        ({"rL": 0.1, "dt": True}, "dt"),
        ({"rL": 0.1, "dt": 1e-12}, "dt"),
        # times: empty, unsorted, non-positive, non-finite, not 1-D
        ({"rL": 0.1, "times": []}, "times"),
        ({"rL": 0.1, "times": [0.2, 0.1]}, "times"),
        ({"rL": 0.1, "times": [0.0, 0.1]}, "times"),
        ({"rL": 0.1, "times": [0.1, np.nan]}, "times"),
        ({"rL": 0.1, "times": [0.1, np.inf]}, "times"),
        ({"rL": 0.1, "times": [[0.1]]}, "times"),
        # directions: shape, NaN, inf, zero vectors, empty, nside
        ({"rL": 0.1, "directions": np.ones((4, 2))}, "directions"),
        ({"rL": 0.1, "directions": np.ones(3)}, "directions"),
        ({"rL": 0.1, "directions": np.ones((0, 3))}, "directions"),
        ({"rL": 0.1, "directions": NAN3}, r"directions must be finite; rows \[1\]"),
        ({"rL": 0.1, "directions": INF3}, r"directions must be finite; rows \[1\]"),
        ({"rL": 0.1, "directions": ZERO3}, r"directions must be non-zero.*rows \[1\]"),
        ({"rL": 0.1, "directions": np.full((2, 3), 1e-200), "dtype": jnp.float32}, "non-zero"),
        ({"rL": 0.1, "directions": "north"}, "directions"),
        ({"rL": 0.1, "directions": 0}, "nside"),
        ({"rL": 0.1, "directions": 3}, "nside"),
        # engine settings
        ({"rL": 0.1, "solver": "euler"}, "solver must be one of"),
        ({"rL": 0.1, "solver": 3}, "solver"),
        ({"rL": 0.1, "solver": diffrax.Tsit5}, r"solver must be a solver object.*Tsit5\(\)"),
        ({"rL": 0.1, "dtype": jnp.int32}, "dtype"),
        ({"rL": 0.1, "dtype": "complex128"}, "dtype"),
        ({"rL": 0.1, "dtype": "no-such-type"}, "dtype"),
        ({"rL": 0.1, "solver": "tsit5", "max_steps": 0}, "max_steps"),
        ({"rL": 0.1, "max_steps": 2.5}, "max_steps"),
        ({"rL": 0.1, "max_steps": 3}, "max_steps must be >= 20"),
        ({"rL": 0.1, "adjoint": "forward"}, "adjoint"),
        ({"rL": 0.1, "devices": 0}, "devices"),
        ({"rL": 0.1, "devices": -1}, "devices"),
        ({"rL": 0.1, "devices": 1.5}, "devices"),
        ({"rL": 0.1, "devices": True}, "devices"),
        ({"rL": 0.1, "devices": 3}, r"devices must be in \[1, 2\]"),
        ({"rL": 0.1, "stepsize_controller": diffrax.ConstantStepSize()}, "stepsize_controller"),
        ({"rL": 0.1, "solver": "tsit5", "stepsize_controller": "pid"}, "stepsize_controller"),
        (
            {"rL": 0.1, "solver": diffrax.Euler(), "stepsize_controller": TIGHT},
            "stepsize_controller PIDController needs an adaptive solver",
        ),
        (
            {
                "rL": 0.1,
                "solver": "tsit5",
                "stepsize_controller": diffrax.PIDController(rtol=np.nan, atol=1e-10),
            },
            "stepsize_controller.rtol",
        ),
        (
            {
                "rL": 0.1,
                "solver": "tsit5",
                "stepsize_controller": diffrax.PIDController(rtol=1e-8, atol=-1.0),
            },
            "stepsize_controller.atol",
        ),
        (
            {
                "rL": 0.1,
                "solver": "tsit5",
                "stepsize_controller": diffrax.PIDController(rtol=0.0, atol=0.0),
            },
            "both be 0",
        ),
        ({"rL": 0.1, "rtol": 1e-9}, r"unknown engine setting.*rtol.*PIDController"),
        ({"rL": 0.1, "engine": "boris"}, "engine must be a crjax.Engine"),
        # physics parameters
        ({"rL": 0.1, "b_ref": 0.0}, "b_ref"),
        ({"rL": 0.1, "b_ref": np.nan}, "b_ref"),
        ({"rL": 0.1, "b_ref": np.ones(3)}, "b_ref must be a real scalar"),
        ({"rL": 0.1, "field": lambda x: x, "directions": np.eye(3)}, "b_ref must be given"),
        ({"rL": 0.1, "field": "uniform"}, "field must be a callable"),
        (
            {
                "rL": 0.1,
                "field": eqx.tree_at(lambda f: f.b0, uniform_field(), jnp.array([0, 0, np.nan])),
            },
            r"field\.b0 contains NaN",
        ),
    ],
)
def test_bad_input(kwargs, match):
    # every class of bad input: a ValueError naming the parameter, before anything is compiled
    args = {"directions": np.eye(3), "times": [0.1], "field": uniform_field()}
    args.update(kwargs)
    field, directions, times = args.pop("field"), args.pop("directions"), args.pop("times")
    with pytest.raises(ValueError, match=match):
        backtrack(field, directions, times, **args)


@pytest.mark.parametrize(
    "positions, velocities, kwargs, match",
    [
        (NAN3, np.eye(3), {}, "positions must be finite"),
        (INF3, np.eye(3), {}, "positions must be finite"),
        (np.zeros((3, 3)), NAN3, {}, "velocities must be finite"),
        (np.zeros((3, 3)), ZERO3, {}, "velocities must be non-zero"),
        (np.zeros((2, 3)), np.eye(3), {}, "same shape"),
        (np.zeros((3, 3)), np.eye(3), {"charge": np.nan}, "charge"),
        (np.zeros((3, 3)), np.eye(3), {"charge": np.array([1.0, -1.0])}, "charge"),
    ],
)
def test_propagate_bad_input(positions, velocities, kwargs, match):
    with pytest.raises(ValueError, match=match):
        propagate(uniform_field(), positions, velocities, [0.1], rL=0.1, **kwargs)


def test_zero_regular_field_needs_b_ref(dirs, turb):
    f0 = eqx.tree_at(lambda f: f.b0, turb, jnp.zeros(3))
    with pytest.raises(ValueError, match="b_ref"):
        backtrack(f0, dirs, TIMES, rL=RL)
    tr = backtrack(f0, dirs, TIMES, rL=RL, b_ref=1.0)
    assert np.all(np.isfinite(tr.positions))


# --------------------------------------------------------------------------------------------
# gradients (short horizon: tΩ = 1, before chaos amplifies, physics.md §8)


def _short_observable(sigma2, rL, bdir, adjoint=None):
    params = FieldParams(sigma2=sigma2, b0_direction=bdir, n_modes=16)
    field = realise_field(jax.random.PRNGKey(1), params)
    # times and dt concrete (they fix the step count) so that rL can be traced; 20 pushes.
    tr = backtrack(
        field, crjax.healpix_directions(1), np.array([0.1]), rL=rL, dt=0.005, adjoint=adjoint
    )
    return jnp.mean(jnp.sum(tr.positions**2, axis=-1))


_GRAD_ARGS = (jnp.asarray(1.0), jnp.asarray(0.1), jnp.array([0.1, 0.2, 1.0]))


def test_gradients_forward_mode():
    # Forward mode (diffrax.ForwardMode: memory independent of the step count) — the cheaper
    # compile; reverse mode is checked in the slow tier. Central differences with eps 1e-4 on a
    # smooth O(1e-2) observable: check_grads' fp64 tolerance (1e-5 relative) covers O(eps²).
    fwd = jax.jit(lambda *a: _short_observable(*a, adjoint=diffrax.ForwardMode()))
    check_grads(fwd, _GRAD_ARGS, order=1, modes=("fwd",), eps=1e-4)


@pytest.mark.slow
def test_gradients_reverse_mode():
    check_grads(jax.jit(_short_observable), _GRAD_ARGS, order=1, modes=("rev",), eps=1e-4)


# --------------------------------------------------------------------------------------------
# slow validations


@pytest.mark.slow
def test_boris_speed_conserved_1e5_steps():
    field = realise_field(jax.random.PRNGKey(3), FieldParams())
    p = crjax.healpix_directions(1)
    tr = backtrack(field, p, np.array([1e5 * RL / 20]), rL=RL)
    assert int(tr.num_steps[0]) >= 100_000
    speed = np.linalg.norm(np.asarray(tr.velocities), axis=-1)
    # Round-off random walk over 1e5 pushes: ~√1e5·eps ≈ 7e-14; 1e-12 allows a biased walk.
    print(f"max ||v|-1| after {int(tr.num_steps[0])} Boris pushes: {np.abs(speed - 1).max():.2e}")
    assert np.abs(speed - 1).max() < 1e-12
