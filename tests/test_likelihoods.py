"""Likelihoods: per-multipole terms against independent formulas (scipy), the Hartlap-corrected
precision against a Wishart Monte Carlo, and the profiled χ² against brute-force minimisation."""

import numpy as np
import pytest
from scipy import optimize, stats

from inference.likelihoods import _chi2_terms, hartlap_factor, hartlap_precision, profiled_chi2


def test_likelihood_terms_against_independent_formulas():
    mu = np.array([0.5, 1.0, 1.5, 2.5, 0.2])
    x = np.full(5, 1.0)
    lo, hi = np.full(5, 0.3), np.full(5, 0.8)
    # Gaussian with the symmetrised σ: −2 ln L differences equal scipy's
    sig = 0.55
    got = np.asarray(_chi2_terms("gaussian", mu, x, lo, hi))
    ref = -2 * (stats.norm.logpdf(x, mu, sig) - stats.norm.logpdf(0, 0, sig))
    np.testing.assert_allclose(got, ref, rtol=1e-12)
    # split normal: σ⁺ above the data, σ⁻ below
    got = np.asarray(_chi2_terms("split_normal", mu, x, lo, hi))
    np.testing.assert_allclose(got, np.where(mu > x, (mu - x) / hi, (mu - x) / lo) ** 2, rtol=1e-12)
    # Barlow's variable Gaussian and the lognormal give Δχ² = 1 exactly at the quoted 68% bounds
    for kind in ("variable_gaussian", "lognormal"):
        at_bounds = np.asarray(
            _chi2_terms(kind, np.array([1.0 - 0.3, 1.0 + 0.8]), np.ones(2), lo[:2], hi[:2])
        )
        np.testing.assert_allclose(at_bounds, [1.0, 1.0], rtol=1e-12)


def test_hartlap_precision_is_unbiased_wishart_monte_carlo():
    """E[h Σ̂⁻¹] = Σ⁻¹ for sample covariances of R Gaussian vectors (Hartlap et al. 2007), while the plain
    inverse is high by 1/h = (R − 1)/(R − L − 2) = 1.75 here: 4000 draws of L = 5, R = 15."""
    rng = np.random.default_rng(0)
    L, R, n = 5, 15, 4000
    a = rng.standard_normal((L, L))
    sigma = a @ a.T + L * np.eye(L)
    chol = np.linalg.cholesky(sigma)
    x = rng.standard_normal((n, R, L)) @ chol.T
    xc = x - x.mean(1, keepdims=True)
    s = np.einsum("nri,nrj->nij", xc, xc) / (R - 1)
    inv = np.linalg.inv(s)
    target = np.linalg.inv(sigma)
    # relative MC error of the mean of Wishart inverses ~ √(2/(R−L)) / √n ≈ 0.7%: tolerance 5% of the diagonal
    tol = 0.05 * np.max(np.abs(np.diag(target)))
    mean_h = np.mean(
        [hartlap_precision(si, R) for si in s[:400]], axis=0
    )  # the function itself (400 draws)
    np.testing.assert_allclose(hartlap_factor(R, L) * inv.mean(0), target, atol=tol)
    np.testing.assert_allclose(mean_h, target, atol=3 * tol)
    assert np.all(np.diag(inv.mean(0)) > 1.5 * np.diag(target))  # the uncorrected inverse is biased


def test_hartlap_refusals():
    with pytest.raises(
        ValueError,
        match=r"n_realisations=7 is too small for a covariance of 5 multipoles.*>= n_multipoles \+ 3 = 8",
    ):
        hartlap_factor(7, 5)
    with pytest.raises(ValueError, match="n_realisations must be an integer >= 2"):
        hartlap_factor(10.5, 3)
    with pytest.raises(ValueError, match="covariance must be positive definite"):
        hartlap_precision(np.diag([1.0, -1.0, 1.0]), 20)


def test_profiled_chi2_equals_brute_force_minimum():
    rng = np.random.default_rng(1)
    L = 7
    f = rng.uniform(0.5, 2.0, (3, L))
    c = rng.normal(3.0, 1.0, L)
    a = rng.standard_normal((L, L))
    psi = a @ a.T + np.eye(L)
    chi2, amp = (np.asarray(v) for v in profiled_chi2(f, c, psi))
    for k in range(3):
        fk = f[k]
        best = optimize.minimize_scalar(lambda A, fk=fk: (c - A * fk) @ psi @ (c - A * fk))
        # the brute-force 1-D minimiser stops at |ΔA| ~ 1e-8 relative: χ² agrees to ~1e-12
        np.testing.assert_allclose(chi2[k], best.fun, rtol=1e-9)
        np.testing.assert_allclose(amp[k], best.x, rtol=1e-6)
