"""Tests of crjax.spectra (maps, C_ℓ, cross spectra, masks) against things we did not write:
healpy.anafast (auto and cross), the pair-sum definition of (2.2) with scipy Legendre polynomials,
the HEALPix quadrature numbers of physics.md §4, finite differences (check_grads) and the engine's
σ = 0 helix."""

import healpy as hp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads
from scipy.special import eval_legendre

from crjax import _sht, healpix_directions
from crjax.spectra import (
    cross_power_spectra,
    declination_band_mask,
    power_spectrum,
    relative_intensity,
    sky_fraction,
)

# fp64 round-off: a_lm are sums of Npix terms of O(1); healpy and crjax sum in different orders,
# measured disagreement ~1e-14 relative. 1e-10 (the bound) leaves 4 orders of margin.
RTOL64 = 1e-10

def _rng(*seed):
    # numpy data generation: jax.random would compile threefry kernels per shape (seconds each)
    return np.random.default_rng((20151102,) + seed)


def _anafast(m, lmax=None):
    return hp.anafast(np.asarray(m, dtype=np.float64), iter=0, lmax=lmax)


# ------------------------------------------------------------------------------------------------
# power spectrum vs healpy and the definition


# the dense backend's table is O(Npix lmax^2): cross-checked at small nside only
@pytest.mark.parametrize(
    "nside,method", [(1, "ring"), (2, "ring"), (4, "ring"), (8, "ring"), (1, "dense"), (4, "dense")]
)
def test_power_spectrum_equals_anafast(nside, method):
    m = _rng(nside).normal(size=12 * nside**2)
    cl = power_spectrum(m, method=method)
    assert cl.shape == (3 * nside,) and cl.dtype == jnp.float64
    np.testing.assert_allclose(cl, _anafast(m), rtol=RTOL64, atol=0)


def test_power_spectrum_batched_equals_looped_and_large_lmax():
    nside = 4
    maps = _rng(1).normal(size=(2, 3, 12 * nside**2))
    cl = power_spectrum(maps)
    assert cl.shape == (2, 3, 3 * nside)
    looped = np.array([[_anafast(m) for m in row] for row in np.asarray(maps)])
    np.testing.assert_allclose(cl, looped, rtol=RTOL64, atol=0)
    # lmax above 3 nside - 1: the ring backend is still the exact pixel transform (aliased, as
    # in anafast, which healpy also allows).
    big = 4 * nside + 2
    for lmax in (big, 2):
        ref = _anafast(maps[0, 0], lmax)
        np.testing.assert_allclose(power_spectrum(maps[0, 0], lmax=lmax), ref, rtol=RTOL64)


@pytest.mark.parametrize("nside", [1, 2])
def test_power_spectrum_equals_pair_sum_definition(nside):
    # (2.2) on equal-area pixels via the addition theorem:
    # C_l = (4pi/Npix^2) sum_ij m_i m_j P_l(p_i.p_j)
    npix = 12 * nside**2
    m = _rng(7, nside).normal(size=npix)
    p = np.asarray(healpix_directions(nside))
    x = np.clip(p @ p.T, -1.0, 1.0)
    lmax = 3 * nside - 1
    ref = [4 * np.pi / npix**2 * m @ eval_legendre(ell, x) @ m for ell in range(lmax + 1)]
    np.testing.assert_allclose(power_spectrum(m), ref, rtol=RTOL64, atol=1e-15 * np.max(ref))


def test_float32_maps():
    nside = 8
    m = jnp.asarray(_rng(2).normal(size=(2, 12 * nside**2)), dtype=jnp.float32)
    cl = power_spectrum(m)
    assert cl.dtype == jnp.float32
    ref = np.array([_anafast(x) for x in np.asarray(m)])
    # fp32: eps = 6e-8; each a_lm sums ~Npix=768 terms (error ~ eps sqrt(Npix) |a| ~ 2e-6 relative)
    # and white-noise C_l are all O(4pi/Npix), so 1e-4 of the spectrum's scale is a 50x margin.
    np.testing.assert_allclose(cl, ref, rtol=0, atol=1e-4 * ref.max())


def test_power_spectrum_jit_no_recompile():
    nside = 2
    # first use of a (nside, lmax) table inside a trace must not cache a tracer (leak)
    fresh = jnp.asarray(_rng(10).normal(size=12 * nside**2))
    under_jit = jax.jit(lambda m: power_spectrum(m, lmax=4))(fresh)
    np.testing.assert_allclose(power_spectrum(fresh, lmax=4), under_jit, rtol=1e-13)
    f = jax.jit(lambda m: power_spectrum(m))
    m = jnp.asarray(_rng(3).normal(size=(3, 12 * nside**2)))
    np.testing.assert_allclose(f(m), power_spectrum(m), rtol=1e-13)
    before = _sht._ring_cross_cl._cache_size()
    power_spectrum(m + 1.0)
    power_spectrum(m * 2.0)
    assert _sht._ring_cross_cl._cache_size() == before  # same shapes/dtype: no retrace


def test_power_spectrum_gradients():
    nside = 2
    m = jnp.asarray(_rng(4).normal(size=12 * nside**2))
    w = jnp.linspace(0.5, 1.5, 3 * nside)
    # Finite differences are an independent reference; fp64 central differences of a quadratic
    # function are exact up to round-off, check_grads' default tolerances apply.
    check_grads(lambda x: power_spectrum(x) @ w, (m,), order=1, modes=["fwd", "rev"])
    mask = jnp.linspace(0.0, 1.0, 12 * nside**2)
    check_grads(lambda k: power_spectrum(m, mask=k) @ w, (mask,), order=1, modes=["fwd", "rev"])


# ------------------------------------------------------------------------------------------------
# masks


def test_mask_equals_anafast_of_masked_map():
    nside = 4
    m = _rng(5).normal(size=(2, 12 * nside**2))
    mask = declination_band_mask(nside, -90.0, 20.0)
    cl = power_spectrum(m, mask=mask)
    ref = np.array([_anafast(x * np.asarray(mask)) for x in np.asarray(m)])
    np.testing.assert_allclose(cl, ref, rtol=RTOL64)


def test_declination_band_mask_uses_arrival_direction():
    nside = 8
    p = np.asarray(healpix_directions(nside))
    north = np.asarray(declination_band_mask(nside, 30.0, 90.0))
    # arrival direction = -p: pixels whose momentum points to -z arrive from the north pole
    assert north[np.argmin(p[:, 2])] == 1.0 and north[np.argmax(p[:, 2])] == 0.0
    np.testing.assert_array_equal(north, (-p[:, 2] >= np.sin(np.radians(30.0))).astype(float))
    # sky fraction of a band = (sin dec_max - sin dec_min)/2 up to pixelisation (~1/(2 nside) rings)
    band = declination_band_mask(nside, -90.0, 70.0, pole=(0.0, 0.0, 2.0))
    assert abs(float(sky_fraction(band)) - (np.sin(np.radians(70)) + 1) / 2) < 0.02
    # another pole: the band follows it
    xband = np.asarray(declination_band_mask(nside, 30.0, 90.0, pole=(1.0, 0.0, 0.0)))
    np.testing.assert_array_equal(xband, (-p[:, 0] >= np.sin(np.radians(30.0))).astype(float))


# ------------------------------------------------------------------------------------------------
# bad input


def test_bad_input_raises():
    with pytest.raises(ValueError, match="maps.*12\\*nside\\*\\*2"):
        power_spectrum(jnp.ones(50))
    with pytest.raises(ValueError, match="maps contains 1 non-finite"):
        power_spectrum(jnp.ones(48).at[3].set(jnp.nan))
    with pytest.raises(ValueError, match="mask must have shape"):
        power_spectrum(jnp.ones(48), mask=jnp.ones(12))
    with pytest.raises(ValueError, match="mask contains"):
        power_spectrum(jnp.ones(48), mask=jnp.ones(48).at[0].set(jnp.inf))
    with pytest.raises(ValueError, match="lmax must be an integer >= 0"):
        power_spectrum(jnp.ones(48), lmax=-1)
    with pytest.raises(ValueError, match="method"):
        power_spectrum(jnp.ones(48), method="s2fft")
    with pytest.raises(ValueError, match="dec_min"):
        declination_band_mask(2, -100.0, 0.0)
    with pytest.raises(ValueError, match="dec_min must be < dec_max"):
        declination_band_mask(2, 10.0, 0.0)
    with pytest.raises(ValueError, match="g must be a 3-vector"):
        relative_intensity(jnp.ones((48, 3)), jnp.ones(2))
    with pytest.raises(ValueError, match="positions"):
        relative_intensity(jnp.ones((50, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match="together"):
        relative_intensity(jnp.ones((48, 3)), jnp.ones(3), K=jnp.eye(3))
    with pytest.raises(ValueError, match="mask is zero at every pixel"):
        power_spectrum(jnp.ones(48), mask=jnp.zeros(48))
    with pytest.raises(ValueError, match="contains no pixel centre"):
        declination_band_mask(1, 89.0, 90.0)  # nside-1 pixel centres reach dec 41.8 deg at most
    with pytest.raises(ValueError, match="mask is zero at every pixel"):
        sky_fraction(jnp.zeros(48))
    with pytest.raises(ValueError, match="positions must have shape"):
        cross_power_spectra(jnp.ones((48, 2)))
    with pytest.raises(ValueError, match="positions contains"):
        cross_power_spectra(jnp.ones((48, 3)).at[0, 1].set(jnp.nan))
    with pytest.raises(ValueError, match="mask is zero"):
        cross_power_spectra(jnp.ones((48, 3)), mask=jnp.zeros(48))


# ------------------------------------------------------------------------------------------------
# relative intensity


def test_relative_intensity_formula():
    rng = _rng(6)
    r = rng.normal(size=(2, 3, 48, 3))  # (nreal, ntimes, npix, 3)
    v = rng.normal(size=(2, 3, 48, 3))
    K = rng.normal(size=(3, 3, 3))  # (ntimes, 3, 3)
    g = jnp.array([0.3, -0.2, 1.0])
    # fp64 round-off of 3-term dot products of O(1) numbers: absolute ~1e-16, 1e-13 is a 100x margin
    np.testing.assert_allclose(relative_intensity(r, g), np.einsum("...i,i->...", r, g), atol=1e-13)
    ref = np.einsum("...i,i->...", r, g) - 3 * np.einsum("atpi,tij,j->atp", v, K, g)
    np.testing.assert_allclose(relative_intensity(r, g, velocities=v, K=K), ref, atol=1e-13)


# ------------------------------------------------------------------------------------------------
# through the engine (crjax.field, crjax.backtrack)


def test_sigma0_dipole_from_engine():
    from crjax import backtrack, uniform_field

    # sigma = 0, g || B0: r_z(-T) = -T p_z exactly (Boris leaves v_z untouched), so
    # dI = -|g| T cos(theta) at the pixel centres (physics.md §4, §7).
    nside, T, rL, gz = 8, 0.5, 0.1, 2.0  # tOmega = 5: 100 Boris steps keep the test fast
    tr = backtrack(uniform_field(), nside, jnp.array([T]), rL=rL)
    p = healpix_directions(nside)
    m = relative_intensity(tr.positions[0], jnp.array([0.0, 0.0, gz]))
    # round-off: T/dt = 100 additions of O(dt) steps, ~100 eps |g| T ~ 2e-14
    np.testing.assert_allclose(m, -gz * T * p[:, 2], rtol=0, atol=1e-12)
    cl = np.asarray(power_spectrum(m))
    c1 = 4 * np.pi / 9 * (gz * T) ** 2
    # HEALPix quadrature error of the dipole, physics.md: 2.9e-3 relative at nside 8
    assert abs(abs(cl[1] / c1 - 1) - 2.9e-3) < 1e-4
    assert np.max(cl[2:]) / cl[1] < 1e-4
    assert cl[0] / cl[1] < 1e-20  # a pure dipole has no monopole (symmetric grid): round-off only


def _engine_spectrum(adjoint):
    from crjax import FieldParams, backtrack, realise_field

    w = jnp.array([1.0, 2.0, 0.5])
    g = jnp.array([0.2, 0.0, 1.0])

    def f(sigma2):
        field = realise_field(jax.random.PRNGKey(3), FieldParams(sigma2=sigma2, n_modes=8))
        tr = backtrack(field, 1, jnp.array([0.3]), rL=0.1, adjoint=adjoint)  # tOmega = 3
        return power_spectrum(relative_intensity(tr.positions[0], g)) @ w

    return f


@pytest.mark.slow
def test_gradient_through_engine_wrt_sigma2():
    import diffrax

    # Short T (tOmega = 3): the pathwise derivative is smooth, finite differences are a valid
    # reference (physics.md §8). Reverse mode (checkpointed) and forward mode must agree with them.
    check_grads(_engine_spectrum(None), (0.8,), order=1, modes=["rev"])
    check_grads(_engine_spectrum(diffrax.ForwardMode()), (0.8,), order=1, modes=["fwd"])




# ------------------------------------------------------------------------------------------------
# tensor spectra: C_l(g) = g_a g_b C_l^{ab}


@pytest.mark.parametrize("method", ["ring", "dense"])
def test_cross_power_spectra_equal_anafast_cross(method):
    nside = 4
    r = _rng(21).normal(size=(2, 12 * nside**2, 3)) + np.array([0.5, -1.0, 2.0])
    mask = np.asarray(declination_band_mask(nside, -60.0, 40.0))
    for mk in (None, mask):
        c = np.asarray(cross_power_spectra(r, mask=mk, method=method))
        assert c.shape == (2, 3, 3, 3 * nside)
        w = 1.0 if mk is None else mk
        for k in range(2):
            for a in range(3):
                for b in range(3):
                    ref = hp.anafast(r[k, :, a] * w, map2=r[k, :, b] * w, iter=0)
                    np.testing.assert_allclose(c[k, a, b], ref, rtol=RTOL64, atol=1e-13 * ref.max())


def test_tensor_contraction_equals_direct_maps():
    nside = 4
    r = jnp.asarray(_rng(22).normal(size=(3, 2, 12 * nside**2, 3)))  # (nreal, ntimes, npix, 3)
    c = cross_power_spectra(r)  # (3, 2, 3, 3, L)
    for seed in range(5):
        g = jnp.asarray(_rng(23, seed).normal(size=3))
        direct = power_spectrum(relative_intensity(r, g))
        # same sums in a different order: fp64 round-off, ~1e-15 relative (1e-12: 1000x margin)
        np.testing.assert_allclose(jnp.einsum("a,b,...abl->...l", g, g, c), direct, rtol=1e-12)


def test_angle_derivative_from_tensor_equals_grad_of_direct_path():
    # Positions of a short engine run (nside 2, tOmega = 3); g(theta) = |g|(sin, 0, cos) at angle
    # theta to B0 = z. The tensor gives dC_l/dtheta = 2 g'(theta)_a g(theta)_b C^{ab}_l written by
    # hand; the reference is jax.grad through relative_intensity and power_spectrum.
    from crjax import FieldParams, backtrack, realise_field

    field = realise_field(jax.random.PRNGKey(5), FieldParams(n_modes=8))
    r = backtrack(field, 2, jnp.array([0.3]), rL=0.1).positions[0]
    w = jnp.linspace(0.5, 2.0, 6)
    c = cross_power_spectra(r)

    def direct(theta):
        g = 0.7 * jnp.array([jnp.sin(theta), 0.0, jnp.cos(theta)])
        return power_spectrum(relative_intensity(r, g)) @ w

    for theta in (0.3, 1.1, 2.5):
        g = 0.7 * np.array([np.sin(theta), 0.0, np.cos(theta)])
        dg = 0.7 * np.array([np.cos(theta), 0.0, -np.sin(theta)])
        tensor = 2.0 * np.einsum("a,b,abl,l->", dg, g, np.asarray(c), np.asarray(w))
        # both exact in fp64: round-off of sums over 48 pixels and 6 multipoles, ~1e-14 relative
        np.testing.assert_allclose(jax.grad(direct)(theta), tensor, rtol=1e-10)
