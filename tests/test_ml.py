"""Maximum-likelihood fit of p to spectrum files (per-multipole errors): recovery, Laplace errors vs an
independent Fisher matrix, the ℓ-range table, gradients at the ends, calibration over seeds, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from crjax.theory import bgk_spectrum
from inference.data import Spectrum, spectrum_from_estimate
from inference.likelihoods import _data, _prepare, _static
from inference.make_synthetic import synthetic_spectrum
from inference.ml import _grad, fit_p_map, fit_p_map_by_lmax
from inference.nuts import Priors, fit_p_nuts

TRUE_P = (0.35, 0.5, 0.65)


@pytest.fixture(scope="module")
def synthetic():
    # seed 3: the pulls of this seed are typical (|pull| < 1 in the 40-seed survey of the docstring)
    return {p: synthetic_spectrum(p, seed=3) for p in TRUE_P}


@pytest.fixture(scope="module")
def ml_fits(synthetic):
    return {p: fit_p_map(s) for p, s in synthetic.items()}


@pytest.mark.parametrize("p", TRUE_P)
def test_recovers_p_from_realistic_synthetic_spectrum(ml_fits, p):
    r = ml_fits[p]
    assert r.likelihood == "lognormal" and r.noise_mode == "none"  # auto choices for this file
    assert r.converged
    # realistic errors (IceCube-like f_sky, N): σ_p ≈ 0.08–0.09; a 2.5σ window for one fixed seed
    assert 0.04 < r.p_err < 0.15
    assert abs(r.p - p) < 2.5 * r.p_err
    lo, hi = r.p_interval
    assert 0.0 < lo < r.p < hi < 1.0
    # amplitude is the model's C_1 = 1e-6 in make_synthetic; C_1 itself is poorly measured (ν ≈ 1 mode)
    assert abs(np.log(r.amplitude / 1e-6)) < 3 * r.amplitude_err / r.amplitude


def test_laplace_matches_independent_fisher_matrix():
    """Noise-free data (x = truth) with errors of equal width s in ln C (lognormal likelihood, as for
    the synthetic files, so the compiled fit is shared): the ML point is the truth and the Laplace
    covariance equals the Fisher matrix (Jᵀ J)⁻¹ s² of J = ∂ ln μ/∂θ, built here by finite differences."""
    ell = np.arange(1, 31)
    p0, a0, s = 0.45, 3.0e-7, 0.2
    truth = a0 * np.asarray(bgk_spectrum(ell, p0))
    spec = Spectrum(
        ell=ell, cl=truth, err_lo=truth * (1 - np.exp(-s)), err_hi=truth * (np.exp(s) - 1)
    )
    r = fit_p_map(spec, noise="none")
    assert r.likelihood == "lognormal"
    # L-BFGS stops at |∇(−2lnL)| ≤ 1e-8 in O(1) coordinates: parameters to ~1e-8 relative
    np.testing.assert_allclose([r.p, r.amplitude], [p0, a0], rtol=1e-6)
    assert r.chi2 < 1e-10

    def log_model(theta):
        return np.log(theta[1] * np.asarray(bgk_spectrum(ell, theta[0])))

    h = np.array(
        [1e-6, 1e-6 * a0]
    )  # central differences: truncation ~h², round-off ~1e-10 relative
    jac = np.stack(
        [
            (log_model([p0, a0] + h * e) - log_model([p0, a0] - h * e)) / (2 * h[i])
            for i, e in enumerate(np.eye(2))
        ],
        1,
    )
    fisher_cov = np.linalg.inv(jac.T @ jac) * s**2
    np.testing.assert_allclose(r.cov[:2, :2], fisher_cov, rtol=1e-5)
    np.testing.assert_allclose(r.p_err, np.sqrt(fisher_cov[0, 0]), rtol=1e-5)


@pytest.mark.slow  # a 3-parameter fit is its own compile (~10 s on a loaded CPU)
def test_simulated_estimate_with_free_noise():
    """(a) a simulated Ĉ_ℓ with realisation variance, not noise-subtracted: the free offset N is found."""
    rng = np.random.default_rng(7)
    ell = np.arange(1, 40)
    p0, a0, n0 = 0.5, 1.0, 2e-3
    truth = a0 * np.asarray(bgk_spectrum(ell, p0)) + n0
    sigma = 0.03 * truth
    spec = spectrum_from_estimate(ell, truth + sigma * rng.standard_normal(ell.size), sigma**2)
    r = fit_p_map(spec, noise="free")
    assert r.noise_mode == "free" and r.converged
    # Gaussian data and likelihood: deviations are N(0, σ) up to the curvature of the model
    assert abs(r.p - p0) < 3 * r.p_err
    assert abs(r.noise - n0) < 3 * r.noise_err
    assert r.noise_err > 0 and r.cov[2, 2] > 0


def test_gradients_finite_near_p_edges(synthetic):
    prep = _prepare(synthetic[0.5], None, None, "auto", None, "auto", None, None)
    st, data = _static(prep), _data(prep)
    # logit p = ±30 ↔ p ≈ 1e-13 and 1 − 1e-13; the fit's compiled gradient is reused
    for u in ([-30.0, 0.0], [-5.0, -1.0], [5.0, -1.0], [30.0, 0.0]):
        assert np.all(np.isfinite(np.asarray(_grad(st, data, jnp.array(u)))))


def test_by_lmax_table_equals_separate_fits(synthetic):
    """The table's fits (weights 0/1 on one ℓ range: one compiled program) equal fits of the sliced
    spectrum: the weighted row ℓmax = 6 against a separate fit of ℓ ≤ 6 (shapes 12 and 6: two compiles)."""
    spec = synthetic[0.5]
    rows = fit_p_map_by_lmax(spec, lmax_values=[6, 12])
    for row, lmax in zip(rows, (6, 12)):
        sep = fit_p_map(spec, lmax=lmax)
        assert int(row.ell.max()) == lmax and row.dof == sep.dof == lmax - 2
        # same likelihood, same optimiser from the same start: to the optimiser tolerance
        np.testing.assert_allclose([row.p, row.chi2], [sep.p, sep.chi2], rtol=1e-6, atol=1e-8)
    default = fit_p_map_by_lmax(spec)
    assert [int(r.ell.max()) for r in default] == list(range(4, 13))
    assert default[2].p == rows[0].p  # ℓmax = 6 from the same compiled program and data
    with pytest.raises(ValueError, match="lmax_values: lmax=40 exceeds the largest multipole"):
        fit_p_map_by_lmax(spec, lmax_values=[40])
    with pytest.raises(ValueError, match="lmax_values: lmax=2 leaves 2 multipoles"):
        fit_p_map_by_lmax(spec, lmax_values=[2, 8])


def test_bad_ranges_priors_and_options(synthetic):
    spec = synthetic[0.5]
    with pytest.raises(ValueError, match="lmin must be an integer >= 1"):
        fit_p_map(spec, lmin=0)
    with pytest.raises(ValueError, match="lmin must be <= lmax"):
        fit_p_map(spec, lmin=10, lmax=5)
    with pytest.raises(ValueError, match="no multipoles in the range lmin=40..lmax=50"):
        fit_p_map(spec, lmin=40, lmax=50)
    with pytest.raises(
        ValueError, match="holds 2 multipoles; fitting 2 parameters needs at least 3"
    ):
        fit_p_map(spec, lmin=3, lmax=4)
    with pytest.raises(ValueError, match="likelihood must be one of"):
        fit_p_map(spec, likelihood="poisson")
    with pytest.raises(ValueError, match="noise must be one of"):
        fit_p_map(spec, noise="maybe")
    no_level = Spectrum(ell=spec.ell, cl=spec.cl, err_lo=spec.err_lo, err_hi=spec.err_hi)
    with pytest.raises(ValueError, match="noise='fixed' needs noise_level="):
        fit_p_map(no_level, noise="fixed")
    with pytest.raises(ValueError, match="likelihood='lognormal' needs"):
        fit_p_map(
            Spectrum(
                ell=np.arange(1, 6), cl=np.full(5, 1.0), err_lo=np.full(5, 2.0), err_hi=np.ones(5)
            ),
            likelihood="lognormal",
        )
    for kwargs, msg in [
        ({"p_low": -0.1}, "0 <= p_low < p_high <= 1"),
        ({"p_high": 1.5}, "0 <= p_low < p_high <= 1"),
        ({"p_low": 0.6, "p_high": 0.4}, "0 <= p_low < p_high <= 1"),
        ({"log_amplitude_sd": 0.0}, "log_amplitude_sd must be > 0"),
        ({"noise_scale": -1.0}, "noise_scale must be > 0"),
        ({"p_low": float("nan")}, "p_low must be a finite number"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Priors(**kwargs)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 2"):
        fit_p_nuts(spec, num_samples=0)
    with pytest.raises(ValueError, match="priors must be an inference.nuts.Priors"):
        fit_p_nuts(spec, priors={"p_low": 0.1})


def test_bad_numeric_options(synthetic):
    spec = synthetic[0.5]
    for kw, msg in [
        ({"lmin": 1.5}, "lmin must be an integer >= 1"),
        ({"lmax": "7"}, "lmax must be an integer >= 0"),
        (
            {"noise": "fixed", "noise_level": float("nan")},
            "noise_level must be a finite number >= 0",
        ),
        ({"noise": "fixed", "noise_level": -1.0}, "noise_level must be a finite number >= 0"),
        ({"p_grid": 0}, "p_grid must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer >= 1"),
        ({"tol": 0.0}, "tol must be a finite number > 0"),
        ({"forward": 3}, "forward must be a callable"),
    ]:
        with pytest.raises(ValueError, match=msg):
            fit_p_map(spec, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("p", TRUE_P)
def test_coverage_over_seeds(p):
    """ML 68% intervals over 200 realistic synthetic spectra per p.

    Bands from the statistics of 200 trials: coverage has binomial σ = √(0.68·0.32/200) = 0.033, so
    [0.58, 0.78] is ±3σ around 0.68; the pull std has SE ≈ 1/√400 = 0.05 (±0.15 is 3 SE); the mean
    pull has SE 0.07. The lognormal likelihood approximates the χ² scatter, and its intervals are
    measured slightly high (mean pull +0.15 to +0.41 in 40-seed surveys, likelihoods docstring): the
    bias bound 0.5 is that measurement plus ~1.3 SE, so it catches any doubling of the bias.
    """
    fits = [fit_p_map(synthetic_spectrum(p, seed=seed)) for seed in range(100, 300)]
    inside = np.mean([f.p_interval[0] <= p <= f.p_interval[1] for f in fits])
    pulls = np.array([(f.p - p) / f.p_err for f in fits])
    print(
        f"p={p}: coverage {inside:.3f}, mean pull {pulls.mean():+.3f}, std pull {pulls.std():.3f}"
    )
    assert 0.58 <= inside <= 0.78
    assert abs(pulls.std() - 1) < 0.15 and abs(pulls.mean()) < 0.5
