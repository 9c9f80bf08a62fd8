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
    assert abs(alpha - 0.9) < 1e-9  # closed form: exact up to round-off
    # and for the real target: no angle of a grid does better than the profiled one
    t = tm.mean
    alpha = inverse._profile_angle(held, t, cinv)

    def chi2(a):
        r = t - inverse.spectrum_model(held, a).mean
        return float(r @ cinv @ r)

    grid = np.linspace(0.0, np.pi / 2, 41)
    assert chi2(alpha) <= min(chi2(a) for a in grid) + 1e-9


def test_nelder_mead_spends_at_most_its_budget_and_recovers(target):
    base, tm, _ = target
    res = inverse.fit_parameters_nelder_mead(
        tm.mean, tm.cov / 256, [0.6, RL, 11 / 3, 0.9], jax.random.PRNGKey(5), base=base, nside=2,
        t_end=1.0, dt=DT, n_sim=64, max_ensembles=12, free=("sigma2", "angle"))
    assert res.n_ensembles <= 12 and res.n_realisations == 64 * res.n_ensembles
    # α is profiled, so every distinct σ² evaluated is one ensemble (Nelder–Mead may revisit a point;
    # the cache serves it without a simulation)
    assert len(np.unique(res.path[:, 0])) == res.n_ensembles <= len(res.chi2)
    # common random numbers: the objective at the estimate is reproducible from the key alone
    again = inverse.tensor_sample(inverse._params_for(base, res.theta), jax.random.PRNGKey(5), 64,
                                  2, [1.0], rL=RL, dt=DT)
    r = tm.mean - inverse.spectrum_model(again, res.theta[3]).mean
    assert res.chi2.min() == pytest.approx(float(r @ np.linalg.inv(tm.cov / 256) @ r), rel=1e-9)
    assert res.chi2.min() < res.chi2[0]  # it improved on the start
    # within 3σ of the truth, σ from the target's raw Fisher matrix inflated by the noise of the
    # fixed 64-realisation CRN ensemble the objective is made of: var × (1 + n_data/n_sim) = 5
    sig = np.sqrt(np.diag(np.linalg.inv(
        inverse.fisher_matrix(tm, 256, ("sigma2", "angle"), debias=False)))) * np.sqrt(5.0)
    z = (res.theta[[0, 3]] - TRUTH[[0, 3]]) / sig
    assert np.all(np.abs(z) < 3), (res.theta, sig)
    assert res.theta[1] == pytest.approx(RL) and res.theta[2] == pytest.approx(11 / 3)


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
