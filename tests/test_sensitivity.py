"""dp/dθ (inference/sensitivity.py): the GLS BGK fit, its implicit derivative and the composition with
per-realisation derivative samples.

References, none of them the code under test: ``inference.covariance_fit.fit_p_covariance`` (grid +
parabola fit in numpy/scipy), central finite differences of the fit, the Gauss–Newton projection
(JᵀWJ)⁻¹JᵀW at noise-free data, synthetic families Ĉ(θ) = A(θ)·bgk(ℓ, p(θ)) whose dp/dθ is known,
finite differences in the angle of tensor spectra, and ``inverse.spectrum_model``'s means. No
simulation: every input is synthetic, so the whole file costs one compile of the fit.
"""

import jax.numpy as jnp
import numpy as np
import pytest

from crjax import gradients as G
from crjax.theory import bgk_spectrum
from inference import inverse
from inference import sensitivity as S
from inference.covariance_fit import fit_p_covariance
from inference.likelihoods import hartlap_precision

ELL = np.arange(1, 9)


def _shape(p, ell=ELL):
    return np.asarray(bgk_spectrum(ell, p))


def _toy_ensemble(rng, p=0.4, amp=10.0, R=60, frac=0.3, common=0.3):
    """Per-realisation Ĉ^(r): independent scatter ∝ √S_ℓ plus a common offset (as in
    tests/test_covariance_fit.py: the errors are correlated across ℓ)."""
    s = amp * _shape(p)
    cov1 = np.diag((frac * np.sqrt(s)) ** 2) + common**2
    return s + rng.standard_normal((R, s.size)) @ np.linalg.cholesky(cov1).T


@pytest.mark.parametrize("seed,p", [(0, 0.4), (1, 0.2), (2, 0.7)])
def test_fit_matches_fit_p_covariance(seed, p):
    # Same data, same Hartlap precision: fit_p_covariance refines a 999-point grid with a 201-point one
    # (Δp = 1e-5) and a parabola vertex, so its p̂ is good to ~(Δp)³ ≪ 1e-9; Newton here stops at 1e-12.
    x = _toy_ensemble(np.random.default_rng(seed), p=p)
    R = x.shape[0]
    c, cov = x.mean(0), np.cov(x, rowvar=False) / R
    ref = fit_p_covariance(ELL, c, cov, R)
    fit = S.gls_fit(c, hartlap_precision(cov, R), ELL)
    assert bool(fit.converged)
    np.testing.assert_allclose(float(fit.p), ref.p, atol=1e-9)
    # Â and χ² at p̂: stationary in p, so they agree to second order in the p difference
    np.testing.assert_allclose([float(fit.amplitude), float(fit.chi2)], [ref.amplitude, ref.chi2],
                               rtol=1e-9)
    # the overall scale of W does not move p̂ (only χ²)
    np.testing.assert_allclose(float(S.fit_p(c, 7.0 * np.linalg.inv(cov), ELL)), ref.p, atol=1e-9)


def test_a_spectrum_bgk_cannot_describe_is_flagged():
    # Ĉ_ℓ = ℓ rises with ℓ; every BGK shape falls (∝ ℓ^(2p−4)), the flattest (p → 1) least: the
    # profile χ²(p) falls monotonically to the edge (checked on the grid here), there is no interior
    # minimum, and the fit says so, reporting the grid's best point with a zero derivative.
    c, w = ELL.astype(float), np.eye(ELL.size)
    grid = np.linspace(1e-3, 1 - 1e-3, 250)
    f = _shape(grid[:, None], ELL[None, :])
    profile = c @ c - (f @ c) ** 2 / np.sum(f * f, axis=1)
    assert np.all(np.diff(profile) < 0)
    fit, grad = S.fit_p_gradient(c, w, ELL)
    assert not bool(fit.converged)
    assert float(fit.p) == pytest.approx(1 - 1e-3)
    np.testing.assert_array_equal(grad, 0.0)
    noisy = c + 0.01 * np.random.default_rng(0).standard_normal((40, ELL.size))
    assert not S.p_sensitivity(noisy, np.ones((40, ELL.size)), ELL, precision=w).converged


def test_implicit_derivative_matches_central_differences():
    x = _toy_ensemble(np.random.default_rng(3))
    c = x.mean(0)
    w = S.precision_of_mean(x)
    fit, grad = S.fit_p_gradient(c, w, ELL)
    assert bool(fit.converged)
    # central FD of the whole fit, step 1e-5·|Ĉ|: truncation ~h²·p''' ~1e-10, Newton's 1e-12 stop
    # over 2h adds ~1e-7·|Ĉ|⁻¹; rtol 1e-5 of the largest component is far above both
    fd = []
    for i in range(ELL.size):
        h = 1e-5 * max(abs(c[i]), 1e-3)
        e = np.zeros(ELL.size)
        e[i] = h
        fd.append((float(S.fit_p(c + e, w, ELL)) - float(S.fit_p(c - e, w, ELL))) / (2 * h))
    np.testing.assert_allclose(grad, fd, rtol=0, atol=1e-5 * np.max(np.abs(fd)))


@pytest.mark.slow
def test_fit_p_under_jax_transformations_passes_check_grads():
    # jax.test_util.check_grads: forward- and reverse-mode derivatives of fit_p (traced input, the
    # implicit adjoint of optimistix) against its own finite differences (eps 1e-4 on Ĉ ~ O(1)..O(10)).
    # Slow only for its two extra compiles.
    from jax.test_util import check_grads

    x = _toy_ensemble(np.random.default_rng(13))
    w = jnp.asarray(S.precision_of_mean(x))
    check_grads(lambda c: S.fit_p(c, w, ELL), (jnp.asarray(x.mean(0)),), order=1,
                modes=("fwd", "rev"), eps=1e-4, atol=1e-5, rtol=1e-5)


def test_gradient_at_noise_free_data_is_the_gauss_newton_projection():
    # Ĉ = A f_p exactly: the residual vanishes, the Hessian of χ² is 2JᵀWJ with J = [A ∂f/∂p, f], and
    # dp̂/dĈ is the p row of (JᵀWJ)⁻¹JᵀW (∂f/∂p by central FD, h = 1e-6: error ~1e-12)
    p0, a0 = 0.55, 3.0
    rng = np.random.default_rng(4)
    m = rng.standard_normal((ELL.size, ELL.size))
    w = m @ m.T + ELL.size * np.eye(ELL.size)
    fit, grad = S.fit_p_gradient(a0 * _shape(p0), w, ELL)
    np.testing.assert_allclose(float(fit.p), p0, atol=1e-10)
    dfdp = (_shape(p0 + 1e-6) - _shape(p0 - 1e-6)) / 2e-6
    j = np.stack([a0 * dfdp, _shape(p0)], axis=1)
    ref = np.linalg.solve(j.T @ w @ j, j.T @ w)[0]
    np.testing.assert_allclose(grad, ref, rtol=1e-6, atol=1e-8 * np.max(np.abs(ref)))


def _family(theta):
    """Ĉ(θ) = A(θ₂)·bgk(ℓ, p(θ₁)), p = 0.3 + 0.4 θ₁ (dp/dθ₁ = 0.4), A = 5 e^{θ₂} (dp/dθ₂ = 0)."""
    return 5.0 * np.exp(theta[1]) * _shape(0.3 + 0.4 * theta[0])


def _family_jacobian(theta, h=1e-6):
    cols = []
    for i in range(2):
        e = np.zeros(2)
        e[i] = h
        cols.append((_family(theta + e) - _family(theta - e)) / (2 * h))
    return np.stack(cols, axis=-1)  # (L, 2)


def test_composition_recovers_linear_p_of_theta_exactly():
    # Centred noise (zero sample mean) on both the samples and the derivative samples: the means are
    # exact, so the delta method must return dp/dθ = (0.4, 0) to the FD accuracy of the Jacobian
    # (~1e-9), while the SE comes from the spread of the derivative noise.
    rng = np.random.default_rng(5)
    theta0, R = np.array([0.5, 0.0]), 80
    c0, jac = _family(theta0), _family_jacobian(theta0)
    eps = rng.standard_normal((R, ELL.size)) * 0.05 * c0
    eta = rng.standard_normal((R, ELL.size, 2)) * 0.3 * np.abs(jac).max(0)
    f = c0 + eps - eps.mean(0)
    d = jac + eta - eta.mean(0)
    out = S.p_sensitivity(f, d, ELL)
    assert out.converged
    np.testing.assert_allclose(out.p, 0.5, atol=1e-9)
    np.testing.assert_allclose(out.dp_dtheta, [0.4, 0.0], atol=1e-7)
    np.testing.assert_allclose(out.se, out.contributions.std(0, ddof=1) / np.sqrt(R), rtol=1e-12)
    assert np.all(out.se > 0)
    # jackknife vs delta method: they differ only by the noise of ∇p̂ at the leave-one-out means
    # (5% scatter of Ĉ → a few % in the SE); 15% allows for it
    np.testing.assert_allclose(out.se_jackknife, out.se, rtol=0.15)
    np.testing.assert_allclose(out.p_se_jackknife, out.p_se, rtol=0.15)


def test_amplitude_scatter_is_not_an_error_of_dp_dtheta():
    # f^(r) = a_r Ĉ(θ0), d^(r) = a_r Ĉ'(θ0): every realisation has the right shape, only its amplitude
    # scatters. p̂ is scale invariant (∇p̂·Ĉ = 0), so ∇p̂(f̄)·d̄ = dp/dθ exactly for every draw of a_r:
    # the true error is zero. The ∇p̂·d^(r) term alone scatters like a_r (here ~0.3·|dp/dθ₁|); the
    # ∇²p̂ term of the delta method cancels it (left: ~1e-8 relative, its central differences), and the
    # jackknife, which refits, sees no spread either.
    rng = np.random.default_rng(11)
    theta0, R = np.array([0.5, 0.0]), 50
    c0, jac = _family(theta0), _family_jacobian(theta0)
    a = 1.0 + 0.3 * rng.standard_normal(R)
    # (a rank-one ensemble has no covariance to invert: W is given)
    out = S.p_sensitivity(a[:, None] * c0, a[:, None, None] * jac, ELL, precision=np.diag(c0**-2))
    np.testing.assert_allclose(out.dp_dtheta, [0.4, 0.0], atol=1e-7)
    naive = np.einsum("l,rlk->rk", out.dp_dc, a[:, None, None] * jac).std(0, ddof=1) / np.sqrt(R)
    assert naive[0] > 0.01
    assert np.all(out.se < 1e-5 * naive[0]) and np.all(out.se_jackknife < 1e-5 * naive[0])


def test_composition_is_unbiased_with_noisy_samples():
    # Uncentred noise: the estimate scatters around (0.4, 0) with its own SE. 4σ band (a 6e-5 false
    # failure rate per component) on one seeded draw.
    rng = np.random.default_rng(6)
    theta0, R = np.array([0.2, 0.3]), 120
    c0, jac = _family(theta0), _family_jacobian(theta0)
    f = c0 + rng.standard_normal((R, ELL.size)) * 0.1 * c0
    d = jac + rng.standard_normal((R, ELL.size, 2)) * np.abs(jac).max(0)
    out = S.p_sensitivity(f, d, ELL)
    pulls = (out.dp_dtheta - np.array([0.4, 0.0])) / out.se
    assert out.converged and np.all(np.abs(pulls) < 4), pulls
    # a scalar derivative axis gives scalars
    one = S.p_sensitivity(f, d[..., 0], ELL)
    np.testing.assert_allclose([one.dp_dtheta, one.se], [out.dp_dtheta[0], out.se[0]], rtol=1e-12)


def test_p_finite_difference_of_the_family():
    # independent ensembles at θ₁ ± h: p is linear in θ₁, so the FD has no curvature error, and the
    # noise-free version returns 0.4 exactly; with noise, within 4 SE.
    rng = np.random.default_rng(7)
    h, R = 0.1, 100
    theta0 = np.array([0.5, 0.0])
    w = np.diag(1.0 / _family(theta0))
    plus, minus = _family(theta0 + [h, 0]), _family(theta0 - [h, 0])
    exact, _ = S.p_finite_difference(np.stack([plus, plus]), np.stack([minus, minus]), h, ELL,
                                     precision=w)
    np.testing.assert_allclose(exact, 0.4, atol=1e-9)
    noisy = [x + rng.standard_normal((R, ELL.size)) * 0.1 * x for x in (plus, minus)]
    est, se = S.p_finite_difference(*noisy, h, ELL, precision=w)
    assert se > 0 and abs(est - 0.4) < 4 * se
    # common random numbers: the same noise draw on both sides cancels most of it
    z = rng.standard_normal((R, ELL.size)) * 0.1
    est_p, se_p = S.p_finite_difference(plus * (1 + z), minus * (1 + z), h, ELL, precision=w,
                                        paired=True)
    assert se_p < se and abs(est_p - 0.4) < 4 * se_p


def _synthetic_tensor_sample(rng, R=40, L=9):
    """f^{ab}_ℓ = diag(a, a, b) + noise with a ∝ bgk(ℓ, 0.3), b ∝ bgk(ℓ, 0.7): Ĉ(α) = sin²α a + cos²α b
    moves its fitted p with α. ℓ = 0..L−1 as the tensor reducer stores them (ℓ = 0 dropped later);
    L = 9 keeps ℓ = 1..8, the shape of ELL: the fit compiles once for the whole file."""
    ell = np.arange(1, L)
    a, b = 4.0 * _shape(0.3, ell), 2.0 * _shape(0.7, ell)
    mean = np.zeros((3, 3, L))
    mean[0, 0, 1:] = mean[1, 1, 1:] = a
    mean[2, 2, 1:] = b
    noise = rng.standard_normal((R, 1, 3, 3, L)) * 0.05 * np.abs(mean).max()
    f = mean + 0.5 * (noise + np.swapaxes(noise, 2, 3))
    dfdt = rng.standard_normal((R, 1, 3, 3, L))
    return inverse.TensorSample(jnp.asarray(f), jnp.asarray(dfdt + np.swapaxes(dfdt, 2, 3)),
                                jnp.asarray(rng.standard_normal((R, 3))), jnp.asarray([2.0]), 0.1)


def test_tensor_samples_average_to_spectrum_model():
    sample = _synthetic_tensor_sample(np.random.default_rng(8))
    f, d = S.tensor_derivative_samples(sample, 0.7)
    model = inverse.spectrum_model(sample, 0.7)
    np.testing.assert_allclose(f.mean(0), model.mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(d.mean(0), model.jac, rtol=1e-12, atol=1e-14)


def test_angle_derivative_equals_finite_differences_in_the_angle():
    # ∂/∂α of the tensor spectra is exact per realisation, so the delta method's dp/dα equals the
    # derivative of p̂(f̄(α)) (fixed W) exactly; FD with h = 1e-4 rad: truncation ~h²·p''' ~ 1e-8.
    sample = _synthetic_tensor_sample(np.random.default_rng(9))
    alpha, h = 0.8, 1e-4
    f, d = S.tensor_derivative_samples(sample, alpha)
    ell = np.arange(1, f.shape[1] + 1)
    w = S.precision_of_mean(f)
    out = S.p_sensitivity(f, d, ell, precision=w)
    assert out.converged
    fd = [float(S.fit_p(S.tensor_derivative_samples(sample, alpha + s * h)[0].mean(0), w, ell))
          for s in (1, -1)]
    np.testing.assert_allclose(out.dp_dtheta[3], (fd[0] - fd[1]) / (2 * h), rtol=1e-6)
    assert abs(out.dp_dtheta[3]) > 0.05  # the angle moves p (a vs b mixture): not a vacuous check


def test_ensemble_derivative_samples_are_the_gradients_estimators():
    rng = np.random.default_rng(10)
    R, T, L = 5, 2, 6
    sample = G.EnsembleSample(jnp.asarray(rng.standard_normal((R, T, L))),
                              jnp.asarray(rng.standard_normal((R, T, L))),
                              jnp.asarray(rng.standard_normal((R, 2))), jnp.asarray([1.0, 2.0]), 0.1,
                              ("sigma2", "rL"))
    f, d, ell = S.ensemble_derivative_samples(sample, ("rL", "sigma2"), time_index=0)
    np.testing.assert_array_equal(ell, np.arange(1, L))
    np.testing.assert_array_equal(f, np.asarray(sample.f[:, 0, 1:]))
    np.testing.assert_array_equal(d[..., 0], np.asarray(G.rescaled_rl_gradient(sample)[:, 0, 1:]))
    np.testing.assert_array_equal(d[..., 1],
                                  np.asarray(G.score_function_gradient(sample, "sigma2")[:, 0, 1:]))


def test_npix_gives_the_unbiased_estimate_and_maps_the_derivative_samples_alike():
    # With npix the statistic f = C_ℓ − D_r becomes the unbiased Ĉ_ℓ^(r) = f_ℓ + δ̂_r, δ̂_r =
    # Σ_{ℓ≤2nside}(2ℓ+1) f_ℓ/(Npix − (2nside+1)²) (docs/physics.md §4; written out here in numpy), and
    # the derivative samples get the same linear map: the σ² score-function samples equal
    # (Ĉ^(r) − b_(−r))·s_r built from the unbiased Ĉ^(r) directly.
    rng = np.random.default_rng(12)
    nside, R = 2, 6
    npix, lmax = 12 * nside**2, 2 * nside
    f = rng.standard_normal((R, 3 * nside)) + np.linspace(3.0, 0.5, 3 * nside)
    score = rng.standard_normal((R, 2))
    sample = G.EnsembleSample(jnp.asarray(f[:, None]), jnp.zeros((R, 1, f.shape[1])),
                              jnp.asarray(score), jnp.asarray([1.0]), 0.1, ("sigma2", "rL"))
    fu, du, ell = S.ensemble_derivative_samples(sample, ("sigma2",), npix=npix)
    w = 2.0 * np.arange(lmax + 1) + 1.0
    ref = f[:, : lmax + 1] + (f[:, : lmax + 1] @ w / (npix - (lmax + 1) ** 2))[:, None]
    np.testing.assert_array_equal(ell, np.arange(1, lmax + 1))
    np.testing.assert_allclose(fu, ref[:, 1:], rtol=1e-12)
    centred = (ref - ref.mean(0)) * R / (R - 1)
    np.testing.assert_allclose(du[..., 0], centred[:, 1:] * score[:, :1], rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="npix"):
        S.ensemble_derivative_samples(sample, ("sigma2",), npix=50)


def test_bad_input_is_refused():
    c, w = _shape(0.5), np.eye(ELL.size)
    with pytest.raises(ValueError, match="ell"):
        S.gls_fit(c[:2], w[:2, :2], ELL[:2])
    with pytest.raises(ValueError, match="ell"):
        S.gls_fit(c, w, ELL[::-1])
    with pytest.raises(ValueError, match="estimate"):
        S.gls_fit(c[:-1], w, ELL)
    with pytest.raises(ValueError, match="positive definite"):
        S.gls_fit(c, -w, ELL)
    with pytest.raises(ValueError, match="derivative_samples"):
        S.p_sensitivity(np.tile(c, (10, 1)), np.ones((10, 3)), ELL, precision=w)
    with pytest.raises(ValueError, match="h must"):
        S.p_finite_difference(np.tile(c, (3, 1)), np.tile(c, (3, 1)), 0.0, ELL, precision=w)
