"""Gradient estimators for ensemble statistics (crjax/gradients.py, docs/gradients.md).

References we did not write: the Gamma/Fisher moments of the Gaussian-amplitude score (analytic),
the seed's Ĉ_ℓ estimator (crjax.noise_level/diffusion_tensor, separate code), finite differences and
forward-mode AD through the trajectories at a short horizon where both are exact.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crjax
from crjax import gradients as G

RL = 0.1
DT = RL / 20


def _params(n_modes=8, sigma2=1.0):
    return crjax.FieldParams(sigma2=sigma2, n_modes=n_modes)


# ----------------------------------------------------------------------------------------------
# Gaussian amplitudes and their score


def test_gaussian_amplitudes_divergence_free_and_mean_power(key):
    p = _params(n_modes=16)
    field = crjax.realise_field(key, p)
    keys = jax.random.split(key, 4000)
    amps = jax.vmap(lambda k: G.gaussian_amplitudes(field, k).amplitudes)(keys)
    # ⊥ κ̂ (∇·B = 0): round-off only (fp64, |a| ≲ 1)
    assert float(jnp.max(jnp.abs(jnp.einsum("rni,ni->rn", amps, field.wavevectors)))) < 1e-12
    # E|a_n|² = A_n²: |a_n|²/A_n² ~ Exp(1)/... mean 1, sd 1 per draw -> sd 1/√4000 of the mean
    ratio = jnp.mean(jnp.sum(amps**2, -1), 0) / jnp.sum(field.amplitudes**2, -1)
    assert np.all(np.abs(np.asarray(ratio) - 1.0) < 5.0 / np.sqrt(4000))
    # the directions, phases and wavenumbers are untouched
    g = G.gaussian_amplitudes(field, key)
    assert jnp.array_equal(g.wavevectors, field.wavevectors)
    assert jnp.array_equal(g.phases, field.phases)


def test_gaussian_amplitude_law_is_a_field_option(key):
    # FieldParams(amplitude_law="gaussian") through crjax.realise_field is the same draw as the
    # estimators' realise_gaussian_field (one definition), and "fixed" stays the seed's field.
    fixed, gauss = _params(n_modes=8), _params(n_modes=8)
    gauss = crjax.FieldParams(sigma2=1.0, n_modes=8, amplitude_law="gaussian")
    a = crjax.realise_field(key, gauss)
    b = G.realise_gaussian_field(key, fixed)
    assert jnp.array_equal(a.amplitudes, b.amplitudes) and jnp.array_equal(a.phases, b.phases)
    seed = crjax.realise_field(jax.random.fold_in(key, 0), fixed)
    assert jnp.array_equal(a.wavevectors, seed.wavevectors)
    assert not jnp.allclose(jnp.sum(a.amplitudes**2, -1), jnp.sum(seed.amplitudes**2, -1))
    # the score's variances come from the fixed amplitudes whatever the law says
    np.testing.assert_array_equal(G.mode_variances(gauss), G.mode_variances(fixed))
    # ∇·B = 0 still: a_n ⊥ k_n to round-off (fp64)
    assert float(jnp.max(jnp.abs(jnp.sum(a.amplitudes * a.wavevectors, -1)))) < 1e-12


def test_sigma2_score_is_the_analytic_gamma_score(key):
    # ∂σ² log p = (1/σ²) Σ_n (|a_n|²/(2 s_n²) − 1), s_n² = A_n²/2: from the Gaussian density by hand
    p = _params(n_modes=8, sigma2=0.7)
    f = G.realise_gaussian_field(key, p)
    base = crjax.realise_field(jax.random.fold_in(key, 0), p)
    s2 = 0.5 * jnp.sum(base.amplitudes**2, -1)
    expected = jnp.sum(jnp.sum(f.amplitudes**2, -1) / (2 * s2) - 1.0) / 0.7
    got = G.amplitude_score(f.amplitudes, p, ("sigma2",))[0]
    np.testing.assert_allclose(got, expected, rtol=1e-10)  # fp64 round-off of a sum of 8 terms


def test_scores_have_zero_mean_and_fisher_variance(key):
    # A score has mean 0; for σ² its variance is the Fisher information N/σ⁴ (2N Gaussian
    # components, each 1/(2σ⁴)). 3000 draws: the sample mean has sd √(N/3000)/σ² ≈ 0.05.
    n = 8
    p = _params(n_modes=n)
    keys = jax.random.split(key, 3000)
    s = jax.vmap(lambda k: G.amplitude_score(G.realise_gaussian_field(k, p).amplitudes, p,
                                             ("sigma2", "gamma", "rL"), rL0=RL))(keys)
    s = np.asarray(s)
    se = s.std(0, ddof=1) / np.sqrt(len(s))
    assert np.all(np.abs(s.mean(0)) < 5 * se)
    # var of a sum of N Exp(1) is N; sample variance of 3000 draws: rel. sd ≈ √(2/3000)·√(1+kurt/2) < 5%
    np.testing.assert_allclose(s[:, 0].var(ddof=1), n / 1.0, rtol=0.15)


def test_score_rejects_unknown_names(key):
    p = _params()
    with pytest.raises(ValueError, match="names"):
        G.amplitude_score(jnp.zeros((8, 3)), p, ("sigma",))


# ----------------------------------------------------------------------------------------------
# the statistic


@pytest.fixture(scope="module")
def short_sample():
    """Tiny ensemble at tΩ = 2 (λ_L T ≈ 1: pathwise AD still exact and well conditioned)."""
    return G.ensemble_sample(_params(), jax.random.PRNGKey(7), 384, 2, [0.1, 0.2], rL=RL, dt=DT,
                             names=("sigma2", "rL", "gamma"), chunk_size=128)


def test_statistic_mean_is_the_seed_estimator(key):
    p = _params()
    times = jnp.asarray([0.1, 0.2])
    s = G.ensemble_sample(p, key, 4, 2, times, rL=RL, dt=DT)
    traj = crjax.run_ensemble(p, key, 4, 2, times, rL=RL, dt=DT,
                              realise=G.realise_gaussian_field)
    g = jnp.asarray([0.0, 0.0, 1.0])
    cls = crjax.power_spectrum(crjax.relative_intensity(traj.positions, g))
    K, _ = crjax.diffusion_tensor(traj.positions, times)
    noise = crjax.noise_level(K, times, g, 48)
    expected = jnp.mean(cls, 0) - noise[:, None]  # the seed's Ĉ_ℓ = ⟨C_ℓ⟩ − N (3.1)
    np.testing.assert_allclose(jnp.mean(s.f, 0), expected, rtol=1e-9, atol=1e-14)


def test_time_derivative_matches_finite_difference(key):
    p = _params()
    eps = 1e-4
    times = jnp.asarray([0.2 - eps, 0.2, 0.2 + eps])
    s = G.ensemble_sample(p, key, 2, 2, times, rL=RL, dt=eps / 4)
    fd = (s.f[:, 2] - s.f[:, 0]) / (2 * eps)
    # central FD error ~ eps²·f''' plus the Boris step error; 1e-4 relative of the largest entry
    scale = float(jnp.max(jnp.abs(s.dfdT[:, 1])))
    np.testing.assert_allclose(s.dfdT[:, 1], fd, atol=1e-4 * scale)


# ----------------------------------------------------------------------------------------------
# estimators vs exact derivatives at a short horizon


def _pathwise_mean(names, n=48):
    keys = jax.random.split(jax.random.PRNGKey(11), n)
    times = jnp.asarray([0.1, 0.2])
    fn = jax.jit(jax.vmap(lambda k: G.pathwise_gradient(_params(), k, 2, times, rL=RL, dt=DT,
                                                        names=names)[1]))
    d = np.asarray(fn(keys))
    return d.mean(0), d.std(0, ddof=1) / np.sqrt(n)


def test_pathwise_matches_central_difference_for_one_realisation(key):
    # At tΩ = 2 the pathwise derivative of one realisation is exact: compare with central FD
    # (h = 1e-5, fp64: truncation h² ≈ 1e-10, round-off 1e-16/h ≈ 1e-11 relative).
    times = jnp.asarray([0.2])
    p = _params()
    _f0, d = G.pathwise_gradient(p, key, 2, times, rL=RL, dt=DT, names=("sigma2", "rL"))
    h = 1e-5
    fp, _ = G.pathwise_gradient(eqx.tree_at(lambda q: q.sigma2, p, 1.0 + h), key, 2, times,
                                rL=RL, dt=DT, names=("sigma2",))
    fm, _ = G.pathwise_gradient(eqx.tree_at(lambda q: q.sigma2, p, 1.0 - h), key, 2, times,
                                rL=RL, dt=DT, names=("sigma2",))
    np.testing.assert_allclose(d[..., 0], (fp - fm) / (2 * h), rtol=1e-5, atol=1e-9)
    fp, _ = G.pathwise_gradient(p, key, 2, times, rL=RL + h, dt=DT, names=("sigma2",))
    fm, _ = G.pathwise_gradient(p, key, 2, times, rL=RL - h, dt=DT, names=("sigma2",))
    np.testing.assert_allclose(d[..., 1], (fp - fm) / (2 * h), rtol=1e-5, atol=1e-9)


def test_score_function_is_unbiased_against_pathwise(short_sample):
    # Two independent estimators of dĈ_ℓ/dσ² (different keys): agree within 4 combined σ for
    # every (T, ℓ) with non-negligible signal (4σ: 2 times × 5 multipoles, false alarm < 1e-3).
    sf = np.asarray(G.score_function_gradient(short_sample, "sigma2"))
    m_sf, se_sf = sf.mean(0), sf.std(0, ddof=1) / np.sqrt(len(sf))
    m_pw, se_pw = _pathwise_mean(("sigma2",))
    z = (m_sf - m_pw[..., 0]) / np.sqrt(se_sf**2 + se_pw[..., 0] ** 2)
    assert np.all(np.abs(z[:, 1:]) < 4), z


def test_rescaled_rl_is_unbiased_against_pathwise(short_sample):
    rl = np.asarray(G.rescaled_rl_gradient(short_sample))
    m, se = rl.mean(0), rl.std(0, ddof=1) / np.sqrt(len(rl))
    m_pw, se_pw = _pathwise_mean(("rL",))
    z = (m - m_pw[..., 0]) / np.sqrt(se**2 + se_pw[..., 0] ** 2)
    assert np.all(np.abs(z[:, 1:]) < 4), z


def test_score_function_variance_within_cauchy_schwarz_bound(short_sample):
    # Var[(f − b)S] ≤ √(E[(f − b)⁴] E[S⁴]) with E[S⁴] = (3N² + 6N)/σ⁸ for the σ² score
    # (S = (X − N)/σ², X ~ Gamma(N, 1)): the estimator's variance is bounded by f's 4th moment.
    n = 8
    sf = np.asarray(G.score_function_gradient(short_sample, "sigma2"))
    fc = np.asarray(short_sample.f)
    fc = fc - fc.mean(0)
    bound = np.sqrt(np.mean(fc**4, 0) * (3 * n**2 + 6 * n))
    # 30% slack for the sampling error of 384-sample 4th moments
    assert np.all(sf.var(0, ddof=1) <= 1.3 * bound)


def test_central_difference_with_crn_matches_pathwise(key):
    # At a short horizon CRN pairs stay correlated: FD with h = 1e-4 equals the pathwise
    # derivative of the same realisations to O(h²) (fp64).
    p = _params()
    times = jnp.asarray([0.2])
    h = 1e-4
    kw = {"rL": RL, "dt": DT, "names": ("sigma2",)}
    plus = G.ensemble_sample(eqx.tree_at(lambda q: q.sigma2, p, 1 + h), key, 4, 2, times, **kw)
    minus = G.ensemble_sample(eqx.tree_at(lambda q: q.sigma2, p, 1 - h), key, 4, 2, times, **kw)
    fd = G.central_difference(plus, minus, h)
    pw = jnp.stack([G.pathwise_gradient(p, jax.random.fold_in(key, i), 2, times, rL=RL, dt=DT,
                                        names=("sigma2",))[1][..., 0] for i in range(4)])
    np.testing.assert_allclose(fd, pw, rtol=1e-5, atol=1e-8)


def test_truncated_pathwise_tends_to_full_pathwise(key):
    # Freezing the state after one step of 40 drops only the first step's θ-dependence.
    p = _params()
    f_full, d_full = G.pathwise_gradient(p, key, 2, jnp.asarray([0.2]), rL=RL, dt=DT)
    f_tr, d_tr = G.truncated_pathwise_gradient(p, key, 2, 0.2, 0.2 - DT, rL=RL, dt=DT)
    np.testing.assert_allclose(f_tr, f_full[0], rtol=1e-10, atol=1e-14)
    scale = np.max(np.abs(np.asarray(d_full)), axis=(0, 1))
    # the dropped part is O(dt/T) = 2.5% of the derivative; 10% of the largest entry
    assert np.all(np.abs(np.asarray(d_tr - d_full[0])) <= 0.1 * scale)


# ----------------------------------------------------------------------------------------------
# input checks and helpers


def test_bad_inputs_raise(key, short_sample):
    with pytest.raises(ValueError, match="h must be"):
        G.central_difference(short_sample, short_sample, 0.0)
    with pytest.raises(ValueError, match="window must be"):
        G.truncated_pathwise_gradient(_params(), key, 2, 0.2, 0.3, rL=RL, dt=DT)
    with pytest.raises(ValueError, match="name must be"):
        G.score_function_gradient(short_sample, "rL")
    with pytest.raises(ValueError, match="n_realisations"):
        G.ensemble_sample(_params(), key, 0, 2, [0.1], rL=RL, dt=DT)
    with pytest.raises(ValueError, match="precision"):
        G.realisations_for_precision(np.ones((3, 2)), 0.0)


def test_realisations_for_precision_counts():
    # mean 2, sd 2 (ddof=1): 20% precision needs (2/(0.2·2))² = 25 realisations
    x = np.array([0.0, 4.0] * 50)
    sd = x.std(ddof=1)
    np.testing.assert_allclose(G.realisations_for_precision(x), (sd / 0.4) ** 2, rtol=1e-12)


@pytest.mark.slow
def test_long_horizon_score_function_against_crn_finite_differences():
    """tΩ = 200 (λ_L T ≈ 40): the score-function σ² gradient and the rescaled rL gradient agree
    with central FD (h = 10%, common random numbers, independent keys) within 3.5σ, ℓ = 1..6."""
    p = crjax.FieldParams(n_modes=16)
    times = jnp.asarray([20.0])
    kw = {"rL": RL, "dt": DT, "names": ("sigma2", "rL"), "chunk_size": 32}
    s = G.ensemble_sample(p, jax.random.PRNGKey(1), 256, 4, times, **kw)
    kf = jax.random.PRNGKey(2)
    for name in ("sigma2", "rL"):
        if name == "sigma2":
            plus = G.ensemble_sample(eqx.tree_at(lambda q: q.sigma2, p, 1.1), kf, 128, 4, times, **kw)
            minus = G.ensemble_sample(eqx.tree_at(lambda q: q.sigma2, p, 0.9), kf, 128, 4, times, **kw)
            est = G.score_function_gradient(s, "sigma2")
            h = 0.1
        else:
            plus = G.ensemble_sample(p, kf, 128, 4, times, **{**kw, "rL": 1.1 * RL})
            minus = G.ensemble_sample(p, kf, 128, 4, times, **{**kw, "rL": 0.9 * RL})
            est = G.rescaled_rl_gradient(s)
            h = 0.1 * RL
        fd = np.asarray(G.central_difference(plus, minus, h))[:, 0, 1:7]
        e = np.asarray(est)[:, 0, 1:7]
        z = (e.mean(0) - fd.mean(0)) / np.sqrt(e.var(0, ddof=1) / len(e) + fd.var(0, ddof=1) / len(fd))
        assert np.all(np.abs(z) < 3.5), (name, z)
