"""The spectrum emulator (inference/emulator.py): GP interpolation within noise, O(1) leave-one-out
residuals, gradients against finite differences, the angle contraction against spectrum_model, and
recovery of θ from a held-out synthetic spectrum. Tiny: nside 2, 8 modes, tΩ ≈ 10, 8 design points."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crjax
from inference import emulator as E
from inference import inverse

TINY = E.Design(sigma2_range=(0.5, 2.0), rL_range=(0.07, 0.14), n_points=8, n_realisations=32,
                nside=2, n_modes=8, t_end=1.0)


def _assert_within_twice_the_interval(fit, truth):
    """Each truth within the 68% profile interval widened to ~2σ (twice each half-width)."""
    for j, t in enumerate(truth):
        lo, hi = fit.intervals[j]
        best = fit.theta[j]
        assert best - 2 * (best - lo) - 1e-9 <= t <= best + 2 * (hi - best) + 1e-9, (
            j, fit.theta, fit.intervals)


@pytest.fixture(scope="module")
def emu():
    return E.build_emulator(TINY)


def test_gp_interpolates_design_points_within_their_noise(emu):
    s2, rl = E._from_unit(TINY, np.asarray(emu.x))
    pred = np.stack([np.asarray(E._components(emu, float(a), float(b))[0]) for a, b in zip(s2, rl)])
    z = (pred - np.asarray(emu.y)) / np.sqrt(np.asarray(emu.noise))
    # the GP mean at a design point shrinks the noisy mean towards its neighbours: within 3σ of the
    # point's own noise (a Gaussian |z| > 3 has probability 0.3%; 8 × 10 values here)
    assert np.max(np.abs(z)) < 3.0, np.abs(z).max(0)


def test_leave_one_out_residuals_are_order_one(emu):
    loo = E.loo_validation(emu)
    assert loo["z"].shape == (TINY.n_points, 2 * TINY.lmax)
    # standardised residuals of a well-specified GP have unit rms; with 80 correlated values a
    # factor-2 band is a loose but meaningful check (overfitting gives ≫ 1, an oversmoothed GP ≪ 1)
    assert 0.5 < loo["rms_z"] < 2.0, loo["rms_z"]
    assert loo["frac_abs_z_below_2"] > 0.85


def test_predict_gradient_matches_finite_differences(emu):
    def f(t):
        m, v = E.predict(emu, t[0], t[1], t[2])
        return jnp.concatenate([m, v])

    t0 = jnp.array([1.0, 0.1, 0.6])
    jac = np.asarray(jax.jacfwd(f)(t0))
    h = np.array([1e-5, 1e-6, 1e-5])
    fd = np.stack([(np.asarray(f(t0 + h[i] * np.eye(3)[i])) - np.asarray(f(t0 - h[i] * np.eye(3)[i])))
                   / (2 * h[i]) for i in range(3)], 1)
    # smooth closed-form function: central FD error O(h²) ≈ 1e-10 relative, round-off ~1e-11/h
    np.testing.assert_allclose(jac, fd, rtol=1e-5, atol=1e-7 * np.abs(fd).max())


def test_angle_contraction_equals_spectrum_model_at_a_design_point():
    # the emulator's training components contracted with ĝ(α) are spectrum_model's Ĉ_ℓ(α) on the
    # same realisations (tensor_sample with the same key): round-off only
    d = dataclasses.replace(TINY, n_realisations=8)
    key = jax.random.PRNGKey(11)
    comps, _ = E.simulate_components(d, 1.0, 0.1, key)
    s = inverse.tensor_sample(inverse._params_for(
        crjax.FieldParams(n_modes=8), [1.0, 0.1, d.gamma, 0.0]), key, 8, 2,
        [d.t_end], rL=0.1, dt=d.step)
    for a in (0.0, 0.4, np.pi / 2):
        ref = inverse.spectrum_model(s, a).mean
        got = np.sin(a) ** 2 * comps[:, 0].mean(0) + np.cos(a) ** 2 * comps[:, 1].mean(0)
        np.testing.assert_allclose(got, ref, rtol=1e-10, atol=1e-14)


def test_save_load_round_trip(emu, tmp_path):
    E.save_emulator(tmp_path / "e.npz", emu)
    e2 = E.load_emulator(tmp_path / "e.npz")
    for a in (0.2, 1.0):
        np.testing.assert_allclose(np.asarray(E.predict(e2, 1.3, 0.09, a)[0]),
                                   np.asarray(E.predict(emu, 1.3, 0.09, a)[0]), rtol=1e-9)
    (tmp_path / "bad.npz").write_text("not an npz")
    with pytest.raises(ValueError, match="not an emulator file"):
        E.load_emulator(tmp_path / "bad.npz")


def test_design_box_is_checked():
    with pytest.raises(ValueError, match="sigma2_range"):
        dataclasses.replace(TINY, sigma2_range=(2.0, 1.0)).check()
    with pytest.raises(ValueError, match="rL_range"):
        dataclasses.replace(TINY, rL_range=(0.1, 5.0)).check()


def test_fit_recovers_theta_of_a_held_out_spectrum(emu):
    """Target: 256 realisations at truth with keys the design never used, scaled by 1e-6 (the
    amplitude is profiled). The truth must lie within the 68% profile interval widened to ~2σ
    (twice the half-widths): at nside 2 there are 5 multipoles (1 dof) and σ² is nearly degenerate
    with the angle, so 1σ coverage alone would fail ~1/3 of the time."""
    truth = (1.0, 0.1, 0.6)
    d = dataclasses.replace(TINY, n_realisations=256)
    c, _ = E.simulate_components(d, truth[0], truth[1], jax.random.PRNGKey(424242))
    per = np.sin(truth[2]) ** 2 * c[:, 0] + np.cos(truth[2]) ** 2 * c[:, 1]
    cl, sig = 1e-6 * per.mean(0), 1e-6 * per.std(0, ddof=1) / np.sqrt(per.shape[0])
    fit = E.fit_shape(emu, np.arange(1, 6), cl, sig, n_grid=13)
    assert np.isfinite(fit.chi2) and fit.amplitude > 0
    _assert_within_twice_the_interval(fit, truth)


def test_full_covariance_fit_generalises_the_diagonal_one(emu):
    """A diagonal covariance gives the sigma fit exactly (same objective, round-off only); with the
    amplitude fixed the fit is of the spectrum itself: A = 1, one more dof, and the truth's
    spectrum (target at the truth, full sample covariance, Sellentin–Heavens) lies within ~2σ."""
    truth = (1.0, 0.1, 0.6)
    d = dataclasses.replace(TINY, n_realisations=128)
    c, _ = E.simulate_components(d, truth[0], truth[1], jax.random.PRNGKey(515151))
    per = np.sin(truth[2]) ** 2 * c[:, 0] + np.cos(truth[2]) ** 2 * c[:, 1]
    ell = np.arange(1, 6)
    cl, cov = per.mean(0), np.cov(per, rowvar=False) / per.shape[0]
    sig = np.sqrt(np.diag(cov))
    a = E.fit_shape(emu, ell, cl, sig, n_grid=7, n_starts=3)
    b = E.fit_shape(emu, ell, cl, covariance=np.diag(sig**2), n_grid=7, n_starts=3)
    # identical objectives; L-BFGS-B paths may differ at round-off, so compare at its tolerance
    np.testing.assert_allclose(b.m2lnl, a.m2lnl, rtol=1e-6)
    np.testing.assert_allclose(b.theta, a.theta, rtol=1e-3)
    assert (a.covariance, b.covariance) == ("diagonal", "full")
    f = E.fit_shape(emu, ell, cl, covariance=cov, amplitude="fixed", n_cov=per.shape[0],
                    n_grid=13, n_starts=4)
    assert f.amplitude == 1.0 and f.dof == ell.size - 3 and f.likelihood == "sellentin-heavens"
    _assert_within_twice_the_interval(f, truth)


def test_sellentin_heavens_objective_is_the_t_likelihood(emu):
    """−2 ln L = n ln(1 + χ²/(n − 1)) + log-det term, and → the Gaussian χ² as n → ∞."""
    ell = np.arange(1, 6)
    m, v = (np.asarray(x) for x in E.predict(emu, 1.2, 0.11, 0.7))
    d = m * 1.1
    cov = np.diag((0.05 * np.abs(m)) ** 2) + 1e-5 * np.outer(m, m)  # correlated, positive definite
    w = jnp.asarray([0.4, 0.5, 0.6])
    g = E._objective(emu, jnp.asarray(ell - 1), jnp.asarray(d), jnp.asarray(cov),
                     amplitude_free=False)
    t = E._objective(emu, jnp.asarray(ell - 1), jnp.asarray(d), jnp.asarray(cov),
                     amplitude_free=False, n_cov=40)
    big = E._objective(emu, jnp.asarray(ell - 1), jnp.asarray(d), jnp.asarray(cov),
                       amplitude_free=False, n_cov=10**9)
    (vg, (chi2, amp)), (vt, _), (vb, _) = g(w), t(w), big(w)
    logdet = float(vg) - float(chi2)
    assert float(amp) == 1.0 and float(chi2) > 0
    np.testing.assert_allclose(float(vt), 40 * np.log1p(float(chi2) / 39) + logdet, rtol=1e-12)
    np.testing.assert_allclose(float(vb), float(vg), rtol=1e-6)  # O(χ²/n) difference


def test_fit_options_are_checked(emu):
    ell, cl, sig = np.arange(1, 6), np.ones(5), 0.1 * np.ones(5)
    with pytest.raises(ValueError, match="exactly one of sigma"):
        E.fit_shape(emu, ell, cl)
    with pytest.raises(ValueError, match="exactly one of sigma"):
        E.fit_shape(emu, ell, cl, sig, covariance=np.eye(5))
    with pytest.raises(ValueError, match="positive-definite 5x5"):
        E.fit_shape(emu, ell, cl, covariance=-np.eye(5))
    with pytest.raises(ValueError, match="amplitude must be"):
        E.fit_shape(emu, ell, cl, sig, amplitude="free")
    with pytest.raises(ValueError, match="n_cov must be an integer > L"):
        E.fit_shape(emu, ell, cl, sig, n_cov=6)
    with pytest.raises(ValueError, match=">= 4 distinct multipoles"):
        E.fit_shape(emu, ell[:3], cl[:3], sig[:3], amplitude="fixed")
    with pytest.raises(ValueError, match="ell_max must be an integer in"):
        dataclasses.replace(TINY, ell_max=6).check()
