"""Tests of crjax/field.py against things we did not write: numpy's cos/sin, the closed-form
spectrum weights, exact invariants (∇·B = 0, ξ̂ ⊥ κ̂, Σ A² = 2σ²B0²), sampling statistics with
N-based bounds, and finite differences (jax.test_util.check_grads)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import crjax.field as cf
from crjax.field import (
    BendOverSpectrum,
    FieldParams,
    KolmogorovSpectrum,
    TurbulentField,
    paper_2015_field,
    realise_field,
    uniform_field,
)

# Jitted once per module: the same (n_keys, params structure) reuses one compiled kernel.
_many = jax.jit(jax.vmap(realise_field, in_axes=(0, None)))

# Shared evaluation points: one compile of _call per field signature.
X5 = jnp.asarray(np.random.default_rng(7).uniform(-3.0, 3.0, (5, 3)))

EPS = {np.float64: np.finfo(np.float64).eps, np.float32: np.finfo(np.float32).eps}


@pytest.fixture(scope="module")
def field64(key):
    return realise_field(key, paper_2015_field())


@pytest.fixture(scope="module")
def ensemble64(key):
    """16 realisations of the seed field (vmapped over keys): 4096 modes for direction stats."""
    keys = jax.random.split(jax.random.fold_in(key, 1), 16)
    return _many(keys, paper_2015_field())


_TRACES = []


@jax.jit
def _call(f, x):
    _TRACES.append(1)  # runs only when jit traces (compiles) a new signature
    return f(x)


@pytest.fixture(scope="module")
def call_jit():
    return _call


# ---------------------------------------------------------------------------------------------
# fast cosine
# ---------------------------------------------------------------------------------------------
_PI_LD = np.longdouble("3.14159265358979323846264338327950288419716939937510")


def _cospi_sinpi_reference(u):
    """cos(πu), sin(πu) in long double (x86: 64-bit mantissa, 1e-19) — numpy's, not crjax's."""
    assert np.finfo(np.longdouble).eps < 1e-18, "needs an 80-bit long double (x86-64)"
    ul = np.asarray(u, np.float64).astype(np.longdouble)
    j = np.round(ul)  # exact reduction: cos(π(j + f)) = (−1)^j cos(πf) for integer j
    sign = 1 - 2 * (np.abs(j) % 2)
    f = ul - j
    return (sign * np.cos(_PI_LD * f)).astype(np.float64), (sign * np.sin(_PI_LD * f)).astype(
        np.float64
    )


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_cospi_sinpi_accuracy(dtype):
    rng = np.random.default_rng(3)
    u = np.concatenate(
        [
            rng.uniform(-3e4, 3e4, 200_000),  # |k·x|/π of the seed's runs: k ≤ 628, |x| ≲ 100
            rng.uniform(-1, 1, 20_000) * (2.0**50 if dtype == np.float64 else 2.0**21),  # limit
            np.linspace(-7.0, 7.0, 40_001),
            # just either side of multiples of 1/4 (where rounding of u and the parity switch)
            (np.arange(-4000, 4001) / 4)[:, None] + np.array([-1e-6, 0, 1e-6])[None],
        ],
        axis=None,
    ).astype(dtype)
    c = np.asarray(jax.jit(cf._fast_cospi)(jnp.asarray(u)), dtype=np.float64)
    s = np.asarray(jax.jit(cf._fast_sinpi)(jnp.asarray(u)), dtype=np.float64)
    rc, rs = _cospi_sinpi_reference(u)  # of the input value itself, exactly
    # Bound: 2 ulp of 1 per dtype (4.4e-16 fp64, 2.4e-7 fp32): the reduction is exact and the
    # polynomials measured ≤ 1.42 (fp64) and 1.51 (fp32) ulp (field.py); rounding leaves the rest.
    tol = 2 * EPS[dtype]
    assert np.max(np.abs(c - rc)) <= tol
    assert np.max(np.abs(s - rs)) <= tol


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_fast_cospi_derivatives(dtype):
    u = jnp.asarray(np.linspace(-100.0, 100.0, 1001), dtype)
    d1 = jax.jit(jax.vmap(jax.grad(cf._fast_cospi)))(u)
    d2 = jax.jit(jax.vmap(jax.grad(jax.grad(cf._fast_cospi))))(u)
    rc, rs = _cospi_sinpi_reference(np.asarray(u))
    # d/du cos(πu) = −π sin(πu), d²/du² = −π² cos(πu): the values' 2 ulp scaled by π (π²), plus
    # the rounding of the products with the dtype's π (≲ 2 ulp of results up to π, π²):
    # 4π (4π²) ulp of 1.
    eps = EPS[dtype]
    np.testing.assert_allclose(np.asarray(d1, np.float64), -np.pi * rs, rtol=0, atol=4 * np.pi * eps)
    np.testing.assert_allclose(
        np.asarray(d2, np.float64), -np.pi**2 * rc, rtol=0, atol=4 * np.pi**2 * eps
    )


# ---------------------------------------------------------------------------------------------
# construction: amplitudes, directions, spectrum
# ---------------------------------------------------------------------------------------------
def _reference_weights(k, Lc, gamma):
    g = k**3 / (1.0 + (k * Lc) ** gamma)
    return g / g.sum()


def test_amplitudes_match_formula(key):
    p = FieldParams(sigma2=0.7, Lc=2.0, lmin=0.05, lmax=300.0, b0=2.5, n_modes=256)
    f = realise_field(key, p)
    k_ref = np.geomspace(2 * np.pi / 300.0, 2 * np.pi / 0.05, 256)
    k = np.linalg.norm(np.asarray(f.wavevectors), axis=-1)
    a2 = np.sum(np.asarray(f.amplitudes) ** 2, axis=-1)
    # rtol 1e-12: a few ulp accumulated through exp/log/softmax of 256 terms (fp64).
    np.testing.assert_allclose(k, k_ref, rtol=1e-13)
    np.testing.assert_allclose(a2, 2 * 0.7 * 2.5**2 * _reference_weights(k_ref, 2.0, 11 / 3), 1e-12)
    np.testing.assert_allclose(a2.sum(), 2 * 0.7 * 2.5**2, rtol=1e-13)  # Σ A² = 2σ²B0²
    np.testing.assert_allclose(np.asarray(f.b0), [0, 0, 2.5], atol=1e-15)


def _slope(k, a2, lo, hi):
    """Least-squares slope of log(A_n²/Δk_n) vs log k for lo ≤ k ≤ hi (Δk from the grid itself)."""
    dk = np.gradient(k)
    sel = (k >= lo) & (k <= hi)
    return np.polyfit(np.log(k[sel]), np.log(a2[sel] / dk[sel]), 1)[0]


def test_realised_kolmogorov_slope(field64):
    k = np.linalg.norm(np.asarray(field64.wavevectors), axis=-1)
    a2 = np.sum(np.asarray(field64.amplitudes) ** 2, axis=-1)
    # The bend (kLc)^γ changes the local slope by ~γ (kLc)^−γ ≈ 1e-5 at k = 30: tolerance 1e-3.
    assert _slope(k, a2, 30.0, 700.0) == pytest.approx(-5 / 3, abs=1e-3)


def test_low_k_slope_and_bendover_slopes(key):
    # Wide k range so both asymptotes are clean: corrections ~(kL)^±2 ≲ 1e-4 in the fitted ranges,
    # which moves the slope by ≲ 1e-3; tolerance 5e-3 (np.gradient's Δk is exact for a log grid
    # up to a constant factor, which does not change the slope; the end points are one-sided).
    wide = dict(lmin=1e-3, lmax=1e4, n_modes=256)
    kolm = realise_field(key, FieldParams(**wide))
    bend = realise_field(key, FieldParams(spectrum=BendOverSpectrum(s=2.5, q=1.2), **wide))
    for f, lo_slope, hi_slope in ((kolm, 2.0, -5 / 3), (bend, 1.2, -2.5)):
        k = np.linalg.norm(np.asarray(f.wavevectors), axis=-1)
        a2 = np.sum(np.asarray(f.amplitudes) ** 2, axis=-1)
        assert _slope(k, a2, 1e-3, 2e-2) == pytest.approx(lo_slope, abs=5e-3)
        assert _slope(k, a2, 200.0, 7000.0) == pytest.approx(hi_slope, abs=5e-3)


def test_polarisation_unit_and_transverse(ensemble64):
    k, a = np.asarray(ensemble64.wavevectors), np.asarray(ensemble64.amplitudes)
    kappa = k / np.linalg.norm(k, axis=-1, keepdims=True)
    xi = a / np.linalg.norm(a, axis=-1, keepdims=True)
    # Exact by construction up to fp64 round-off of a few products: 1e-14.
    assert np.max(np.abs(np.sum(kappa * xi, axis=-1))) < 1e-14


def test_isotropy_of_directions(ensemble64):
    """κ̂ and ξ̂ over 16×256 modes: ⟨v⟩ = 0, ⟨v vᵀ⟩ = I/3 within 5 standard errors.

    For v uniform on the sphere Var(v_i) = 1/3, Var(v_i²) = 1/5 − 1/9 = 4/45,
    Var(v_i v_j) = 1/15 (i ≠ j). ξ̂ is uniform on the sphere too (uniform angle ⊥ uniform κ̂)."""
    for arr in (ensemble64.wavevectors, ensemble64.amplitudes):
        v = np.asarray(arr).reshape(-1, 3)
        v = v / np.linalg.norm(v, axis=-1, keepdims=True)
        n = v.shape[0]
        assert np.all(np.abs(v.mean(0)) < 5 * np.sqrt(1 / 3 / n))
        m = v.T @ v / n
        diag_tol, off_tol = 5 * np.sqrt(4 / 45 / n), 5 * np.sqrt(1 / 15 / n)
        assert np.all(np.abs(np.diag(m) - 1 / 3) < diag_tol)
        assert np.all(np.abs(m[~np.eye(3, dtype=bool)]) < off_tol)


def test_slab_geometry_rotated(key):
    d = np.array([1.0, 2.0, -0.5])
    b = d / np.linalg.norm(d)
    keys = jax.random.split(key, 4)
    p = FieldParams(geometry="slab", b0_direction=d, b0=1.5, n_modes=256)
    f = _many(keys, p)
    kappa = np.asarray(f.wavevectors).reshape(-1, 3)
    kappa = kappa / np.linalg.norm(kappa, axis=-1, keepdims=True)
    xi = np.asarray(f.amplitudes).reshape(-1, 3)
    xi = xi / np.linalg.norm(xi, axis=-1, keepdims=True)
    # Really slab: κ̂ × b̂0 = 0 and ξ̂ ⊥ b̂0 up to round-off (1e-15 ~ a few ulp).
    assert np.max(np.abs(np.cross(kappa, b))) < 1e-15
    assert np.max(np.abs(xi @ b)) < 1e-15
    # Both signs occur (random ±b̂0) and the polarisation angle is uniform: ⟨ξ̂ξ̂ᵀ⟩ = (I − b̂b̂ᵀ)/2.
    # ξ̂ = cos α ê1 + sin α ê2: entries of ξ̂ξ̂ᵀ have variance ≤ 1/8, n = 1024: 5σ = 0.055.
    assert 0.4 < np.mean(kappa @ b > 0) < 0.6  # binomial(1024, 1/2): 5σ = 0.078
    m = xi.T @ xi / xi.shape[0]
    assert np.max(np.abs(m - (np.eye(3) - np.outer(b, b)) / 2)) < 5 * np.sqrt(1 / 8 / xi.shape[0])
    np.testing.assert_allclose(np.asarray(f.b0[0]), 1.5 * b, atol=1e-15)


def test_vmap_over_keys_matches_loop(key, ensemble64):
    keys = jax.random.split(jax.random.fold_in(key, 1), 16)
    one = realise_field(keys[5], paper_2015_field())
    for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(ensemble64)):
        # vmapped RNG and maths are the same ops: equal to round-off (1e-15).
        np.testing.assert_allclose(np.asarray(a), np.asarray(b[5]), rtol=1e-13, atol=1e-15)


# ---------------------------------------------------------------------------------------------
# evaluation B(x)
# ---------------------------------------------------------------------------------------------
def test_divergence_free(field64, key):
    x = 3.0 * jax.random.normal(jax.random.fold_in(key, 2), (20, 3))
    div = jax.jit(jax.vmap(lambda y: jnp.trace(jax.jacfwd(field64)(y))))(x)
    # Each ∂B_i/∂x_i is a sum of terms A_n k_n ξ_i κ_i sin(·) that cancel exactly mode by mode;
    # round-off is ~ eps × Σ_n A_n k_n (fp64); allow 50 eps for the sums over 256 modes × 3.
    an = np.linalg.norm(field64.amplitudes, axis=-1)
    scale = np.sum(an * np.linalg.norm(field64.wavevectors, axis=-1))
    assert np.max(np.abs(div)) < 50 * EPS[np.float64] * scale


def test_fast_matches_exact_and_shapes(field64, call_jit, key):
    exact = TurbulentField(
        field64.b0, field64.wavevectors, field64.amplitudes, field64.phases, exact_cos=True
    )
    # the fast cosine is the default; realise_field(exact_cos=True) selects jnp.cos (abstractly)
    assert not field64.exact_cos
    abstract = jax.eval_shape(lambda k: realise_field(k, paper_2015_field(), exact_cos=True), key)
    assert abstract.exact_cos
    bf, be = call_jit(field64, X5), call_jit(exact, X5)
    assert bf.dtype == jnp.float64
    # Per mode: 2 eps from the polynomial, plus the argument's rounding: both paths round the
    # phase k·x + β (~ a few eps · |phase|), the fast one also its scaling by 1/π. Allow
    # (2 + 4|phase|) eps per mode, weighted by |A_n| (fp64).
    phase = np.abs(np.asarray(X5) @ np.asarray(field64.wavevectors).T) + np.abs(
        np.asarray(field64.phases)
    )
    an = np.linalg.norm(np.asarray(field64.amplitudes), axis=-1)
    tol = float(np.max((2 + 4 * phase) @ an)) * EPS[np.float64]
    assert float(jnp.max(jnp.abs(bf - be))) <= tol
    # blocked evaluation (5 positions in padded blocks of 2) is the same computation per position
    blocked = TurbulentField(
        field64.b0, field64.wavevectors, field64.amplitudes, field64.phases, block_size=2
    )
    np.testing.assert_allclose(call_jit(blocked, X5), bf, rtol=0, atol=1e-15)
    # any leading shape (..., 3) -> (..., 3); checked abstractly (no compile)
    for shape in [(3,), (2, 7, 3), (0, 3)]:
        out = jax.eval_shape(field64, jax.ShapeDtypeStruct(shape, jnp.float64))
        assert out.shape == shape and out.dtype == jnp.float64


def test_call_matches_numpy_mode_sum(field64, call_jit):
    """B(x) (prepared layout: kᵀ/π, β/π, amplitudes padded to 4 columns) against the mode sum
    b0 + Σ A_n cos(k_n·x + β_n) in numpy long double, and ``prepare()`` is the same map."""
    x = np.asarray(X5).astype(np.longdouble)
    k, beta = (np.asarray(a).astype(np.longdouble) for a in (field64.wavevectors, field64.phases))
    amp = np.asarray(field64.amplitudes).astype(np.longdouble)
    ref = np.asarray(field64.b0) + np.cos(x @ k.T + beta) @ amp
    # Per mode: the fast cosine's 2 eps plus the rounding of the phase (k·x + β, and its scaling
    # by 1/π) ~ 4|phase| eps, weighted by |A_n|; the sum of 256 terms adds ≲ 256 eps·max|A|.
    phase = np.abs(np.asarray(X5) @ np.asarray(field64.wavevectors).T) + np.abs(
        np.asarray(field64.phases)
    )
    an = np.linalg.norm(np.asarray(field64.amplitudes), axis=-1)
    tol = (float(np.max((2 + 4 * phase) @ an)) + 256 * float(an.max())) * EPS[np.float64]
    b = call_jit(field64, X5)
    assert float(np.max(np.abs(np.asarray(b, np.longdouble) - ref))) <= tol
    np.testing.assert_array_equal(jax.jit(lambda f, y: f.prepare()(y))(field64, X5), b)
    prepared = field64.prepare()
    assert prepared.amplitudes.shape == (field64.n_modes, 4)
    assert not np.any(np.asarray(prepared.amplitudes[:, 3]))


def test_spatial_mean_of_dB2(key):
    """⟨|δB|²⟩ over space = σ²B0² (⟨cos²⟩ = 1/2) and ⟨δB_i²⟩ = Σ A² ξ_i²/2 per realisation."""
    sigma2, b0 = 0.8, 1.3
    p = FieldParams(sigma2=sigma2, b0=b0)
    fields = _many(jax.random.split(jax.random.fold_in(key, 1), 16), p)
    # Points spread over 1e4 Lc ≫ λmax, so every mode's phase is uniform over the sample.
    x = jax.random.uniform(jax.random.fold_in(key, 4), (2048, 3), minval=-5e3, maxval=5e3)
    db = jax.jit(jax.vmap(lambda f, y: f(y) - f.b0[None, :], in_axes=(0, None)))(fields, x)
    db2 = np.asarray(jnp.sum(db**2, -1)).ravel()
    # Sampling error only: 5 standard errors of the sample mean.
    assert abs(db2.mean() - sigma2 * b0**2) < 5 * db2.std() / np.sqrt(db2.size)
    comp = np.asarray(db**2)  # (realisation, point, component)
    a2 = np.sum(np.asarray(fields.amplitudes) ** 2, axis=-1)  # (realisation, mode)
    xi2 = np.asarray(fields.amplitudes) ** 2 / a2[..., None]
    exact = 0.5 * np.sum(a2[..., None] * xi2, axis=1)  # (realisation, component)
    err = comp.std(axis=1) / np.sqrt(comp.shape[1])
    assert np.all(np.abs(comp.mean(axis=1) - exact) < 5 * err)
    # Those per-realisation values scatter around σ²B0²/3 (the seed's "±5%" physics): ξ_i² has
    # variance 4/45 on the sphere, so Var(exact_i) = (4/45) Σ_n (A_n²/2)²; 5σ of the mean of 16.
    sd = np.sqrt(4 / 45 * np.sum((a2 / 2) ** 2, axis=1).mean() / a2.shape[0])
    assert np.all(np.abs(exact.mean(0) - sigma2 * b0**2 / 3) < 5 * sd)


def test_uniform_field_and_rotation(call_jit):
    f = uniform_field(2.0, direction=(0.0, 3.0, 4.0))
    expected = np.broadcast_to([0.0, 1.2, 1.6], (5, 3))
    np.testing.assert_allclose(call_jit(f, 10 * X5), expected, atol=1e-15)
    f32 = uniform_field(dtype=jnp.float32)
    assert jax.eval_shape(f32, jax.ShapeDtypeStruct((5, 3), jnp.float32)).dtype == jnp.float32


def test_float32_option(key, call_jit):
    f32 = realise_field(key, paper_2015_field(), dtype=jnp.float32)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(f32))
    x = X5.astype(jnp.float32)
    b32 = call_jit(f32, x)
    assert b32.dtype == jnp.float32
    # Same float32 modes evaluated in fp64: differences come from fp32 rounding of the phase
    # (≈ eps32 (|k||x| + |β|) per mode) and of cos and the sums; bound 4 eps32 Σ|A|(|k||x|+|β|+1).
    f64 = jax.tree.map(lambda a: a.astype(jnp.float64), f32)
    b64 = call_jit(f64, X5)
    an = np.linalg.norm(np.asarray(f64.amplitudes), axis=-1)
    kn = np.linalg.norm(np.asarray(f64.wavevectors), axis=-1)
    xmax = float(jnp.max(jnp.linalg.norm(X5, axis=-1)))
    tol = 4 * EPS[np.float32] * np.sum(an * (kn * xmax + np.asarray(f64.phases) + 1))
    assert float(jnp.max(jnp.abs(b32 - b64))) < tol


def test_no_recompile_for_new_realisation(key, call_jit):
    call_jit(realise_field(key, paper_2015_field()), X5)
    before = len(_TRACES)
    for i in range(3):  # new realisations and new float parameters, same shapes: no retrace
        p = FieldParams(sigma2=0.5 + i, Lc=1.0 + i)
        call_jit(realise_field(jax.random.fold_in(key, i), p), X5 + i)
    assert len(_TRACES) == before


# ---------------------------------------------------------------------------------------------
# gradients
# ---------------------------------------------------------------------------------------------
def test_check_grads_params(key):
    """d/d(σ², b0_direction, Lc, γ) of isotropic and slab fields at fixed points, and d/d(s, q) of
    the bend-over weights (s, q enter B only through them, by the same softmax path as γ), against
    central finite differences. One compiled observable: check_grads compiles it ~5 times."""
    x = jnp.asarray(np.random.default_rng(2).normal(size=(8, 3)))
    w = jnp.asarray([0.3, -0.7, 0.5])
    k = jnp.geomspace(0.05, 600.0, 16)
    c = jnp.linspace(0.0, 1.0, 16)

    def obs(sigma2, d, lc, gamma, s, q):
        common = dict(sigma2=sigma2, Lc=lc, b0_direction=d, n_modes=16)
        common["spectrum"] = KolmogorovSpectrum(gamma=gamma)
        iso = realise_field(key, FieldParams(geometry="isotropic", **common))
        slab = realise_field(key, FieldParams(geometry="slab", **common))
        bend = jax.nn.softmax(BendOverSpectrum(s=s, q=q).log_weights(k, lc))
        return jnp.mean(iso(x) @ w) + 0.7 * jnp.mean(slab(x) @ w) + jnp.sum(c * bend)

    args = tuple(jnp.asarray(a) for a in (0.9, [0.3, 0.5, 1.0], 1.2, 11 / 3, 5 / 3, 2.0))
    # Central finite differences in fp64 with eps = 1e-6: phases k·x reach k ≈ 600, so third
    # derivatives are ~600³ and check_grads' default eps = 1e-4 would leave a truncation error
    # ~eps²·600³ ~ 1e-3 relative; at 1e-6 it is ~1e-7 and round-off ~1e-16/1e-6 = 1e-10, both
    # below check_grads' fp64 tolerance (~1e-5 relative).
    check_grads(jax.jit(obs), args, order=1, modes=("fwd", "rev"), eps=1e-6)


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(sigma2=0.0), "sigma2"),
        (dict(sigma2=-1.0), "sigma2"),
        (dict(Lc=0.0), "Lc"),
        (dict(b0=-2.0), "b0"),
        (dict(lmin=0.0), "lmin"),
        (dict(lmin=-1.0), "lmin"),
        (dict(lmin=5.0, lmax=5.0), "lmin"),
        (dict(lmin=10.0, lmax=1.0), "lmin"),
        (dict(n_modes=0), "n_modes"),
        (dict(n_modes=2.5), "n_modes"),
        (dict(b0_direction=(0.0, 0.0, 0.0)), "b0_direction"),
        (dict(b0_direction=(1.0, 0.0)), "b0_direction"),
        (dict(geometry="helical"), "geometry"),
        (dict(amplitude_law="rayleigh"), "amplitude_law"),
        (dict(sigma2=float("nan")), "sigma2"),
    ],
)
def test_bad_params_raise(kwargs, name):
    with pytest.raises(ValueError, match=name):
        FieldParams(**kwargs)


def test_bad_spectrum_and_dtype_raise(key):
    with pytest.raises(ValueError, match="gamma"):
        KolmogorovSpectrum(gamma=0.0)
    with pytest.raises(ValueError, match="s must"):
        BendOverSpectrum(s=-1.0, q=2.0)
    with pytest.raises(ValueError, match="dtype"):
        realise_field(key, FieldParams(n_modes=4), dtype=jnp.int32)
    with pytest.raises(ValueError, match="direction"):
        uniform_field(1.0, direction=(0.0, 0.0, 0.0))
    with pytest.raises(ValueError, match="b0"):
        uniform_field(0.0)
    with pytest.raises(ValueError, match="block_size"):
        TurbulentField(jnp.zeros(3), jnp.zeros((0, 3)), jnp.zeros((0, 3)), jnp.zeros(0), block_size=0)
    with pytest.raises(ValueError, match="x must"):
        uniform_field()(jnp.zeros((4, 2)))


# ---------------------------------------------------------------------------------------------
# slow validations
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_fft_line_spectrum_slope(key):
    """Independent check of the realised spectrum (the bug CRPropa found by an FFT check): sample
    B along straight lines, take periodograms and fit the 1-D spectrum's inertial-range slope.

    For isotropic modes a mode (k, μ = κ̂·ê) appears on a line along ê at wavenumber k|μ|; with
    E(k) ∝ k^(−5/3) the 1-D spectrum is ∝ ∫_k E(k')/k' dk' ∝ k^(−5/3)·(1 − (k/kmax)^(5/3)), so
    over 5 ≤ k ≤ 50 (kmax = 628, bend at k ~ 1) the slope is −5/3 steepened by ≲ 0.03 (the
    cutoff term; the transverse/longitudinal weights change only prefactors). Statistical error:
    single-realisation slopes scatter by 0.076 (measured), so 0.013 for the mean of 32.
    Tolerance 0.08 = 0.03 systematic + 4 standard errors. Measured: −1.674."""
    n_real, n_pts, dx = 32, 2**16, 0.004  # Nyquist π/dx = 785 > kmax = 628: no aliasing
    fields = _many(jax.random.split(jax.random.fold_in(key, 9), n_real), paper_2015_field())
    s = jnp.arange(n_pts) * dx
    lines = jnp.eye(3)  # three orthogonal line directions
    pts = (s[None, :, None] * lines[:, None, :]).reshape(-1, 3)  # (3 * n_pts, 3)

    @jax.jit
    def periodogram(f):
        b = (f(pts) - f.b0[None, :]).reshape(3, n_pts, 3)
        win = jnp.hanning(n_pts)  # tames leakage from the strong k ~ 1 modes
        spec = jnp.abs(jnp.fft.rfft(b * win[None, :, None], axis=1)) ** 2
        return jnp.sum(spec, axis=(0, 2))

    power = np.mean(np.asarray(jax.lax.map(periodogram, fields)), axis=0)
    k = 2 * np.pi * np.fft.rfftfreq(n_pts, dx)
    edges = np.geomspace(5.0, 50.0, 16)
    idx = np.digitize(k, edges)
    kc = np.array([np.exp(np.mean(np.log(k[idx == i]))) for i in range(1, len(edges))])
    pc = np.array([np.mean(power[idx == i]) for i in range(1, len(edges))])
    slope = np.polyfit(np.log(kc), np.log(pc), 1)[0]
    print(f"FFT 1-D spectrum slope over 5 <= k <= 50: {slope:.4f} (expected -5/3 - [0, 0.03])")
    assert slope == pytest.approx(-5 / 3, abs=0.08)


@pytest.mark.slow
def test_realisation_scatter_of_component_variance(key):
    """physics.md §2: one 256-mode realisation's component variances scatter by several percent.
    Over 120 realisations (the seed's number) the measured relative rms of ⟨δB_z²⟩/(σ²B0²/3) must
    match the prediction 3·sqrt((4/45) Σ (A_n²/2)²)/σ², within its own sampling error (~7% of
    itself for 120 samples; 4σ → 30%), and the ensemble mean must be 1/3 to 5 standard errors."""
    fields = jax.jit(jax.vmap(realise_field, in_axes=(0, None)))(
        jax.random.split(jax.random.fold_in(key, 11), 120), paper_2015_field()
    )
    a = np.asarray(fields.amplitudes)
    var = 0.5 * np.sum(a**2, axis=1)  # (120, 3): exact spatial means of δB_i² per realisation
    rel = var / (1.0 / 3.0)
    predicted = 3 * np.sqrt(4 / 45 * np.sum((np.sum(a[0] ** 2, -1) / 2) ** 2))
    measured = rel.std(axis=0, ddof=1)
    print(f"relative rms of component variance: measured {measured}, predicted {predicted:.4f}")
    np.testing.assert_allclose(measured, predicted, rtol=0.3)
    assert np.all(np.abs(rel.mean(0) - 1) < 5 * measured / np.sqrt(120))
