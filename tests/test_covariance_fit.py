"""The fit of p on the full covariance (issue 9 items 2 and 4, fit side): exact recovery and the Fisher
interval, calibration over Gaussian ensembles and over healpy-synthesised map ensembles estimated with
crjax.spectrum_estimate, the diagonal fit's understated error (cause 2), the BGK-rejection path with an
alternative ν_r family, the ℓ-range table and every refusal.

Statistical bands: a 68% interval covers the truth in a fraction f of N independent trials with binomial
σ_f = √(0.68·0.32/N); "3σ band" below means 0.68 ± 3σ_f. The mean pull (p̂ − p)/σ has standard error
1/√N, so |mean pull| < 0.2 (the issue's bias bound) is tested with N ≥ 100 (SE ≤ 0.1).
"""

import numpy as np
import pytest

import crjax
from crjax.theory import bgk_spectrum
from inference.covariance_fit import (
    _tilted_shapes,
    compare_nu_families,
    dodelson_schneider_factor,
    fit_p_covariance,
    p_by_ell_range,
    summarise_fit,
)
from inference.make_synthetic import synthetic_maps

ELL = np.arange(1, 13)


def _band(n: int, k: float = 3.0) -> tuple[float, float]:
    s = np.sqrt(0.68 * 0.32 / n)
    return 0.68 - k * s, 0.68 + k * s


def _toy_cov(sigma_frac=0.15, common=0.3, amp=10.0, p=0.5):
    """Per-realisation covariance of a toy Ĉ_ℓ^(r): independent scatter ∝ √S_ℓ plus a common offset
    (the realisation's own noise level / dipole scatter, the same at every ℓ: issue 9, cause 2)."""
    s = amp * np.asarray(bgk_spectrum(ELL, p))
    cov1 = np.diag((sigma_frac * np.sqrt(s)) ** 2) + common**2
    return s, cov1


def _draw(rng, s, chol, R):
    x = s + rng.standard_normal((R, s.size)) @ chol.T
    return x.mean(0), np.cov(x, rowvar=False) / R


def test_exact_data_recovers_truth_and_fisher_interval():
    """Noise-free Ĉ = A f(p0): p̂ = p0, χ² = 0 and the profile interval equals the Fisher σ (built here by
    finite differences, independent of the fit's profile root finding) times √m."""
    s, cov1 = _toy_cov()
    R = 400
    cov = cov1 / R
    fit = fit_p_covariance(ELL, s, cov, R)
    np.testing.assert_allclose([fit.p, fit.amplitude], [0.5, 10.0], rtol=1e-7)
    # χ²_min = ĈᵀΨĈ − (fᵀΨĈ)²/fᵀΨf cancels two numbers ~1e6 here: round-off ~1e6·1e-16 per term
    assert fit.chi2 < 1e-8 and fit.dof == 10
    psi = (R - 12 - 2) / (R - 1) * np.linalg.inv(cov)
    h = 1e-5
    jac = np.stack(
        [
            10.0
            * (np.asarray(bgk_spectrum(ELL, 0.5 + h)) - np.asarray(bgk_spectrum(ELL, 0.5 - h)))
            / (2 * h),
            np.asarray(bgk_spectrum(ELL, 0.5)),
        ],
        1,
    )
    m = dodelson_schneider_factor(R, 12)
    sig_p = np.sqrt(m * np.linalg.inv(jac.T @ psi @ jac)[0, 0])
    # σ_p ≈ 0.004 here: the profile is quadratic to O(σ_p · ∂³χ²/∂p³ / ∂²χ²/∂p²) ~ 1e-2 relative
    np.testing.assert_allclose(fit.p_err, sig_p, rtol=1e-2)
    lo, hi = fit.p_interval
    np.testing.assert_allclose([0.5 - lo, hi - 0.5], [sig_p, sig_p], rtol=3e-2)
    assert fit.interval_at_boundary == (False, False)


def test_gaussian_ensembles_bias_and_coverage():
    """300 Gaussian ensembles of R = 60 realisations with a common-mode covariance: |mean pull| < 0.2 and
    coverage in the 3σ binomial band of 300 trials, [0.60, 0.76]."""
    s, cov1 = _toy_cov()
    chol = np.linalg.cholesky(cov1)
    rng = np.random.default_rng(9)
    fits = [fit_p_covariance(ELL, *_draw(rng, s, chol, 60), 60) for _ in range(300)]
    p = np.array([f.p for f in fits])
    err = np.array([f.p_err for f in fits])
    inside = np.mean([f.p_interval[0] <= 0.5 <= f.p_interval[1] for f in fits])
    pull = (p - 0.5) / err
    print(
        f"gaussian ensembles: coverage {inside:.3f}, mean pull {pull.mean():+.3f}, std pull {pull.std():.3f}"
    )
    lo, hi = _band(300)
    assert lo <= inside <= hi
    assert abs(pull.mean()) < 0.2
    # χ² calibrated: mean χ²/dof = 1 ± 3·√(2/dof)/√N
    chi2 = np.array([f.chi2 for f in fits])
    assert abs(chi2.mean() / 10 - 1) < 3 * np.sqrt(2 / 10) / np.sqrt(300)


def test_diagonal_fit_understates_error_full_covariance_does_not():
    """Issue 9, cause 2 (toy Monte Carlo): with a common offset across ℓ the diagonal-only fit's quoted error
    is smaller than the spread of its p̂; the full-covariance fit's is not. The diagonal fit is the same fit
    given only the diagonal of the covariance (what a per-multipole likelihood uses)."""
    s, cov1 = _toy_cov(sigma_frac=0.1, common=0.25)
    chol = np.linalg.cholesky(cov1)
    rng = np.random.default_rng(21)
    R, n = 100, 300
    full, diag = [], []
    for _ in range(n):
        est, cov = _draw(rng, s, chol, R)
        full.append(fit_p_covariance(ELL, est, cov, R))
        diag.append(fit_p_covariance(ELL, est, np.diag(np.diag(cov)), R))
    ratio = {}
    for name, fits in (("full", full), ("diagonal", diag)):
        p = np.array([f.p for f in fits])
        ratio[name] = p.std() / np.mean([f.p_err for f in fits])
        print(
            f"{name}: spread of p {p.std():.4f}, mean quoted error {np.mean([f.p_err for f in fits]):.4f}"
        )
    # the ratio of a standard deviation to its expectation over n = 300 trials has SE ≈ 1/√(2n) = 0.04:
    # ±0.15 is ~3.7 SE; the diagonal fit's ratio (measured ≈ 1.6) must exceed 1.25 (≥ 8 SE above 1)
    assert abs(ratio["full"] - 1) < 0.15
    assert ratio["diagonal"] > 1.25
    # and the full-covariance estimator is the more precise one
    assert np.std([f.p for f in full]) < np.std([f.p for f in diag])


def _map_ensemble_fits(p0, n_trials, R, nside=8, lmax=12, seed0=0):
    fits = []
    for k in range(n_trials):
        maps, _, _ = synthetic_maps(p0, nside=nside, n_realisations=R, seed=seed0 + k)
        est = crjax.spectrum_estimate(maps)
        ell = np.arange(est.estimate.shape[-1])
        fits.append(
            fit_p_covariance(
                ell, np.asarray(est.estimate), np.asarray(est.covariance), R, lmax=lmax
            )
        )
    return fits


def _calibration(fits, p0):
    p = np.array([f.p for f in fits])
    pull = (p - p0) / np.array([f.p_err for f in fits])
    inside = np.mean([f.p_interval[0] <= p0 <= f.p_interval[1] for f in fits])
    return inside, pull.mean(), pull.std()


def test_map_ensemble_estimate_and_fit():
    """One ensemble of 300 healpy-synthesised maps (nside 8, S_ℓ = 10·BGK(½), monopole 3, white noise
    with σ_r uniform in [0.5, 2]) through crjax.spectrum_estimate: the estimate agrees with S_ℓ on its own
    covariance for 1 ≤ ℓ ≤ 2·nside, BGK fits, and p is within its interval widened to 3σ."""
    R = 300
    maps, s_true, _ = synthetic_maps(0.5, nside=8, n_realisations=R, seed=7)
    est = crjax.spectrum_estimate(maps)
    c = np.asarray(est.estimate)[1:]
    cov = np.asarray(est.covariance)[1:, 1:]
    d = c - s_true[1:]
    chi2 = d @ ((R - 16 - 2) / (R - 1) * np.linalg.inv(cov)) @ d
    from scipy import stats

    # 16 multipoles: a correct estimator gives χ²_16; p-value > 1e-3 (fails for a constant bias of
    # the size issue 9 measured, δ ≈ Σ(2ℓ+1)S_ℓ/Npix)
    assert stats.chi2.sf(chi2, 16) > 1e-3
    fit = fit_p_covariance(
        np.arange(17), np.asarray(est.estimate), np.asarray(est.covariance), R, lmax=12
    )
    assert fit.pvalue > 1e-3
    assert abs(fit.p - 0.5) < 3 * fit.p_err


def test_map_ensembles_small_calibration():
    """Default-tier version of the slow calibration: 60 ensembles of R = 40 maps; coverage in the 3σ band
    of 60 trials ([0.50, 0.86]) and |mean pull| < 0.2 + 3/√60 = 0.59."""
    fits = _map_ensemble_fits(0.5, 60, 40, seed0=500)
    inside, mean_pull, std_pull = _calibration(fits, 0.5)
    print(f"maps: coverage {inside:.3f}, mean pull {mean_pull:+.3f}, std pull {std_pull:.3f}")
    lo, hi = _band(60)
    assert lo <= inside <= hi
    assert abs(mean_pull) < 0.2 + 3 / np.sqrt(60)


@pytest.mark.slow
@pytest.mark.parametrize("p0", [1 / 3, 1 / 2, 2 / 3])
def test_map_ensembles_calibration_slow(p0):
    """Issue 9 item 4: 300 ensembles of R = 100 maps at nside 8 per p: |bias| < 0.2σ and 68% coverage in
    [0.62, 0.74] (the binomial σ of 300 trials is 0.027, so the band is ±2.2σ)."""
    fits = _map_ensemble_fits(p0, 300, 100, seed0=10_000)
    inside, mean_pull, std_pull = _calibration(fits, p0)
    print(f"p={p0:.3f}: coverage {inside:.3f}, mean pull {mean_pull:+.3f}, std pull {std_pull:.3f}")
    assert 0.62 <= inside <= 0.74
    assert abs(mean_pull) < 0.2


@pytest.mark.slow
def test_map_ensembles_calibration_nside16_slow():
    """The same at nside 16 (p = ½, 150 ensembles of R = 100: binomial σ 0.038, band [0.56, 0.80] at 3σ;
    mean pull SE 0.08)."""
    fits = _map_ensemble_fits(0.5, 150, 100, nside=16, seed0=20_000)
    inside, mean_pull, std_pull = _calibration(fits, 0.5)
    print(f"nside 16: coverage {inside:.3f}, mean pull {mean_pull:+.3f}, std pull {std_pull:.3f}")
    lo, hi = _band(150)
    assert lo <= inside <= hi
    assert abs(mean_pull) < 0.2 + 0.08


def test_tilted_family_contains_bgk():
    """b = 0 of the tilted family through spectrum_from_nu's Gauss–Jacobi quadrature equals the closed
    form bgk_spectrum (gammaln): two independent routes, agreeing to quadrature round-off."""
    for p in (0.2, 0.5, 0.8):
        np.testing.assert_allclose(
            _tilted_shapes(ELL, p, 0.0), np.asarray(bgk_spectrum(ELL, p)), rtol=1e-9
        )


def test_bgk_rejected_alternative_family_fits():
    """Data from ν_r ∝ (1−x)^0.5 [1 + 3(1−x)/2] with 1% errors: BGK's p-value < 0.01, the summary says
    so, and the tilted family fits with its parameters recovered."""
    s = 2.0 * _tilted_shapes(ELL, 0.5, 3.0)
    R = 400
    cov = np.diag((0.01 * s) ** 2) * 1.0
    out = summarise_fit(ELL, s, cov, R)
    assert out["bgk_rejected"] and out["bgk"]["pvalue"] < 0.01
    fams = {f["family"]: f for f in out["families"]}
    assert not fams["bgk"]["fits"] and fams["tilted"]["fits"]
    np.testing.assert_allclose(
        [fams["tilted"]["params"]["p"], fams["tilted"]["params"]["b"]], [0.5, 3.0], rtol=1e-3
    )
    assert "BGK is rejected" in out["statement"] and "An alternative fits" in out["statement"]
    direct = compare_nu_families(ELL, s, cov, R)
    assert [f.family for f in direct] == ["bgk", "tilted"]


def test_summary_when_bgk_fits():
    s, cov1 = _toy_cov()
    rng = np.random.default_rng(3)
    est, cov = _draw(rng, s, np.linalg.cholesky(cov1), 200)
    out = summarise_fit(
        np.arange(0, 13),
        np.concatenate([[0.0], est]),
        np.pad(cov, ((1, 0), (1, 0))) + np.diag([1.0] + [0.0] * 12),
        200,
    )
    assert not out["bgk_rejected"] and "families" not in out
    assert out["statement"].startswith("BGK fits")
    assert [r["lmax"] for r in out["by_lmax"]] == list(range(4, 13))
    for key in ("p", "p_interval_68", "chi2", "dof", "pvalue", "hartlap_factor"):
        assert key in out["bgk"]


def test_p_by_ell_range_rows():
    s, cov1 = _toy_cov()
    rng = np.random.default_rng(4)
    est, cov = _draw(rng, s, np.linalg.cholesky(cov1), 15)
    # R = 15: Hartlap + Dodelson–Schneider need R >= L + 5, so only ℓmax <= 10 by default
    rows = p_by_ell_range(ELL, est, cov, 15)
    assert [int(r.ell.max()) for r in rows] == list(range(4, 11))
    assert [r.dof for r in rows] == list(range(2, 9))
    last = fit_p_covariance(ELL, est, cov, 15, lmax=10)
    assert rows[-1].p == last.p and rows[-1].chi2 == last.chi2
    with pytest.raises(ValueError, match="n_realisations=15 is too small for 12 multipoles"):
        p_by_ell_range(ELL, est, cov, 15, lmax_values=[12])
    with pytest.raises(ValueError, match="lmax=13 exceeds the largest multipole of the data"):
        p_by_ell_range(ELL, est, cov, 15, lmax_values=[13])
    with pytest.raises(ValueError, match="lmax_values must be integers"):
        p_by_ell_range(ELL, est, cov, 15, lmax_values=[4.5])


def test_bad_input():
    s, cov1 = _toy_cov()
    cov = cov1 / 100
    cases = [
        ((ELL[::-1], s, cov, 100), {}, "ell must be strictly increasing"),
        ((ELL + 0.5, s, cov, 100), {}, "ell must be integers >= 0"),
        ((ELL, s[:-1], cov, 100), {}, r"estimate must have the shape of ell \(12,\)"),
        ((ELL, np.where(ELL == 3, np.nan, s), cov, 100), {}, "estimate contains NaN or inf"),
        ((ELL, s, cov[:-1], 100), {}, r"covariance must have shape \(12, 12\)"),
        (
            (ELL, s, cov + np.triu(np.full((12, 12), 1e-3), 1), 100),
            {},
            "covariance must be symmetric",
        ),
        ((ELL, s, -cov, 100), {}, "covariance must be positive definite"),
        ((ELL, s, cov, 16), {}, r"n_realisations=16 is too small for 12 multipoles.*= 17"),
        ((ELL, s, cov, 100.0), {}, "n_realisations must be an integer >= 2"),
        ((ELL, s, cov, 100), {"lmin": 0}, "lmin must be an integer >= 1"),
        ((ELL, s, cov, 100), {"lmax": 0}, "lmax must be an integer >= lmin=1"),
        (
            (ELL, s, cov, 100),
            {"lmin": 11},
            "holds 2 multipoles of the data; fitting p and the amplitude needs at least 3",
        ),
    ]
    for args, kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fit_p_covariance(*args, **kw)
