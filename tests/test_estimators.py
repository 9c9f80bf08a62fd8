"""Tests of crjax.estimators against references we did not write: exact expectations of white
noise (addition theorem), the sum rules' pixel identities, HEALPix quadrature numbers of
physics.md §4, maps synthesised from a known spectrum (healpy.alm2map of BGK spectra, with a
monopole and per-realisation white noise) judged with Hotelling's T² / F distribution, finite
differences (check_grads), and the engine at the seed's parameters (slow)."""

import math

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy import stats

from crjax import bgk_spectrum, healpix_directions
from crjax.estimators import (
    cross_spectrum_estimate,
    mean_power_spectrum,
    noise_level,
    parseval,
    spectrum_estimate,
    spectrum_estimator,
    standard_dipole,
    sum_rules,
)
from crjax.spectra import declination_band_mask, power_spectrum, relative_intensity
from crjax.transport import relative_diffusion_tensor


def _rng(*seed):
    return np.random.default_rng((20151102,) + seed)


# ------------------------------------------------------------------------------------------------
# ensembles: white noise is exactly flat at 4pi sigma^2/Npix in expectation (addition theorem)


@pytest.fixture(scope="module")
def white_ensemble():
    """200 uncorrelated-pixel maps at nside 4 built as delta I = r.g from i.i.d. Gaussian r with
    covariance 2T K, so the (3.1) noise level is their exact expected C_l."""
    nside, nreal, T = 4, 200, 3.0
    npix = 12 * nside**2
    K = jnp.array([[0.5, 0.1, 0.0], [0.1, 0.3, 0.0], [0.0, 0.0, 1.2]])
    chol = jnp.linalg.cholesky(2 * T * K)
    r = jnp.asarray(_rng(99).normal(size=(nreal, npix, 3))) @ chol.T
    g = jnp.array([0.2, 0.0, 1.0])
    return dict(nside=nside, npix=npix, T=T, K=K, g=g, r=r, maps=relative_intensity(r, g))


def test_white_noise_flat_at_noise_level(white_ensemble):
    e = white_ensemble
    mean, sem = mean_power_spectrum(e["maps"])
    N = noise_level(e["K"], e["T"], e["g"], e["npix"])
    # E[C_l] = (4pi/Npix) var exactly for uncorrelated pixels; 200 maps: sem ~ N sqrt(2/(2l+1)/200).
    # 4.5 sigma per l (12 multipoles) keeps the false-failure rate < 1e-4.
    assert np.all(np.abs(np.asarray(mean) - float(N)) < 4.5 * np.asarray(sem))
    # The seed's estimator against independent expectations (not against its own formula):
    # E[C_hat_l] = 0 for white noise with the exact N, and for Gaussian white noise
    # C_l ~ N chi^2_{2l+1}/(2l+1), so nreal * variance -> 2 N^2/(2l+1) (addition theorem; the pixel
    # quadrature makes the a_lm only nearly independent, a few % at l <= 2 nside).
    est = spectrum_estimator(power_spectrum(e["maps"]), N)
    assert est.estimate.shape == (12,) and est.noise.shape == (12,)
    z = np.asarray(est.estimate) / np.sqrt(np.asarray(est.variance))
    assert np.all(np.abs(z) < 4.5)  # 12 multipoles at 4.5 sigma: false failure < 1e-4
    ell = np.arange(1, 9)
    ratio = np.asarray(est.variance)[1:9] * 200 / (2 * float(N) ** 2 / (2 * ell + 1))
    # sampling error of a variance from 200 chi^2_k draws: sqrt((2 + 12/k)/200), k = 2l+1
    # (kurtosis of chi^2_k); 4 of them plus 5% for the quadrature
    band = 4 * np.sqrt((2 + 12 / (2 * ell + 1)) / 200) + 0.05
    assert np.all(np.abs(ratio - 1) < band), ratio
    # Parseval for white noise: the sum to 3 nside - 1 holds (3 nside)^2/Npix = 3/4 of the variance.
    h, p = parseval(e["maps"])
    ratio = np.mean(h) / np.mean(p)
    assert abs(ratio - 0.75) < 0.02  # 200 maps x 144 dof: statistical scatter ~0.3%


def test_sum_rules_white_noise_and_offsets(white_ensemble):
    # Positions = per-realisation offset + white noise: (2.6) holds exactly in pixels, (2.5)/(2.7)
    # only after adding the white power above lmax.
    e = white_ensemble
    offsets = 0.7 * jnp.asarray(_rng(8).normal(size=(e["r"].shape[0], 1, 3)))
    r = e["r"] + offsets
    T = jnp.array([e["T"]])
    maps = relative_intensity(r, e["g"])
    cl = power_spectrum(maps)
    K = jnp.einsum("api,apj->ij", r, r)[None] / (r.shape[0] * r.shape[1]) / (2 * T[:, None, None])
    K_rel, _ = relative_diffusion_tensor(r[:, None], T)
    N = noise_level(K_rel, T, e["g"], e["npix"])  # the white (relative) part is the shot noise here
    s = sum_rules(jnp.mean(cl, axis=0)[None], K, K_rel, T, e["g"], npix=e["npix"], noise=N)
    # (2.6): C_0/4pi = (pixel mean of dI)^2 and 2T g(K - K_rel)g = mean_r (g.rbar)^2: same sums.
    np.testing.assert_allclose(s.monopole_lhs, s.monopole_rhs, rtol=1e-12)
    # (2.5)/(2.7): expectation equal; scatter of 200 x 768 chi^2 dof ~ 0.5%, bias (Npix-1)/Npix.
    np.testing.assert_allclose(s.multipole_lhs, s.multipole_rhs, rtol=0.03)
    np.testing.assert_allclose(s.total_lhs, s.total_rhs, rtol=0.03)
    # Without the tail the l >= 1 sum holds ~ ((lmax+1)^2 - 1)/(Npix - 1) of the relative variance.
    bare = sum_rules(jnp.mean(cl, axis=0)[None], K, K_rel, T, e["g"], npix=e["npix"])
    np.testing.assert_allclose(bare.multipole_lhs / bare.multipole_rhs, 143 / 191, rtol=0.03)


def test_standard_dipole_vs_ensemble_dipole(white_ensemble):
    # maps = common dipole A cos(theta) + white noise: the ensemble-averaged map keeps the dipole
    # and only N/nreal of the noise, while <C_1> carries the full noise N.
    e = white_ensemble
    p = healpix_directions(e["nside"])
    A = 1.0  # dipole power comparable to N, so <C_1> - C_1(dipole) ~ N is resolved
    maps = e["maps"] + A * p[None, :, 2]
    N = float(noise_level(e["K"], e["T"], e["g"], e["npix"]))
    c1_dip = float(power_spectrum(A * p[:, 2])[1])
    # continuum (4pi/9)A^2 vs pixel quadrature at nside 4: the error is ~ 5e-2 (physics.md scaling)
    assert abs(c1_dip / (4 * np.pi / 9 * A**2) - 1) < 0.06
    std = float(standard_dipole(maps))
    mean, sem = mean_power_spectrum(maps)
    assert abs(float(mean[1]) - (c1_dip + N)) < 4.5 * float(sem[1]) + 0.05 * N
    # the average map's noise power is N/nreal in expectation; allow 6x for chi^2 with 3 dof
    assert abs(std - c1_dip) < 6 * N / maps.shape[0] + 2 * math.sqrt(c1_dip * N / maps.shape[0])
    assert float(mean[1]) - std > 0.5 * N  # the "standard diffusion" dipole lies below <C_1>


# ------------------------------------------------------------------------------------------------
# smooth maps: Parseval to the quadrature error, falling as nside^-2


def test_parseval_smooth_band_limited_maps():
    rng = np.random.default_rng(11)
    lb = 8
    cl = np.zeros(lb + 1)
    cl[1:] = 1.0 / np.arange(1, lb + 1) ** 2
    # reproducible band-limited alm without healpy's global RNG
    alm = np.zeros(hp.Alm.getsize(lb), dtype=complex)
    for ell in range(1, lb + 1):
        for m in range(ell + 1):
            i = hp.Alm.getidx(lb, ell, m)
            z = rng.normal(size=2) * math.sqrt(cl[ell] / 2)
            alm[i] = z[0] + 1j * z[1] if m > 0 else z[0] * math.sqrt(2)
    errs = []
    for nside in (8, 16):
        h, p = parseval(hp.alm2map(alm, nside, lmax=lb))
        errs.append(abs(float(h) / float(p) - 1))
    # physics.md §4: ~1e-3 at nside 8 and falling ∝ nside^-2 (ratio 4); allow 3..5.5
    assert 1e-4 < errs[0] < 3e-3
    assert 3.0 < errs[0] / errs[1] < 5.5


# ------------------------------------------------------------------------------------------------
# spectrum_estimate: unbiased for band-limited signal + independent scatter of any level


def _bgk_ensemble(nside, nreal, p, seed, *, amp=1.0, monopole=2.0, noise=(0.3, 1.0), lmax=None):
    """Maps = s + n: s Gaussian isotropic with S_l = amp * BGK_p(l) for 1 <= l <= lmax (default
    2 nside, band-limited there) plus a fixed monopole and a random one (S_0 = amp); n white with
    a per-realisation level sigma_r uniform in ``noise``. Returns maps (nreal, npix), S_l (the
    truth, S_0 without the fixed monopole) and the fixed monopole's C_0 = 4 pi monopole^2."""
    lmax = 2 * nside if lmax is None else lmax
    rng = _rng(31, nside, seed)
    S = np.zeros(lmax + 1)
    S[1:] = amp * np.asarray(bgk_spectrum(np.arange(1, lmax + 1), p))
    S[0] = amp
    ell, m = hp.Alm.getlm(lmax)
    scale = np.sqrt(S[ell] / 2)
    maps = []
    for _ in range(nreal):
        z = rng.normal(size=(2, ell.size))
        alm = scale * (z[0] + 1j * z[1])
        alm[m == 0] = np.sqrt(2) * alm[m == 0].real  # real a_l0 with variance S_l
        maps.append(hp.alm2map(alm, nside, lmax=lmax, pixwin=False))
    sigma = rng.uniform(*noise, size=nreal)
    maps = np.asarray(maps) + monopole + sigma[:, None] * rng.normal(size=(nreal, 12 * nside**2))
    return maps, S, 4 * np.pi * monopole**2


def _hotelling_pvalue(est, truth, lo, hi):
    """p-value of mean == truth over l in [lo, hi] from Hotelling's T^2: with R Gaussian samples
    and nu bins, (R - nu)/(nu (R - 1)) T^2 ~ F(nu, R - nu) exactly (T^2 = d^T Cov_mean^-1 d). The
    per-realisation C_l are chi^2-like, not Gaussian, but R >> nu makes the mean near Gaussian."""
    d = np.asarray(est.estimate)[lo : hi + 1] - truth[lo : hi + 1]
    cov = np.asarray(est.covariance)[lo : hi + 1, lo : hi + 1]
    t2 = d @ np.linalg.solve(cov, d)
    R, nu = est.n_realisations, d.size
    return stats.f.sf((R - nu) / (nu * (R - 1)) * t2, nu, R - nu), t2


def _check_unbiased(nside, nreal, p, seed):
    maps, S, c0_fixed = _bgk_ensemble(nside, nreal, p, seed)
    est = spectrum_estimate(maps)
    L = 2 * nside
    assert est.estimate.shape == (L + 1,) and est.covariance.shape == (L + 1, L + 1)
    assert est.samples.shape == (nreal, L + 1) and est.n_realisations == nreal
    # T^2 over 1 <= l <= 2 nside. Threshold p > 1e-3: a false failure per configuration has
    # probability 1e-3 (the seeds are fixed, so a pass is reproducible). The seed's estimator on the
    # same maps is rejected (below), so the test has the power to fail.
    pval, t2 = _hotelling_pvalue(est, S, 1, L)
    assert pval > 1e-3, (nside, p, t2, pval)
    # the offset added is the smooth part's diagonal delta = sum (2l+1) S_l / Npix (monopole incl.)
    npix = 12 * nside**2
    delta = (np.sum((2 * np.arange(L + 1) + 1) * S) + c0_fixed) / npix
    off = np.asarray(est.offset)
    assert abs(off.mean() - delta) < 4.5 * off.std(ddof=1) / math.sqrt(nreal)
    return maps, S, delta, est


@pytest.fixture(scope="module")
def bgk_nside8():
    """The default tier's nside-8 check (p = 1/2, 150 maps), shared with the bias test below."""
    return _check_unbiased(8, 150, 0.5, 0)


def test_spectrum_estimate_unbiased_small(bgk_nside8):
    # default tier: nside 4 and 8, p = 1/2, 150 maps (nu = 8 and 16 bins, R >> nu)
    _check_unbiased(4, 150, 0.5, 0)


@pytest.mark.slow
@pytest.mark.parametrize("nside", [8, 16, 32])
@pytest.mark.parametrize("p", [1 / 3, 1 / 2, 2 / 3])
def test_spectrum_estimate_unbiased(nside, p):
    # the validation: BGK p in {1/3, 1/2, 2/3}, monopole, per-realisation white noise,
    # nside 8, 16, 32, 1 <= l <= 2 nside; R = 400 keeps R >> nu = 64 at nside 32
    _check_unbiased(nside, 400, p, 1)


def test_seed_estimator_low_by_constant_delta(bgk_nside8):
    # The cause 1 on the same maps: <C_l> - N with N = (4 pi/Npix) <dI^2> (3.1;
    # 2T g.K.g is the pixel variance of dI) is S_l - delta at every l, delta = sum(2l+1)S_l/Npix.
    nside = 8
    maps, S, delta = bgk_nside8[:3]
    npix = 12 * nside**2
    N = 4 * np.pi / npix * np.mean(maps**2)
    seed = spectrum_estimator(power_spectrum(maps, lmax=2 * nside), N)
    pair = spectrum_estimate(maps, offset=False)  # per-realisation N_r: the same mean
    # the seed's mean equals the pair-sum mean: sum_r N_r / R = N (identity of the two means)
    np.testing.assert_allclose(pair.estimate, seed.estimate, rtol=1e-10, atol=1e-12 * N)
    p_true, _ = _hotelling_pvalue(pair, S, 1, 2 * nside)
    p_shift, _ = _hotelling_pvalue(pair, S - delta, 1, 2 * nside)
    assert p_true < 1e-6  # biased: rejected against S_l
    assert p_shift > 1e-3  # but consistent with S_l - delta (a constant)
    # the constant itself: mean bias over l = 1..2 nside within 4 sigma of -delta
    b = np.asarray(seed.estimate)[1:] - S[1:]
    w = np.ones(2 * nside) / (2 * nside)
    sb = math.sqrt(w @ np.asarray(pair.covariance)[1:, 1:] @ w)
    assert abs(b.mean() + delta) < 4 * sb and delta > 8 * sb


def test_tensor_estimate_contracts_to_scalar_estimate():
    nside, nreal = 4, 6
    r = _rng(41).normal(size=(nreal, 2, 12 * nside**2, 3)) + np.array([1.0, 0.0, -2.0])
    t = cross_spectrum_estimate(r)
    assert t.estimate.shape == (2, 3, 3, 2 * nside + 1) and t.n_realisations == nreal
    np.testing.assert_allclose(t.estimate, np.swapaxes(t.estimate, 1, 2), rtol=1e-12)
    for seed in range(3):
        g = _rng(42, seed).normal(size=3)
        direct = spectrum_estimate(relative_intensity(r, jnp.asarray(g)))
        con = t.contract(g)
        # same quadratic forms summed in another order: fp64 round-off (~1e-15 relative); the
        # offsets cancel part of C_l, so compare on the scale of the samples
        for a, b in zip(con, direct, strict=True):
            scale = np.abs(np.asarray(b)).max()
            np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12 * scale)


def test_spectrum_estimate_masked_removes_scatter():
    # Masked, offset=False: pure white noise of per-realisation level has E = 0 exactly (the masked
    # diagonal is the noise's whole expectation). Hotelling T^2 at p > 1e-3 as above.
    nside, nreal = 4, 120
    rng = _rng(43)
    sigma = rng.uniform(0.5, 2.0, size=nreal)
    maps = sigma[:, None] * rng.normal(size=(nreal, 12 * nside**2))
    mask = declination_band_mask(nside, -90.0, 30.0)
    est = spectrum_estimate(maps, mask=mask, offset=False)
    pval, _ = _hotelling_pvalue(est, np.zeros(2 * nside + 1), 0, 2 * nside)
    assert pval > 1e-3
    np.testing.assert_allclose(
        est.diagonal, 4 * np.pi / maps.shape[1] ** 2 * np.sum((maps * np.asarray(mask)) ** 2, -1)
    )


def test_spectrum_estimate_gradient_and_bad_input():
    m = jnp.asarray(_rng(44).normal(size=(3, 2, 48)))
    w = jnp.linspace(0.5, 1.5, 3)
    # finite differences (fp64, quadratic in the maps): check_grads' default tolerances
    def f(x):
        e = spectrum_estimate(x, lmax=2)
        return jnp.sum(e.estimate @ w) + jnp.sum(e.covariance)

    check_grads(jax.jit(f), (m,), order=1, modes=["rev"])
    with pytest.raises(ValueError, match="R >= 2"):
        spectrum_estimate(jnp.ones((1, 48)))
    with pytest.raises(ValueError, match="maps must have shape"):
        spectrum_estimate(jnp.ones(48))
    with pytest.raises(ValueError, match="maps contains 1 non-finite"):
        spectrum_estimate(jnp.ones((2, 48)).at[0, 3].set(jnp.nan))
    with pytest.raises(ValueError, match="lmax must satisfy"):
        spectrum_estimate(jnp.ones((2, 48)), lmax=6)
    with pytest.raises(ValueError, match="offset=False"):
        spectrum_estimate(jnp.ones((2, 48)), mask=jnp.ones(48))
    with pytest.raises(ValueError, match="mask is zero"):
        spectrum_estimate(jnp.ones((2, 48)), mask=jnp.zeros(48), offset=False)
    with pytest.raises(ValueError, match="positions must have shape"):
        cross_spectrum_estimate(jnp.ones((2, 48)))
    est = spectrum_estimate(m, lmax=2)  # R = 3
    with pytest.raises(ValueError, match="n_bins"):
        est.hartlap_factor(1)
    assert spectrum_estimate(jnp.concatenate([m, m, m, m]), lmax=2).hartlap_factor(3) == 7 / 11
    with pytest.raises(ValueError, match="realisation axis"):
        mean_power_spectrum(jnp.ones((1, 48)))


@pytest.mark.slow
def test_seed_parameters_convergence():
    """Seed §3 at reduced scale: nside 8, 8 realisations, tOmega up to 200. <C_0> and N grow ∝ T
    while C_hat_l = <C_l> - N (l >= 1) levels off (Fig. 2/3)."""
    from crjax import diffusion_tensor, run_ensemble
    from crjax.field import paper_2015_field

    nside, nreal, rL = 8, 8, 0.1
    npix = 12 * nside**2
    tomega = np.array([25.0, 50.0, 100.0, 150.0, 200.0])
    times = jnp.asarray(tomega * rL)
    tr = run_ensemble(paper_2015_field(), jax.random.PRNGKey(2015), nreal, nside, times, rL=rL,
                      chunk_size=4)
    r = tr.positions  # (nreal, ntimes, npix, 3)
    K, _ = diffusion_tensor(r, times)
    K_rel, _ = relative_diffusion_tensor(r, times)
    K, K_rel = np.asarray(K), np.asarray(K_rel)
    lines = []
    for name, g in (("par", jnp.array([0.0, 0.0, 1.0])), ("perp", jnp.array([1.0, 0.0, 0.0]))):
        cls = power_spectrum(relative_intensity(r, g))  # (nreal, ntimes, 24)
        N = noise_level(K, times, g, npix)
        est = spectrum_estimator(cls, N)
        c0, n = np.asarray(est.mean[:, 0]), np.asarray(N)
        slope_c0 = np.polyfit(np.log(tomega[1:]), np.log(c0[1:]), 1)[0]
        slope_n = np.polyfit(np.log(tomega[1:]), np.log(n[1:]), 1)[0]
        chat = np.asarray(est.estimate)
        sig = np.sqrt(np.asarray(est.variance))
        lines.append(f"{name}: C0={c0} N={n} slope(C0)={slope_c0:.2f} slope(N)={slope_n:.2f}")
        for ell in (1, 2, 5, 9):
            lines.append(f"  l={ell}: Chat={chat[:, ell]} +- {sig[:, ell]}")
        # N ∝ T g.K(T).g: slope 1 once K has converged. Measured 1.29 (par) / 0.93 (perp) over
        # tOmega 50..200: K_par is still rising there, so the band is wide.
        assert 0.7 < slope_n < 1.5
        # <C_0> (was: slope in 0.4..1.6, measured 0.62-0.70 / 0.96). The statistics do not allow
        # any slope band: 8 chi^2_1-like monopoles give a jackknife error of ~0.5 on the slope
        # (measured 0.54 for g || B0; printed), so 0.4..1.6 was narrower than 1 sigma either way
        # and is dropped. What is sharp: (2.6) holds exactly in pixels, <C_0>/4pi =
        # 2T g.(K - K~).g, with C_0 from the harmonic transform and K, K~ from the positions by
        # separate code (crjax.transport); fp64 round-off of sums over 768 pixels: rtol 1e-9.
        np.testing.assert_allclose(
            c0 / (4 * np.pi), 2 * np.asarray(times) * np.einsum("tij,i,j->t", K - K_rel, g, g),
            rtol=1e-9,
        )
        per = np.asarray(cls[:, 1:, 0])  # (nreal, 4)
        loo = (per.sum(0)[None] - per) / (nreal - 1)
        reps = np.array([np.polyfit(np.log(tomega[1:]), np.log(x), 1)[0] for x in loo])
        sd = np.sqrt((nreal - 1) / nreal * np.sum((reps - reps.mean()) ** 2))
        lines.append(f"  slope(C0) jackknife error {sd:.2f}")
        # the dipole has levelled off while the noise keeps growing (tOmega 100 -> 200)
        assert n[4] / n[2] > 1.6 and chat[4, 1] / chat[2, 1] < 1.3
        # levelling off: between tOmega 100 and 200 C_hat_l (l = 1..9) changes by much less than
        # N, which doubles; the difference is compared with its statistical error.
        d = chat[4, 1:10] - chat[2, 1:10]
        err = np.sqrt(sig[4, 1:10] ** 2 + sig[2, 1:10] ** 2)
        assert np.all(np.abs(d) < 4 * err + 0.25 * n[2])
    print("\n".join(lines))
