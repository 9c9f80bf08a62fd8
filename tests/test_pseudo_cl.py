"""Pseudo-C_ℓ coupling: Wigner 3j against sympy, unmasked sky, the sum rule, the antipodal invariance that
lets one mask serve simulated (momentum) and data (arrival) maps, a Monte Carlo and a forward-modelled fit."""

import healpy as hp
import jax.numpy as jnp
import numpy as np
import pytest
from sympy.physics.wigner import wigner_3j

from crjax.spectra import declination_band_mask
from crjax.theory import bgk_spectrum
from inference.data import spectrum_from_estimate
from inference.ml import fit_p_map
from inference.pseudo_cl import (
    _log_wigner3j_000_sq,
    coupling_forward,
    fsky_forward,
    mask_coupling_matrix,
)


def test_wigner_3j_and_full_sky_coupling():
    for l1, l2, l3 in [(2, 3, 1), (4, 4, 4), (10, 7, 5), (20, 13, 9), (3, 2, 2)]:
        ref = float(wigner_3j(l1, l2, l3, 0, 0, 0)) ** 2
        np.testing.assert_allclose(
            np.exp(_log_wigner3j_000_sq(l1, l2, l3)), ref, rtol=1e-12, atol=1e-300
        )
    m_full = mask_coupling_matrix(np.ones(hp.nside2npix(8)), 10)
    # unmasked sky: no coupling. healpy's anafast of a constant map at nside 8 returns W_0 = 4π to
    # 3e-5 (pixel quadrature) and leaks ~1e-9 into even L: hence atol 1e-4
    np.testing.assert_allclose(m_full, np.eye(11), atol=1e-4)


def test_coupling_sum_rule_band_limited_weight():
    """Σ_ℓ (2ℓ+1) M_ℓℓ' = (2ℓ'+1) ⟨w²⟩ (variance of the weighted map), exact when ℓ reaches ℓ' + L_w."""
    nside = 8
    z = hp.pix2vec(nside, np.arange(hp.nside2npix(nside)))[2]
    w = 1.0 + 0.5 * z  # band-limited to L = 1
    M = mask_coupling_matrix(w, 12, lmax_in=10)
    lhs = (2 * np.arange(13) + 1) @ M
    # healpix quadrature of ⟨w²⟩ and of its power spectrum: ~1e-3 at nside 8 (physics.md §4)
    np.testing.assert_allclose(lhs, (2 * np.arange(11) + 1) * np.mean(w**2), rtol=3e-3)


def test_coupling_unchanged_by_antipodal_map():
    """The mask in momentum pixels (crjax maps) and the same band in arrival pixels (data maps) are
    antipodal images of each other; their coupling matrices are equal (W_L is invariant under p̂ → −p̂)."""
    nside = 8
    mask = np.asarray(declination_band_mask(nside, -90.0, -20.0))
    vec = np.array(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))))
    antipode = hp.vec2pix(nside, *(-vec))
    arrival_mask = mask[antipode]
    assert not np.array_equal(mask, arrival_mask)  # a southern band: the two differ as maps
    np.testing.assert_allclose(
        mask_coupling_matrix(mask, 10, lmax_in=14),
        mask_coupling_matrix(arrival_mask, 10, lmax_in=14),
        rtol=1e-10,
        atol=1e-14,
    )


def test_bad_masks_and_options():
    with pytest.raises(ValueError, match="mask is zero everywhere"):
        mask_coupling_matrix(np.zeros(hp.nside2npix(2)), 4)
    with pytest.raises(ValueError, match="mask must be a 1-D HEALPix map"):
        mask_coupling_matrix(np.ones(50), 4)
    with pytest.raises(ValueError, match="mask contains NaN or inf"):
        mask_coupling_matrix(np.full(hp.nside2npix(2), np.nan), 4)
    with pytest.raises(ValueError, match="lmax must be an integer >= 0"):
        coupling_forward(np.ones(hp.nside2npix(2)), -1)
    with pytest.raises(ValueError, match=r"f_sky must lie in \(0, 1\]"):
        fsky_forward(1.5)


@pytest.mark.slow  # own compile of the forward-modelled likelihood
def test_fit_through_coupling_forward_model():
    nside, lmax = 8, 31
    mask = np.asarray(declination_band_mask(nside, -90.0, 30.0))
    fwd = coupling_forward(mask, lmax, lmax_in=47)
    full = np.concatenate([[0.0], 1e-6 * np.asarray(bgk_spectrum(np.arange(1, 48), 0.6))])
    pseudo = np.asarray(fwd(jnp.asarray(full)))
    ell = np.arange(2, lmax + 1)
    spec = spectrum_from_estimate(ell, pseudo[ell], (0.05 * pseudo[ell]) ** 2)
    r = fit_p_map(spec, noise="none", forward=fwd)
    # exact pseudo-C_ℓ data: the forward-modelled fit returns the truth (optimiser tolerance)
    np.testing.assert_allclose([r.p, r.amplitude], [0.6, 1e-6], rtol=1e-5)
    # ignoring the mask biases the fit (the coupling flattens the spectrum) — why forward= exists
    naive = fit_p_map(spec, noise="none")
    assert abs(naive.p - 0.6) > 10 * abs(r.p - 0.6)


@pytest.mark.slow
def test_coupling_matrix_monte_carlo():
    """⟨pseudo-C_ℓ⟩ of masked Gaussian skies (healpy synfast + anafast) equals M C_ℓ."""
    nside, lmax = 16, 20
    mask = np.asarray(declination_band_mask(nside, -90.0, 20.0))
    ell = np.arange(0, 3 * nside)
    cl = np.where(ell >= 1, 1.0 / (ell + 1.0) ** 2, 0.0)
    M = mask_coupling_matrix(mask, lmax, lmax_in=3 * nside - 1)
    rng = np.random.seed(11)  # noqa: F841  (healpy.synfast draws from numpy's global state)
    sims = np.array(
        [
            hp.anafast(hp.synfast(cl, nside, lmax=3 * nside - 1) * mask, lmax=lmax, iter=0)
            for _ in range(300)
        ]
    )
    mean, err = sims.mean(0), sims.std(0) / np.sqrt(len(sims))
    pred = M @ cl
    pulls = (mean[1:] - pred[1:]) / err[1:]
    print(f"coupling MC: max |pull| {np.max(np.abs(pulls)):.2f} over ell 1..{lmax}")
    # 20 multipoles, MC error only (pixel window ignored on both sides): all within 4σ
    assert np.all(np.abs(pulls) < 4)
