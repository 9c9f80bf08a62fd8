"""The direction of B0 on the sky from ONE map's low multipoles, given ∇n (issue 13, item 3).

One sky is one realisation of the turbulence. Its map δI(p̂) = r(−T; p̂)·g (seed (2.1), g = ∇n/n
known) carries the regular field's direction b̂ in two ways: the mean map, the standard-diffusion
dipole −3K·g with K = K_⊥ 1 + (K_∥ − K_⊥) b̂b̂ (+ an antisymmetric Hall part K_A ε·b̂), and the
anisotropic *fluctuations* of the low multipoles (relative diffusion, seed §2, is aligned with B0).
Neither is deterministic: the low-ℓ coefficients scatter between realisations of the same
parameters (cosmic variance), which bounds every estimator of b̂.

**Rotation covariance (the model).** The turbulence is isotropic, so the ensemble with B0 along
b̂ = R ẑ is the ensemble with B0 ∥ ẑ rotated by R: a field B'(x) = R B(Rᵀx) (:func:`rotate_field`)
has r'(p̂) = R r(Rᵀp̂), hence δI'(p̂; g) = δI(Rᵀp̂; Rᵀg). In real harmonic coefficients
(:func:`real_harmonics`, ℓ ≤ ℓmax) a map f∘Rᵀ has coefficients D(R) c (:func:`harmonic_rotation`).
One reference ensemble with B0 ∥ ẑ therefore gives the coefficients A (K × 3, one column per
position-component map r_a) per realisation, and for every b̂ the observed map's coefficients
c = D(R) A Rᵀg have

    mean μ(b̂) = D(R) Ā h,    covariance Σ(b̂) = D(R) [Σ_ab h_a h_b Cov(A_a, A_b)] D(R)ᵀ,    h = Rᵀg.

**Estimator: maximum likelihood of the Gaussian model.** Why not a simpler statistic: the dipole
axis (the mean dipole ∝ K·g is ≈ ∥ b̂ when K_∥ ≫ K_⊥, :func:`dipole_axis`) uses only the mean of
ℓ = 1, while at late times r grows like √T and the fluctuations, whose covariance is itself
aligned with b̂, dominate the map; the Gaussian likelihood weighs the mean and the anisotropic
covariance of all ℓ ≤ ℓmax optimally (it attains the Cramér–Rao bound of that model
asymptotically), and the dipole axis is kept as a baseline. The positions are sums of many
decorrelated steps, so Gaussian low-ℓ coefficients are a fair model; the held-out study measures
how well it works rather than assuming it. Maximisation: a HEALPix grid of candidate directions
(global, so the b̂ / −b̂ modes are both seen), then BFGS in tangent coordinates of the best one.

**Symmetrisation of the reference.** The ensemble with B0 ∥ ẑ is invariant under rotations about ẑ
and the reflection z → −z (B is a pseudovector: the reflection keeps B0 ∥ ẑ and maps isotropic
turbulence to itself), hence also under the inversion p̂ → −p̂, r → −r. Projecting the estimated
Ā and Cov(A) onto the invariants of this group (N > 2(ℓmax + 1) equally spaced rotations, exact
for these band-limited quantities) removes sampling noise, makes the likelihood independent of the
unphysical roll of R about b̂, and sets the even-ℓ mean and the even–odd covariance to zero.

**b̂ versus −b̂.** −b̂ = R Rx(π) ẑ, and the rotation by π about an axis ⊥ B0 is *not* in the group:
the two hypotheses differ only through the parity-odd (chiral) part of the statistics, e.g. the Hall
term K_A b̂ × g of the dipole (the gyration sense), while the symmetric K and the variance structure
are even in b̂. So the sign is distinguishable in principle, weakly in practice: :func:`sign_divergence`
gives the Jeffreys divergence J between the two models (a likelihood-ratio test of one map has error
probability ≈ Φ(−√J/2)), and the held-out study reports the flip rate. Errors are quoted for the
direction and for the axis (min(θ, 180° − θ)).

**Cosmic-variance limit.** The Fisher information of the Gaussian model in orthonormal tangent
coordinates at b̂ (:func:`fisher_information`), F = ∂μᵀΣ⁻¹∂μ + ½ tr(Σ⁻¹∂Σ Σ⁻¹∂Σ), bounds the
covariance of any unbiased estimator from one map by F⁻¹ (Cramér–Rao). It depends on b̂ only
through the angle between b̂ and g. The bound is local: it does not describe sign flips.

Model parameters (σ², rL, γ, T, ...) are taken as known: the reference ensemble is run at them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

import crjax

__all__ = [
    "DirectionEstimate",
    "HarmonicSample",
    "RecoveryStudy",
    "ReferenceStatistics",
    "cramer_rao_by_angle",
    "dipole_axis",
    "estimate_direction",
    "fisher_information",
    "harmonic_coefficients",
    "harmonic_rotation",
    "harmonic_sample",
    "log_likelihood",
    "real_harmonics",
    "recovery_study",
    "reference_statistics",
    "rotate_field",
    "rotation_to",
    "sign_divergence",
    "summarise_study",
]

_FOUR_PI = 4.0 * np.pi
#: χ²₂ quantile of 68.27% (−2 ln(1 − 0.6827)): the 1σ ellipse of a 2-D Gaussian.
_CHI2_2_68 = -2.0 * math.log(1.0 - 0.6827)


# ----------------------------------------------------------------------------------------------
# real spherical harmonics, coefficients, rotations


def _check_lmax(lmax) -> int:
    if isinstance(lmax, bool) or not isinstance(lmax, (int, np.integer)) or lmax < 1 or lmax > 12:
        raise ValueError(f"lmax must be an integer in [1, 12]; got {lmax!r}")
    return int(lmax)


def real_harmonics(directions: ArrayLike, lmax: int) -> Float[Array, "... K"]:
    """Orthonormal real spherical harmonics Y_ℓm(p̂), ℓ = 0..ℓmax, index k = ℓ² + ℓ + m.

    Y_ℓ0 = N_ℓ0 P_ℓ(z); m > 0: √2 N_ℓm P̃_ℓ^m(z) Re(x + iy)^m; m < 0: the same with Im and |m|,
    where P̃_ℓ^m sin^mθ is the associated Legendre function without the Condon–Shortley phase and
    N_ℓm² = (2ℓ + 1)/(4π) (ℓ − m)!/(ℓ + m)!. Polynomials in (x, y, z): smooth everywhere (no
    angles), so rotations and their derivatives are exact. ``directions`` (..., 3) unit vectors.
    """
    lmax = _check_lmax(lmax)
    p = jnp.asarray(directions)
    if p.ndim < 1 or p.shape[-1] != 3:
        raise ValueError(f"directions must have shape (..., 3); got {p.shape}")
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    cm, sm = [jnp.ones_like(z)], [jnp.zeros_like(z)]
    for _ in range(lmax):  # (x + iy)^m
        cm, sm = cm + [x * cm[-1] - y * sm[-1]], sm + [x * sm[-1] + y * cm[-1]]
    out = [None] * (lmax + 1) ** 2
    for m in range(lmax + 1):
        q = {m: math.prod(range(2 * m - 1, 0, -2)) * jnp.ones_like(z)}  # (2m − 1)!!
        if m + 1 <= lmax:
            q[m + 1] = (2 * m + 1) * z * q[m]
        for ell in range(m + 2, lmax + 1):
            q[ell] = ((2 * ell - 1) * z * q[ell - 1] - (ell + m - 1) * q[ell - 2]) / (ell - m)
        for ell in range(m, lmax + 1):
            norm = math.sqrt((2 * ell + 1) / _FOUR_PI * math.factorial(ell - m)
                             / math.factorial(ell + m))
            k = ell * ell + ell
            if m == 0:
                out[k] = norm * q[ell]
            else:
                out[k + m] = math.sqrt(2.0) * norm * q[ell] * cm[m]
                out[k - m] = math.sqrt(2.0) * norm * q[ell] * sm[m]
    return jnp.stack(out, axis=-1)


@functools.cache
def _pixel_harmonics(nside: int, lmax: int) -> np.ndarray:
    return np.asarray(real_harmonics(np.asarray(crjax.healpix_directions(nside)), lmax))


def harmonic_coefficients(maps: ArrayLike, lmax: int) -> Float[Array, "... K"]:
    """a_ℓm = (4π/Npix) Σ_i m_i Y_ℓm(p̂_i) (seed (2.2), real basis) of HEALPix RING maps (..., npix).

    Σ_m a_ℓm²/(2ℓ + 1) is :func:`crjax.power_spectrum` (anafast, iter=0) exactly.
    """
    lmax = _check_lmax(lmax)
    m = jnp.asarray(maps)
    nside = crjax.npix_to_nside(m.shape[-1])
    if lmax > 3 * nside - 1:
        raise ValueError(f"lmax must be <= 3·nside − 1 = {3 * nside - 1}; got {lmax}")
    y = jnp.asarray(_pixel_harmonics(nside, lmax), m.dtype)
    return (_FOUR_PI / m.shape[-1]) * (m @ y)


@functools.cache
def _rotation_nodes(lmax: int) -> tuple[np.ndarray, np.ndarray]:
    # least squares on ≥ 4K nodes: Y_k∘Rᵀ lies exactly in the span of degree-ℓ harmonics, so the
    # fit is exact (any full-rank node set; HEALPix centres are well conditioned)
    nside = 2
    while 12 * nside * nside < 4 * (lmax + 1) ** 2:
        nside *= 2
    q = np.asarray(crjax.healpix_directions(nside))
    return q, np.linalg.pinv(np.asarray(real_harmonics(q, lmax)))


def harmonic_rotation(rotation: Float[Array, "3 3"], lmax: int) -> Float[Array, "K K"]:
    """D(R) with coefficients(f∘Rᵀ) = D(R)·coefficients(f), f band-limited to ℓ ≤ ℓmax.

    D_jk = ⟨Y_j, Y_k∘Rᵀ⟩ (real Wigner matrix; block diagonal in ℓ, orthogonal for orthogonal R,
    proper or improper). Differentiable in R.
    """
    q, pinv = _rotation_nodes(_check_lmax(lmax))
    r = jnp.asarray(rotation)
    return jnp.asarray(pinv, r.dtype) @ real_harmonics(jnp.asarray(q, r.dtype) @ r, lmax)


def rotation_to(direction: ArrayLike) -> Float[Array, "... 3 3"]:
    """R = Rz(φ) Ry(θ), the rotation taking ẑ to b̂ = (sin θ cos φ, sin θ sin φ, cos θ).

    ``direction`` (..., 3), any non-zero length. Columns: R x̂, R ŷ (a tangent basis at b̂), b̂.
    """
    b = jnp.asarray(direction)
    b = b / jnp.linalg.norm(b, axis=-1, keepdims=True)
    ct = b[..., 2]
    st = jnp.sqrt(jnp.maximum(1.0 - ct * ct, 0.0))
    phi = jnp.arctan2(b[..., 1], b[..., 0])
    cp, sp = jnp.cos(phi), jnp.sin(phi)
    zero = jnp.zeros_like(ct)
    col_x = jnp.stack([ct * cp, ct * sp, -st], -1)
    col_y = jnp.stack([-sp, cp, zero], -1)
    return jnp.stack([col_x, col_y, jnp.stack([st * cp, st * sp, ct], -1)], -1)


def _cayley(w):
    """Rotation (1 − W/2)⁻¹(1 + W/2), W = [w]×: smooth, orthogonal, derivative W at w = 0."""
    zero = jnp.zeros_like(w[0])
    wx = jnp.array([[zero, -w[2], w[1]], [w[2], zero, -w[0]], [-w[1], w[0], zero]])
    eye = jnp.eye(3, dtype=w.dtype)
    return jnp.linalg.solve(eye - 0.5 * wx, eye + 0.5 * wx)


def _local_rotation(u, r0):
    """R(u) = Cay(u₁ e₁ + u₂ e₂) R0, e₁, e₂ = R0 x̂, R0 ŷ: b̂(u) = R(u) ẑ with |∂b̂/∂u_i| = 1."""
    return _cayley(r0[:, 0] * u[0] + r0[:, 1] * u[1]) @ r0


def rotate_field(field: crjax.TurbulentField, rotation: ArrayLike) -> crjax.TurbulentField:
    """The field x ↦ R B(Rᵀx) for a proper rotation R (B0 → R B0, each mode's k̂ and ξ̂ rotated).

    Isotropic modes make it a draw from the ensemble with B0 along R b̂0; backtracking it from R p̂
    gives R r(p̂) (the rotation covariance the model rests on; a test).
    """
    r = jnp.asarray(rotation, field.b0.dtype)
    if r.shape != (3, 3) or not np.allclose(np.asarray(r) @ np.asarray(r).T, np.eye(3), atol=1e-10) \
            or not np.linalg.det(np.asarray(r)) > 0:
        raise ValueError(f"rotation must be a proper 3×3 rotation matrix; got {rotation!r}")
    return eqx.tree_at(
        lambda f: (f.b0, f.wavevectors, f.amplitudes),
        field,
        (field.b0 @ r.T, field.wavevectors @ r.T, field.amplitudes @ r.T),
    )


# ----------------------------------------------------------------------------------------------
# ensembles of harmonic coefficients


class HarmonicSample(eqx.Module):
    """Per-realisation coefficients A (ℓ ≤ ℓmax) of the three position-component maps r_a(−T; p̂).

    coefficients: (nreal, ntimes, K, 3), K = (ℓmax + 1)²; a map δI = r·g has coefficients A·g.
    b0: (nreal, 3) unit B0 direction of each realisation; times: (ntimes,) backtracking times.
    """

    coefficients: Float[Array, "nreal ntimes K 3"]
    b0: Float[Array, "nreal 3"]
    times: Float[Array, " ntimes"]
    lmax: int = eqx.field(static=True)
    nside: int = eqx.field(static=True)


def _draw_direction(key):
    v = jax.random.normal(jax.random.fold_in(key, 0x0B0), (3,))
    return v / jnp.linalg.norm(v)


def _realise_b0(key, params):
    """realise_field with b0_direction uniform on the sphere (from ``key``) when ``params[1]``."""
    p, random = params
    b = jnp.where(random, _draw_direction(key).astype(p.b0_direction.dtype), p.b0_direction)
    return crjax.realise_field(key, eqx.tree_at(lambda q: q.b0_direction, p, b))


@functools.cache
def _coefficient_reducer(nside: int, lmax: int):
    y = _pixel_harmonics(nside, lmax)

    def reduce(traj):
        pos = traj.positions  # (c, ntimes, npix, 3)
        return (_FOUR_PI / pos.shape[-2]) * jnp.einsum("ctia,ik->ctka", pos,
                                                       jnp.asarray(y, pos.dtype))

    return reduce


def harmonic_sample(
    params: crjax.FieldParams,
    key: PRNGKeyArray,
    n_realisations: int,
    nside: int,
    times: ArrayLike | Sequence[float],
    *,
    rL: float,
    dt: float,
    lmax: int = 2,
    random_b0: bool = False,
    chunk_size: int = 16,
) -> HarmonicSample:
    """Run an ensemble (``crjax.run_ensemble``, seed's fixed amplitudes) and keep A per realisation.

    ``random_b0``: each realisation r draws its own B0 direction uniformly on the sphere from
    ``fold_in(key, r)`` (``FieldParams.b0_direction``; held-out skies); otherwise every
    realisation has ``params.b0_direction`` (a reference ensemble needs ẑ).
    """
    lmax = _check_lmax(lmax)
    if lmax > 3 * nside - 1:
        raise ValueError(f"lmax must be <= 3·nside − 1 = {3 * nside - 1}; got {lmax}")
    coeffs = crjax.run_ensemble(
        (params, jnp.asarray(bool(random_b0))), key, n_realisations, nside, jnp.asarray(times),
        rL=rL, dt=dt, chunk_size=chunk_size, reducer=_coefficient_reducer(nside, lmax),
        realise=_realise_b0,
    )
    if random_b0:
        b0 = jax.vmap(lambda i: _draw_direction(jax.random.fold_in(key, i)))(
            jnp.arange(n_realisations))
    else:
        b = jnp.asarray(params.b0_direction, coeffs.dtype)
        b0 = jnp.broadcast_to(b / jnp.linalg.norm(b), (n_realisations, 3))
    return HarmonicSample(coeffs, b0.astype(coeffs.dtype), jnp.asarray(times, coeffs.dtype),
                          lmax, nside)


# ----------------------------------------------------------------------------------------------
# the reference model


class ReferenceStatistics(eqx.Module):
    """Ā (K, 3) and Cov(A) (K, 3, K, 3) for B0 ∥ ẑ at one horizon, symmetrised (module doc)."""

    mean: Float[Array, "K 3"]
    cov: Float[Array, "K 3 K 3"]
    lmax: int = eqx.field(static=True)
    n_realisations: int = eqx.field(static=True)
    time: float = eqx.field(static=True)


def _symmetry_group(lmax: int):
    n = 2 * lmax + 4  # > 2(ℓmax + 1): the average kills every non-zero azimuthal frequency
    mats = []
    for j in range(n):
        c, s = math.cos(2 * math.pi * j / n), math.sin(2 * math.pi * j / n)
        rz = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])
        mats += [rz, rz @ np.diag([1.0, 1.0, -1.0])]
    return mats


def reference_statistics(sample: HarmonicSample, time_index: int = -1) -> ReferenceStatistics:
    """Mean and covariance of A over the realisations of a B0 ∥ ẑ sample, projected onto the
    invariants of rotations about ẑ and z → −z (module doc): A → D(M) A Mᵀ for each M."""
    b0 = np.asarray(sample.b0)
    if not np.allclose(b0, [0.0, 0.0, 1.0], atol=1e-12):
        raise ValueError("sample must be a reference ensemble with B0 ∥ ẑ (random_b0=False, "
                         "params.b0_direction = (0, 0, 1))")
    a = np.asarray(sample.coefficients[:, time_index])  # (n, K, 3)
    n = a.shape[0]
    if n < 2:
        raise ValueError(f"sample must have >= 2 realisations; got {n}")
    mean = a.mean(0)
    d = (a - mean).reshape(n, -1)
    cov = (d.T @ d / (n - 1)).reshape(a.shape[1:] * 2)
    ms, cs = np.zeros_like(mean), np.zeros_like(cov)
    group = _symmetry_group(sample.lmax)
    for m in group:
        dm = np.asarray(harmonic_rotation(jnp.asarray(m), sample.lmax))
        ms += dm @ mean @ m.T
        cs += np.einsum("kp,aq,pqrs,lr,bs->kalb", dm, m, cov, dm, m, optimize=True)
    return ReferenceStatistics(jnp.asarray(ms / len(group)), jnp.asarray(cs / len(group)),
                               sample.lmax, n, float(sample.times[time_index]))


def _lmax_of(mean) -> int:
    return math.isqrt(mean.shape[0]) - 1


def _frame_cov(cov, h):
    """Σ₀(h) = Σ_ab h_a h_b Cov(A_a, A_b) (+ a 1e-12 relative jitter: Cholesky-safe round-off)."""
    s0 = jnp.einsum("kalb,a,b->kl", cov, h, h)
    return s0 + 1e-12 * jnp.trace(s0) / s0.shape[0] * jnp.eye(s0.shape[0], dtype=s0.dtype)


def _model(rotation, g, mean, cov):
    """μ, Σ of the observed coefficients for B0 = R ẑ and gradient g (module doc)."""
    d = harmonic_rotation(rotation, _lmax_of(mean))
    h = rotation.T @ g
    return d @ (mean @ h), d @ _frame_cov(cov, h) @ d.T


def _loglike_frame(c, d, rotation, g, mean, cov):
    """ln N for maps c (n, K), evaluated in the B0 ∥ ẑ frame: c₀ = Dᵀc (D orthogonal), h = Rᵀg."""
    h = rotation.T @ g
    chol = jnp.linalg.cholesky(_frame_cov(cov, h))
    z = jax.scipy.linalg.solve_triangular(chol, (c @ d - (mean @ h)[None, :]).T, lower=True)
    return (-0.5 * jnp.sum(z * z, axis=0) - jnp.sum(jnp.log(jnp.diag(chol)))
            - 0.5 * c.shape[-1] * math.log(2.0 * math.pi))


def _check_g(g):
    g = np.asarray(g, dtype=float)
    if g.shape != (3,) or not np.all(np.isfinite(g)) or not np.linalg.norm(g) > 0:
        raise ValueError(f"g must be a finite non-zero 3-vector (∇n/n); got {g!r}")
    return jnp.asarray(g)


def _check_coefficients(c, ref):
    c = jnp.asarray(c)
    k = (ref.lmax + 1) ** 2
    if c.ndim not in (1, 2) or c.shape[-1] != k:
        raise ValueError(f"coefficients must have shape (K,) or (n, K) with K = {k}; got {c.shape}")
    return c


def log_likelihood(
    coefficients: ArrayLike, direction: ArrayLike, g: ArrayLike, ref: ReferenceStatistics
) -> Float[Array, "..."]:
    """ln N(c; μ(b̂), Σ(b̂)) of map coefficients c (K,) or (n, K) for B0 along ``direction`` (3,)."""
    c = _check_coefficients(coefficients, ref)
    r = rotation_to(jnp.asarray(direction, float))
    d = harmonic_rotation(r, ref.lmax)
    return _loglike_frame(jnp.atleast_2d(c), d, r, _check_g(g), ref.mean,
                          ref.cov).reshape(c.shape[:-1])


def fisher_information(
    direction: ArrayLike, g: ArrayLike, ref: ReferenceStatistics
) -> Float[Array, "2 2"]:
    """Fisher matrix of one map's coefficients for b̂ in orthonormal tangent coordinates at b̂:
    F = ∂μᵀΣ⁻¹∂μ + ½ tr(Σ⁻¹∂Σ Σ⁻¹∂Σ) (Gaussian model). √tr F⁻¹ is the Cramér–Rao bound on the
    rms angular error (radians) of an unbiased estimator from one realisation: cosmic variance."""
    return _fisher(rotation_to(jnp.asarray(direction, float)), _check_g(g), ref.mean, ref.cov)


@jax.jit
def _fisher(r0, g, mean, cov):
    def model(u):
        return _model(_local_rotation(u, r0), g, mean, cov)

    u0 = jnp.zeros(2, r0.dtype)
    _, sig = model(u0)
    dmu, dsig = jax.jacfwd(model)(u0)  # (K, 2), (K, K, 2)
    sinv = jnp.linalg.inv(sig)
    a = jnp.einsum("kl,lmi->kmi", sinv, dsig)
    return dmu.T @ sinv @ dmu + 0.5 * jnp.einsum("kli,lkj->ij", a, a)


def cramer_rao_by_angle(ref: ReferenceStatistics, angles_deg: ArrayLike) -> np.ndarray:
    """The cosmic-variance limit √tr F⁻¹ (degrees) on b̂ from one map, for B0 at each angle
    (degrees) to ∇n. By rotation invariance it depends on nothing else (g = x̂, b̂ in the x–z plane).
    Returns (len(angles_deg),); inf where F is singular."""
    out = []
    for a in np.radians(np.atleast_1d(np.asarray(angles_deg, dtype=float))):
        f = np.asarray(fisher_information(np.array([np.cos(a), 0.0, np.sin(a)]),
                                          np.array([1.0, 0.0, 0.0]), ref))
        w = np.linalg.eigvalsh(f)
        out.append(np.degrees(np.sqrt(np.sum(1.0 / w))) if np.all(w > 0) else np.inf)
    return np.asarray(out)


@jax.jit
def _jeffreys(b, g, mean, cov):
    m1, s1 = _model(rotation_to(b), g, mean, cov)
    m2, s2 = _model(rotation_to(-b), g, mean, cov)
    i1, i2 = jnp.linalg.inv(s1), jnp.linalg.inv(s2)
    dm = m1 - m2
    return 0.5 * (jnp.trace(i2 @ s1) + jnp.trace(i1 @ s2)) - s1.shape[0] + 0.5 * dm @ (i1 + i2) @ dm


def sign_divergence(direction: ArrayLike, g: ArrayLike, ref: ReferenceStatistics) -> float:
    """Jeffreys divergence J = KL(b̂‖−b̂) + KL(−b̂‖b̂) between the one-map models for ±b̂.

    J → 0: the sign of B0 is not measurable from one map; a likelihood-ratio test of the sign errs
    with probability ≈ Φ(−√J/2) (exact for equal covariances).
    """
    b = jnp.asarray(direction, float)
    return float(_jeffreys(b / jnp.linalg.norm(b), _check_g(g), ref.mean, ref.cov))


# ----------------------------------------------------------------------------------------------
# the estimator


class DirectionEstimate(NamedTuple):
    """direction (n, 3) ML estimate of b̂; log_likelihood (n,) at it; grid_best (n, 3) the best grid
    direction before refinement."""

    direction: np.ndarray
    log_likelihood: np.ndarray
    grid_best: np.ndarray


@functools.cache
def _grid(nside: int, lmax: int):
    """Candidate directions (M, 3) (HEALPix centres), their rotations (M, 3, 3) and D(R) (M, K, K)."""
    b = np.asarray(crjax.healpix_directions(nside))
    rots = rotation_to(jnp.asarray(b))
    return b, np.asarray(rots), np.asarray(jax.vmap(lambda r: harmonic_rotation(r, lmax))(rots))


@jax.jit
def _grid_loglike(c, ds, rots, g, mean, cov):
    per = jax.vmap(_loglike_frame, (None, 0, 0, None, None, None))
    return per(c, ds, rots, g, mean, cov).T  # (n, M)


def _neg_loglike_local(u, c, r0, g, mean, cov):
    r = _local_rotation(u, r0)
    return -_loglike_frame(c[None], harmonic_rotation(r, _lmax_of(mean)), r, g, mean, cov)[0]


_neg_loglike_local_grad = jax.jit(jax.value_and_grad(_neg_loglike_local))


def estimate_direction(
    coefficients: ArrayLike,
    g: ArrayLike,
    ref: ReferenceStatistics,
    *,
    grid_nside: int = 8,
    refine: bool = True,
) -> DirectionEstimate:
    """Maximum-likelihood b̂ from one map's coefficients (K,) (or a batch (n, K), one map each).

    Global search on the HEALPix grid of ``grid_nside`` (12·nside² directions, spacing ≈ 59°/nside),
    then BFGS in tangent coordinates from the best grid point (``refine``).
    """
    c = jnp.atleast_2d(_check_coefficients(coefficients, ref))
    g = _check_g(g).astype(c.dtype)
    cand, rots, ds = _grid(int(grid_nside), ref.lmax)
    ll = np.asarray(_grid_loglike(c, jnp.asarray(ds), jnp.asarray(rots), g, ref.mean, ref.cov))
    best = ll.argmax(1)
    out_b = cand[best].copy()
    out_ll = ll[np.arange(len(best)), best]
    if refine:
        for i in range(c.shape[0]):
            r0 = jnp.asarray(rots[best[i]])

            def fun(u, ci=c[i], r0=r0):
                v, gr = _neg_loglike_local_grad(jnp.asarray(u), ci, r0, g, ref.mean, ref.cov)
                return float(v), np.asarray(gr, float)

            res = scipy.optimize.minimize(fun, np.zeros(2), jac=True, method="BFGS",
                                          options={"gtol": 1e-6, "maxiter": 100})
            if np.isfinite(res.fun) and -res.fun >= out_ll[i]:
                out_b[i] = np.asarray(_local_rotation(jnp.asarray(res.x), r0))[:, 2]
                out_ll[i] = -res.fun
    return DirectionEstimate(out_b, out_ll, cand[best])


def dipole_axis(coefficients: ArrayLike) -> np.ndarray:
    """Baseline: the axis of the map's dipole, b̂ ≈ ±d̂ (the mean dipole −3K·g is ∥ b̂ when
    K_∥ ≫ K_⊥ and b̂·g is not small). Returns unit vectors (n, 3) (sign meaningless)."""
    c = np.atleast_2d(np.asarray(coefficients))
    # real Y_1,-1 ∝ y, Y_1,0 ∝ z, Y_1,1 ∝ x
    d = np.stack([c[:, 3], c[:, 1], c[:, 2]], -1)
    return d / np.linalg.norm(d, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------
# held-out study


class RecoveryStudy(NamedTuple):
    """Per held-out realisation: truth, estimate (n, 3); error_deg, axial_error_deg (n,) angle to
    b̂ and to the axis ±b̂; crb_deg (n,) √tr F⁻¹ at the truth (degrees); pull2 (n,) uᵀ F u with u
    the tangent-plane error at the truth, using the closer of ±b̂̂ (χ²₂ for an efficient
    estimator); sign_j (n,) Jeffreys divergence of ±b̂ at the truth; dipole_axial_error_deg (n,)
    the dipole-axis baseline's axial error; crb_samples_deg (n, s) angular errors drawn from
    N(0, F⁻¹) (the cosmic-variance limit's distribution)."""

    truth: np.ndarray
    estimate: np.ndarray
    error_deg: np.ndarray
    axial_error_deg: np.ndarray
    crb_deg: np.ndarray
    pull2: np.ndarray
    sign_j: np.ndarray
    dipole_axial_error_deg: np.ndarray
    crb_samples_deg: np.ndarray


def _angle_deg(a, b):
    return np.degrees(np.arccos(np.clip(np.sum(a * b, -1), -1.0, 1.0)))


def recovery_study(
    ref: ReferenceStatistics,
    held_out: HarmonicSample,
    g: ArrayLike,
    *,
    time_index: int = -1,
    grid_nside: int = 8,
    crb_draws: int = 256,
) -> RecoveryStudy:
    """Estimate b̂ from each held-out realisation's map (coefficients A·g) and compare with the
    truth and with the Cramér–Rao bound at the truth (module doc). ``held_out`` must be run at the
    reference's parameters and horizon (``harmonic_sample(..., random_b0=True)``, other keys)."""
    if held_out.lmax != ref.lmax:
        raise ValueError(f"held_out.lmax must equal the reference's {ref.lmax}; got {held_out.lmax}")
    if not math.isclose(float(held_out.times[time_index]), ref.time, rel_tol=1e-12):
        raise ValueError(f"held_out time {float(held_out.times[time_index])} must equal the "
                         f"reference's {ref.time}")
    gj = _check_g(g)
    c = held_out.coefficients[:, time_index] @ gj.astype(held_out.coefficients.dtype)
    truth = np.asarray(held_out.b0)
    est = estimate_direction(c, gj, ref, grid_nside=grid_nside).direction
    err = _angle_deg(est, truth)
    axial = np.minimum(err, 180.0 - err)
    rng = np.random.default_rng(0)
    crb, pull2, sj, draws = [], [], [], []
    for b, e in zip(truth, est):
        f = np.asarray(fisher_information(b, gj, ref))
        finv = np.linalg.inv(f)
        crb.append(np.degrees(np.sqrt(np.trace(finv))))
        # tangent-plane error at the truth (the axis error: compare with the closer of ±b̂)
        r0 = np.asarray(rotation_to(b))
        e_ax = e if e @ b >= 0 else -e
        u = np.array([e_ax @ r0[:, 0], e_ax @ r0[:, 1]]) * np.arccos(np.clip(e_ax @ b, -1, 1)) \
            / max(np.sqrt(1.0 - min(1.0, (e_ax @ b) ** 2)), 1e-300)
        pull2.append(float(u @ f @ u))
        sj.append(sign_divergence(b, gj, ref))
        z = rng.multivariate_normal(np.zeros(2), finv, size=crb_draws)
        draws.append(np.degrees(np.linalg.norm(z, axis=-1)))
    dip = dipole_axis(c)
    derr = _angle_deg(dip, truth)
    return RecoveryStudy(truth, est, err, axial, np.asarray(crb), np.asarray(pull2),
                         np.asarray(sj), np.minimum(derr, 180.0 - derr), np.asarray(draws))


def summarise_study(study: RecoveryStudy) -> dict:
    """Median and 68% quantile of the axial and full errors (degrees), of the dipole baseline, and
    of the Cramér–Rao distribution; sign-flip rate; coverage of the Fisher 68% ellipse."""

    def q(x):
        return {"median": float(np.median(x)), "q68": float(np.quantile(x, 0.68))}

    return {
        "n": int(study.truth.shape[0]),
        "ml_axial_deg": q(study.axial_error_deg),
        "ml_direction_deg": q(study.error_deg),
        "dipole_axis_deg": q(study.dipole_axial_error_deg),
        "cramer_rao_deg": q(study.crb_samples_deg.ravel()),
        "crb_rms_deg_median": float(np.median(study.crb_deg)),
        "sign_flip_rate": float(np.mean(study.error_deg > 90.0)),
        "sign_jeffreys_median": float(np.median(study.sign_j)),
        "coverage_68": float(np.mean(study.pull2 <= _CHI2_2_68)),
    }


def _main(argv=None) -> None:
    """``python -m inference.b0_direction``: the held-out study at a chosen size, one JSON line per
    horizon (summary, and the Cramér–Rao limit at 0°, 30°, 60°, 90° between B0 and ∇n)."""
    import argparse
    import json
    import sys
    import time

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("--nside", type=int, default=2)
    ap.add_argument("--modes", type=int, default=8)
    ap.add_argument("--tomega", type=float, nargs="+", default=[10.0])
    ap.add_argument("--lmax", type=int, nargs="+", default=[2])
    ap.add_argument("--n-ref", type=int, default=256)
    ap.add_argument("--n-held", type=int, default=64)
    ap.add_argument("--rl", type=float, default=0.1)
    ap.add_argument("--grid-nside", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    crjax.use_cpu_cores()  # before anything runs JAX
    try:  # bad input: one line on stderr, exit 2, before anything runs
        from crjax._checks import check_nside

        check_nside(a.nside)
        try:
            check_nside(a.grid_nside)
        except ValueError:
            raise ValueError(f"--grid-nside must be a power of two; got {a.grid_nside}") from None
        for lm in a.lmax:
            if not 1 <= lm <= 3 * a.nside - 1:
                raise ValueError(f"--lmax must be in [1, 3*nside - 1 = {3 * a.nside - 1}]; got {lm}")
        for name, lo in (("modes", 1), ("n_ref", 2), ("n_held", 1)):
            if getattr(a, name) < lo:
                raise ValueError(f"--{name.replace('_', '-')} must be >= {lo}; got {getattr(a, name)}")
        if not (math.isfinite(a.rl) and a.rl > 0):
            raise ValueError(f"--rl must be finite and > 0; got {a.rl}")
        if not all(math.isfinite(t) and t > 0 for t in a.tomega):
            raise ValueError(f"--tomega must be finite and > 0; got {a.tomega}")
    except ValueError as err:
        ap.exit(2, f"python -m inference.b0_direction: {err}\n")
    params = crjax.FieldParams(n_modes=a.modes)
    times = [t * a.rl for t in a.tomega]
    key = jax.random.PRNGKey(a.seed)
    lmax_run = max(a.lmax)
    t0 = time.perf_counter()

    def say(msg):
        print(f"{msg} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    ref_s = harmonic_sample(params, jax.random.fold_in(key, 1), a.n_ref, a.nside, times, rL=a.rl,
                            dt=a.rl / 20, lmax=lmax_run)
    held = harmonic_sample(params, jax.random.fold_in(key, 2), a.n_held, a.nside, times, rL=a.rl,
                           dt=a.rl / 20, lmax=lmax_run, random_b0=True)
    jax.block_until_ready(held.coefficients)
    say(f"simulated: {a.n_ref} reference and {a.n_held} held-out skies")
    g = np.array([1.0, 0.0, 0.0])
    for lm in a.lmax:
        k = (lm + 1) ** 2

        def cut(s, k=k, lm=lm):
            return HarmonicSample(s.coefficients[..., :k, :], s.b0, s.times, lm, s.nside)

        for ti, t in enumerate(a.tomega):
            ref = reference_statistics(cut(ref_s), ti)
            st = recovery_study(ref, cut(held), g, time_index=ti, grid_nside=a.grid_nside)
            out = {"nside": a.nside, "modes": a.modes, "tomega": t, "lmax": lm,
                   "n_ref": a.n_ref, **summarise_study(st),
                   "crb_by_angle_deg": dict(zip(("0", "30", "60", "90"), cramer_rao_by_angle(
                       ref, [0.0, 30.0, 60.0, 90.0]).round(2).tolist()))}
            print(json.dumps(out), flush=True)
            say(f"lmax {lm}, tΩ {t:g} done")


if __name__ == "__main__":
    _main()
