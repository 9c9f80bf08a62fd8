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
    for j, t in enumerate(truth):
        lo, hi = fit.intervals[j]
        best = fit.theta[j]
        assert best - 2 * (best - lo) - 1e-9 <= t <= best + 2 * (hi - best) + 1e-9, (j, fit.theta,
                                                                                     fit.intervals)
