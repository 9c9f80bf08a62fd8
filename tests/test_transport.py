"""Running diffusion tensor, K_∥/K_⊥, errors; the seed-parameter anchors (slow).

References we did not write: Gaussian moments (Isserlis: Var(r_i r_j) = C_ii C_jj + C_ij²),
rotation invariance, physics.md §7 bands and relations.
"""

import numpy as np
import pytest

import crjax
from crjax.field import FieldParams
from crjax.transport import (
    diffusion_tensor,
    diffusion_tensor_from_moments,
    mean_free_path,
    parallel_perpendicular,
    second_moments,
)

C = np.array([[2.0, 0.3, 0.1], [0.3, 1.0, -0.2], [0.1, -0.2, 0.5]])  # a known SPD "K"
TIMES = np.array([0.5, 2.0])


def _gaussian_positions(seed, shape):
    """r ~ N(0, 2T·C) for each time: then K = ⟨r r^T⟩/(2T) = C exactly in expectation."""
    z = np.random.default_rng(seed).normal(size=shape + (3,))
    L = np.linalg.cholesky(C)
    scale = np.sqrt(2 * TIMES)[:, None, None]
    return (z @ L.T) * scale


def _isserlis_sd():
    """Standard deviation of r_i r_j/(2T) for Gaussian r with covariance 2T·C."""
    return np.sqrt(np.outer(np.diag(C), np.diag(C)) + C**2)


def test_diffusion_tensor_over_realisations():
    nreal, npix = 400, 64
    r = _gaussian_positions(1, (nreal, len(TIMES), npix))
    K, err = (np.asarray(x) for x in diffusion_tensor(r, TIMES))
    assert K.shape == (2, 3, 3) and err.shape == (2, 3, 3)
    expected_err = _isserlis_sd() / np.sqrt(nreal * npix)
    # Standard error of the mean over independent realisations: matches Isserlis within the
    # sampling error of a standard deviation from 400 samples (~1/√800 ≈ 3.5%; allow 20%).
    np.testing.assert_allclose(err, np.broadcast_to(expected_err, err.shape), rtol=0.2)
    # K agrees with C within 4 standard errors for every element and time.
    assert np.all(np.abs(K - C) < 4 * err)
    # the same through the reducer path
    K2, err2 = diffusion_tensor_from_moments(second_moments(r), TIMES)
    np.testing.assert_allclose(K2, K, rtol=1e-12)
    np.testing.assert_allclose(err2, err, rtol=1e-10)
    # extra leading axes are realisations too
    K3, _ = diffusion_tensor(r.reshape((20, 20) + r.shape[1:]), TIMES)
    np.testing.assert_allclose(K3, K, rtol=1e-12)


def test_diffusion_tensor_single_realisation_error_over_directions():
    npix = 4000
    r = _gaussian_positions(2, (len(TIMES), npix))
    K, err = (np.asarray(x) for x in diffusion_tensor(r, TIMES))
    # directions independent here, so the direction standard error is the true one
    np.testing.assert_allclose(
        err, np.broadcast_to(_isserlis_sd() / np.sqrt(npix), err.shape), rtol=0.1
    )
    assert np.all(np.abs(K - C) < 4 * err)


def test_parallel_perpendicular():
    K = np.diag([1.0, 3.0, 7.0])
    kp, kq = parallel_perpendicular(K, [0, 0, 2.0])  # direction normalised internally
    assert np.isclose(kp, 7.0) and np.isclose(kq, 2.0)
    # invariance under a rotation R applied to both K and b̂
    R = np.linalg.qr(np.random.default_rng(0).normal(size=(3, 3)))[0]
    b = np.array([0.3, -0.4, 0.5])
    kp1, kq1 = parallel_perpendicular(C, b)
    kp2, kq2 = parallel_perpendicular(R @ C @ R.T, R @ b)
    np.testing.assert_allclose([kp1, kq1], [kp2, kq2], rtol=1e-13)
    # batched over leading axes
    kp, kq = parallel_perpendicular(np.broadcast_to(C, (4, 2, 3, 3)), b)
    assert kp.shape == (4, 2) and kq.shape == (4, 2)
    assert np.isclose(mean_free_path(1.0), 3.0)


def test_bad_input():
    with pytest.raises(ValueError, match="positions"):
        diffusion_tensor(np.zeros((5, 3)), TIMES)
    with pytest.raises(ValueError, match="times"):
        diffusion_tensor(np.zeros((3, 5, 3)), TIMES)
    with pytest.raises(ValueError, match="times"):
        diffusion_tensor(np.zeros((2, 5, 3)), np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="moments"):
        diffusion_tensor_from_moments(np.zeros((2, 3, 3)), TIMES)
    with pytest.raises(ValueError, match="b0_direction"):
        parallel_perpendicular(C, [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="b0_direction"):
        parallel_perpendicular(C, [0.0, 1.0])
    with pytest.raises(ValueError, match="K"):
        parallel_perpendicular(np.zeros((3, 2)), [0.0, 0.0, 1.0])


@pytest.mark.slow
def test_seed_parameters_diffusion(key):
    """σ² = 1, rL = 0.1 Lc, λ 0.01–100 Lc (seed §3): K_∥, K_⊥ at tΩ = 200 over 16 realisations.

    Anchors (physics.md §7): λ_∥ = 3K_∥ in 0.5–5 Lc, K_⊥/K_∥ ≪ 1 (< 0.2), and the classical
    scattering relation K_⊥ ≈ K_∥/(1 + (λ_∥/rL)²) only as an order-of-magnitude check: measured
    here K_⊥ ≈ 15× the classical value at tΩ = 200 (K_∥ still rising, K_⊥ still falling: not yet
    asymptotic; field-line wandering in σ² = 1 turbulence adds to K_⊥), so we require K_⊥ within
    a factor 30 of it and K_⊥ ≪ K_∥ as the relation implies for λ_∥ ≫ rL.
    """
    from crjax.backtrack import run_ensemble

    rL = 0.1
    t_omega = np.array([50.0, 100.0, 200.0])
    times = t_omega * rL
    dirs = crjax.healpix_directions(4)
    moments = np.asarray(
        run_ensemble(
            FieldParams(),
            key,
            16,
            dirs,
            times,
            rL=rL,
            chunk_size=4,
            reducer=lambda tr: second_moments(tr.positions),
        )
    )
    K, err = diffusion_tensor_from_moments(moments, times)
    kp, kq = (np.asarray(x) for x in parallel_perpendicular(K, [0, 0, 1]))
    per_real = [
        np.asarray(x)
        for x in parallel_perpendicular(moments / (2 * times[:, None, None]), [0, 0, 1])
    ]
    kp_err, kq_err = (x.std(0, ddof=1) / np.sqrt(x.shape[0]) for x in per_real)
    lam = 3 * kp[-1]
    classical = kp[-1] / (1 + (lam / rL) ** 2)
    print(f"tΩ={t_omega}: K_par={kp} ± {kp_err}, K_perp={kq} ± {kq_err}")
    print(
        f"λ_par = {lam:.3f} Lc, K_perp/K_par = {kq[-1] / kp[-1]:.4f}, "
        f"classical K_perp = {classical:.2e} (ratio {kq[-1] / classical:.2f})"
    )
    assert 0.5 < lam < 5.0
    assert kq[-1] / kp[-1] < 0.2
    assert 1 / 30 < kq[-1] / classical < 30
    assert np.all(np.isfinite(err))
