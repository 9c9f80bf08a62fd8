"""Gradient-free baseline of the inverse problem (inference/inverse.py: Nelder–Mead at equal budget).

References: a dense grid over the angle (for the closed-form profile), the budget counted by the
number of distinct ensembles actually simulated, and a held-out synthetic target.
"""

import jax
import numpy as np
import pytest

import crjax
from inference import inverse

RL, DT = 0.1, 0.005
TRUTH = np.array([1.0, RL, 11 / 3, 0.5])


@pytest.fixture(scope="module")
def target():
    """Tiny target: nside 2, 8 modes, tΩ = 10, 256 realisations with keys no fit uses."""
    base = crjax.FieldParams(n_modes=8)
    held = inverse.tensor_sample(base, jax.random.PRNGKey(999), 256, 2, [1.0], rL=RL, dt=DT)
    return base, inverse.spectrum_model(held, TRUTH[3]), held


def test_profiled_angle_is_the_grid_minimum(target):
    _, tm, held = target
    cinv = np.linalg.inv(tm.cov / 256)
    # a target at another angle, from the same ensemble: the profile must find it (χ² = 0 there)
    t = inverse.spectrum_model(held, 0.9).mean
    alpha = inverse._profile_angle(held, t, cinv)
    grid = np.linspace(0.0, np.pi / 2, 2001)
    chi2 = [(t - m) @ cinv @ (t - m) for m in (inverse.spectrum_model(held, a).mean for a in grid)]
    # grid spacing 8e-4 rad; the closed form is exact
    assert abs(alpha - grid[int(np.argmin(chi2))]) < 1e-3
    assert abs(alpha - 0.9) < 1e-9


def test_nelder_mead_spends_at_most_its_budget_and_recovers(target):
    base, tm, _ = target
    res = inverse.fit_parameters_nelder_mead(
        tm.mean, tm.cov / 256, [0.6, RL, 11 / 3, 0.9], jax.random.PRNGKey(5), base=base, nside=2,
        t_end=1.0, dt=DT, n_sim=64, max_ensembles=12, free=("sigma2", "angle"))
    assert res.n_ensembles <= 12 and res.n_realisations == 64 * res.n_ensembles
    # every evaluation at a new σ² is a new ensemble; α is profiled, so evaluations == ensembles
    assert len(res.chi2) == res.n_ensembles
    # common random numbers: the objective at the estimate is reproducible from the key alone
    again = inverse.tensor_sample(inverse._params_for(base, res.theta), jax.random.PRNGKey(5), 64,
                                  2, [1.0], rL=RL, dt=DT)
    r = tm.mean - inverse.spectrum_model(again, res.theta[3]).mean
    assert res.chi2.min() == pytest.approx(float(r @ np.linalg.inv(tm.cov / 256) @ r), rel=1e-9)
    # moved from the start towards the truth in σ² (the start is 40% low)
    assert abs(res.theta[0] - TRUTH[0]) < abs(0.6 - TRUTH[0])
    assert res.theta[1] == RL and res.theta[2] == pytest.approx(11 / 3)


def test_compare_gradient_free_reports_both_at_equal_budget(target):
    base, tm, _ = target
    out = inverse.compare_gradient_free(
        tm.mean, tm.cov / 256, TRUTH, [0.6, RL, 11 / 3, 0.9], jax.random.PRNGKey(6), base=base,
        nside=2, t_end=1.0, dt=DT, n_sim=64, steps=10, learning_rate=0.08,
        free=("sigma2", "angle"), n_data=256)
    assert out["budget"] == 640
    assert out["nelder_mead"]["n_realisations"] <= 640
    assert out["gradient"]["n_realisations"] == 640 + 4 * 64
    for m in ("gradient", "nelder_mead"):
        assert set(out[m]["error_over_sigma"]) == {"sigma2", "angle"}
        assert all(np.isfinite(v) for v in out[m]["error_over_sigma"].values())


def test_bad_inputs_raise(target):
    base, tm, _ = target
    with pytest.raises(ValueError, match="max_ensembles"):
        inverse.fit_parameters_nelder_mead(tm.mean, tm.cov, TRUTH, jax.random.PRNGKey(0),
                                           base=base, nside=2, t_end=1.0, dt=DT, max_ensembles=0)
    with pytest.raises(ValueError, match="free"):
        inverse.fit_parameters_nelder_mead(tm.mean, tm.cov, TRUTH, jax.random.PRNGKey(0),
                                           base=base, nside=2, t_end=1.0, dt=DT, free=("B",))
