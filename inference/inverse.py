"""The inverse problem: which field parameters a spectrum constrains, and recovering them.

θ = (σ², rL/Lc, γ, α) with α the angle between B0 (∥ ẑ) and ∇n (ĝ = (sin α, 0, cos α)).

* **Tensor spectra.** δI = r(−T)·g is linear in g, so C_ℓ(g) = g_a g_b C_ℓ^{ab} with C_ℓ^{ab} the
  cross spectra of the position-component maps, and N (3.1) = (4π/Npix) g_a g_b ⟨r_a r_b⟩. One
  ensemble gives the per-realisation tensor f_ℓ^{ab} = C_ℓ^{ab} − (4π/Npix)⟨r_a r_b⟩_pix; Ĉ_ℓ(α) =
  ĝ·E[f_ℓ]·ĝ for every α, and ∂_α is exact (no trajectories differentiated). B0 ∥ ẑ with isotropic
  modes and the HEALPix pixel set (invariant under 90° rotations about ẑ and z → −z) make E[f] =
  diag(a, a, b): the estimate is symmetrised accordingly (exact in expectation, lower variance).
* **Jacobian** ∂Ĉ_ℓ/∂θ: σ², γ by the score function, rL by the gyro-unit rescaling
  (``crjax.gradients``; Gaussian mode amplitudes), α exactly.
* **Fisher matrix** F = Jᵀ C⁻¹ J for a data vector Ĉ_ℓ (ℓ = 1..ℓmax) estimated from ``n_data``
  realisations (C = Cov(f)/n_data): the Cramér–Rao bounds √(F⁻¹)_ii say what is constrained.
* **Recovery** (:func:`fit_parameters`): optax Adam on the χ² of a target spectrum, with stochastic
  gradients −2 Jᵀ C⁻¹ (t − μ) from a fresh ensemble at every step; the estimate is the mean of the
  last half of the iterates, its interval from the Fisher matrix at the estimate.
* **Gradient-free baseline** (:func:`fit_parameters_nelder_mead`): Nelder–Mead on the same χ² with
  the same ensembles (common random numbers by default), the angle profiled in closed form, stopped
  at a budget of ensembles; :func:`compare_gradient_free` runs both at equal simulation budget.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

import crjax
from crjax import gradients as G
from crjax._checks import check_nside

__all__ = [
    "THETA",
    "BaselineResult",
    "FitResult",
    "SpectrumModel",
    "TensorSample",
    "compare_gradient_free",
    "fisher_matrix",
    "fit_parameters",
    "fit_parameters_nelder_mead",
    "gradient_direction",
    "gradient_free_study",
    "spectrum_model",
    "tensor_sample",
]

#: The parameters of the inverse problem.
THETA = ("sigma2", "rL", "gamma", "angle")
_FOUR_PI = 4.0 * np.pi
_PAIRS = ((0, 0), (1, 1), (2, 2), (0, 1), (0, 2), (1, 2))


def _check_theta(theta):
    theta = np.asarray(theta, dtype=float)
    if theta.shape != (4,):
        raise ValueError(f"theta must be (sigma2, rL, gamma, angle), shape (4,); got {theta.shape}")
    if not np.all(np.isfinite(theta)) or np.any(theta[:3] <= 0):
        raise ValueError(
            f"theta must be finite with sigma2, rL, gamma > 0 (angle in radians); got {theta!r}"
        )
    return theta


def gradient_direction(angle: ArrayLike) -> Float[Array, 3]:
    """ĝ = (sin α, 0, cos α): ∇n/n at angle α to B0 ∥ ẑ (unit length; C_ℓ ∝ |g|²)."""
    a = jnp.asarray(angle)
    return jnp.stack([jnp.sin(a), jnp.zeros_like(a), jnp.cos(a)])


def _tensor_f(positions, lmax):
    """f^{ab}_ℓ (..., 3, 3, L): cross spectra by polarisation, C^{ab} = (C(x_a + x_b) − C^{aa} − C^{bb})/2."""
    npix = positions.shape[-2]
    x = jnp.moveaxis(positions, -1, 0)  # (3, ..., npix)
    auto = crjax.power_spectrum(x, lmax=lmax)  # (3, ..., L)
    sums = jnp.stack([x[0] + x[1], x[0] + x[2], x[1] + x[2]])
    cross = 0.5 * (crjax.power_spectrum(sums, lmax=lmax) - auto[np.array([0, 0, 1])] - auto[np.array([1, 2, 2])])
    c = jnp.stack([
        jnp.stack([auto[0], cross[0], cross[1]]),
        jnp.stack([cross[0], auto[1], cross[2]]),
        jnp.stack([cross[1], cross[2], auto[2]]),
    ])  # (3, 3, ..., L)
    c = jnp.moveaxis(c, (0, 1), (-3, -2))  # (..., 3, 3, L)
    m2 = jnp.einsum("...na,...nb->...ab", positions, positions) / npix
    return c - (_FOUR_PI / npix) * m2[..., None]


@functools.cache
def _tensor_reducer(lmax: int):
    def reduce(traj):
        fn = functools.partial(_tensor_f, lmax=lmax)
        return jax.jvp(fn, (traj.positions,), (-traj.velocities,))

    return reduce


class TensorSample(eqx.Module):
    """Per-realisation f^{ab}_ℓ (nreal, ntimes, 3, 3, L), its ∂_T, amplitude scores for
    (σ², rL, γ) (nreal, 3), the save times and the run's rL."""

    f: Float[Array, "nreal ntimes 3 3 L"]
    dfdT: Float[Array, "nreal ntimes 3 3 L"]
    score: Float[Array, "nreal 3"]
    times: Float[Array, " ntimes"]
    rL: float = eqx.field(static=True)


def tensor_sample(
    params: crjax.FieldParams,
    key: PRNGKeyArray,
    n_realisations: int,
    nside: int,
    times: ArrayLike | Sequence[float],
    *,
    rL: float,
    dt: float,
    lmax: int | None = None,
    chunk_size: int = 16,
) -> TensorSample:
    """One ensemble with Gaussian mode amplitudes; keeps the tensor statistic and the scores."""
    lmax = 3 * nside - 1 if lmax is None else lmax
    names = ("sigma2", "rL", "gamma")
    f, dfdT = crjax.run_ensemble(
        params, key, n_realisations, nside, jnp.asarray(times), rL=rL, dt=dt,
        chunk_size=chunk_size, reducer=_tensor_reducer(lmax), realise=G.realise_gaussian_field,
    )
    score = G._scores(params, key, n_realisations, names, float(rL))
    return TensorSample(f, dfdT, score, jnp.asarray(times), float(rL))


def _symmetrise(f):
    """Project f^{ab} onto diag(a, a, b) (the axisymmetric part about B0 ∥ ẑ)."""
    a = 0.5 * (f[..., 0, 0, :] + f[..., 1, 1, :])
    b = f[..., 2, 2, :]
    z = jnp.zeros_like(a)
    return jnp.stack([jnp.stack([a, z, z], -2), jnp.stack([z, a, z], -2),
                      jnp.stack([z, z, b], -2)], -3)


class SpectrumModel(NamedTuple):
    """Model Ĉ_ℓ and its Jacobian at one θ, ℓ = 1..ℓmax at the last save time.

    mean (L,), jac (L, 4) [σ², rL, γ, α], jac_se (L, 4) standard errors of the Jacobian,
    jac_cov (L, 4, L, 4) covariance of the Jacobian estimate, cov (L, L) per-realisation
    covariance of f_ℓ, nreal.
    """

    mean: np.ndarray
    jac: np.ndarray
    jac_se: np.ndarray
    jac_cov: np.ndarray
    cov: np.ndarray
    nreal: int


def spectrum_model(sample: TensorSample, angle: float, *, symmetrise: bool = True) -> SpectrumModel:
    """Ĉ_ℓ(α) and ∂Ĉ_ℓ/∂(σ², rL, γ, α) (ℓ ≥ 1, last save time) from one ensemble (module doc)."""
    f = sample.f[:, -1]
    dfdT = sample.dfdT[:, -1]
    T = float(sample.times[-1])
    if symmetrise:
        f, dfdT = _symmetrise(f), _symmetrise(dfdT)
    g = gradient_direction(angle).astype(f.dtype)
    dg = gradient_direction(angle + np.pi / 2).astype(f.dtype)  # dĝ/dα
    fs = jnp.einsum("a,rabl,b->rl", g, f, g)[:, 1:]
    dTs = jnp.einsum("a,rabl,b->rl", g, dfdT, g)[:, 1:]
    fa = 2.0 * jnp.einsum("a,rabl,b->rl", dg, f, g)[:, 1:]
    n = fs.shape[0]
    centred = (fs - fs.mean(0, keepdims=True)) * (n / (n - 1))  # leave-one-out baseline
    rl = sample.rL
    per = jnp.stack([
        centred * sample.score[:, :1],
        (2.0 / rl) * fs + centred * sample.score[:, 1:2] - (T / rl) * dTs,
        centred * sample.score[:, 2:3],
        fa,
    ], -1)  # (nreal, L, 4)
    per = np.asarray(per)
    fsn = np.asarray(fs)
    return SpectrumModel(
        mean=fsn.mean(0),
        jac=per.mean(0),
        jac_se=per.std(0, ddof=1) / np.sqrt(n),
        jac_cov=np.cov(per.reshape(n, -1), rowvar=False, ddof=1).reshape(per.shape[1:] * 2) / n,
        cov=np.cov(fsn, rowvar=False, ddof=1),
        nreal=n,
    )


def fisher_matrix(
    model: SpectrumModel, n_data: int, free: Sequence[str] = THETA, *, debias: bool = True
) -> np.ndarray:
    """F = Jᵀ C⁻¹ J for Ĉ_ℓ measured from ``n_data`` realisations (C = Cov(f)/n_data).

    ``free``: the θ components kept (others fixed). The estimated J is noisy, and E[Ĵᵀ C⁻¹ Ĵ] =
    Jᵀ C⁻¹ J + tr(C⁻¹ Cov(Ĵ_i, Ĵ_j)): with ``debias`` that noise term is subtracted (the result can
    then fail to be positive definite where the ensemble cannot resolve a direction at all).
    """
    idx = _free_index(free)
    if n_data < 1:
        raise ValueError(f"n_data must be >= 1; got {n_data}")
    cinv = np.linalg.inv(model.cov / n_data)
    j = model.jac[:, idx]
    fmat = j.T @ cinv @ j
    if debias:
        jc = model.jac_cov[:, idx][:, :, :, idx]  # (L, k, L, k)
        fmat = fmat - np.einsum("lm,limj->ij", cinv, jc)
    return fmat


def _free_index(free):
    free = tuple(free)
    if not free or any(f not in THETA for f in free) or len(set(free)) != len(free):
        raise ValueError(f"free must be distinct names from {THETA}; got {free!r}")
    return [THETA.index(f) for f in free]


class FitResult(NamedTuple):
    """theta (4,) estimate; sigma (4,) 1σ: Fisher (Cramér–Rao) at the estimate and the scatter of
    the averaged iterates in quadrature (0 for fixed components); path (steps, 4) iterates;
    chi2 (steps,) at each iterate."""

    theta: np.ndarray
    sigma: np.ndarray
    path: np.ndarray
    chi2: np.ndarray


def _params_for(base: crjax.FieldParams, theta):
    p = eqx.tree_at(lambda q: q.sigma2, base, float(theta[0]))
    return eqx.tree_at(lambda q: q.spectrum.gamma, p, float(theta[2]))


def fit_parameters(
    target: ArrayLike,
    target_cov: ArrayLike,
    theta0: ArrayLike | Sequence[float],
    key: PRNGKeyArray,
    *,
    base: crjax.FieldParams,
    nside: int,
    t_end: float,
    dt: float,
    n_sim: int = 64,
    steps: int = 30,
    learning_rate: float = 0.05,
    free: Sequence[str] = ("sigma2", "angle"),
    n_data: int = 64,
    lmax: int | None = None,
    on_step: Callable | None = None,
) -> FitResult:
    """Recover θ from a target Ĉ_ℓ (ℓ = 1..ℓmax at ``t_end``) by optax Adam with stochastic gradients.

    Each step runs ``n_sim`` fresh realisations at the current θ (keys from ``key``, which must not
    be the target's), computes χ² = (t − μ)ᵀ C⁻¹ (t − μ) and its gradient −2 Jᵀ C⁻¹ (t − μ) with μ
    and J (:func:`spectrum_model`) from disjoint halves of the ensemble, so the stochastic gradient
    is unbiased. Positive parameters move in log space; α in radians. The estimate is
    the mean of the last half of the iterates, with Fisher 1σ at the estimate for ``n_data``.
    The step grid uses ``dt`` for every rL (fixed steps). ``lmax``: the target's ℓmax (default
    3·nside − 1; the target holds ℓ = 1..lmax). ``on_step(step, theta, chi2)``: progress callback.
    """
    theta = _check_theta(theta0).copy()
    idx = _free_index(free)
    t = np.asarray(target, dtype=float)
    cinv = np.linalg.inv(np.asarray(target_cov, dtype=float))
    # Adam with a linearly decaying rate: early steps travel, late steps average out the
    # stochastic gradients (the estimate is the mean of the last half of the iterates)
    opt = optax.adam(optax.linear_schedule(learning_rate, 0.1 * learning_rate, steps))
    u = _to_u(theta)
    state = opt.init(jnp.asarray(u))
    path, chi2 = [], []
    mask = np.zeros(4)
    mask[idx] = 1.0
    for step in range(steps):
        theta = _from_u(u, theta)
        s = tensor_sample(_params_for(base, theta), jax.random.fold_in(key, step), n_sim, nside,
                          [t_end], rL=float(theta[1]), dt=dt, lmax=lmax)
        # μ and J from disjoint halves: from one sample, Cov(μ, J) ≠ 0 biases the gradient
        # towards θ where the model's own variance is small (measured: σ² pulled 5σ low)
        half_a, half_b = _halves(s)
        ma = spectrum_model(half_a, float(theta[3]))
        mb = spectrum_model(half_b, float(theta[3]))
        r = t - ma.mean
        chi2.append(float(r @ cinv @ r))
        if on_step is not None:
            on_step(step, theta, chi2[-1])
        grad_theta = -2.0 * mb.jac.T @ cinv @ r
        grad_u = grad_theta * _dtheta_du(theta) * mask
        # normalise per component: the χ² scale varies by orders of magnitude over θ
        upd, state = opt.update(jnp.asarray(grad_u), state)
        u = u + np.asarray(upd)
        path.append(_from_u(u, theta))
    path = np.asarray(path)
    est = path[len(path) // 2:].mean(0)
    # Fisher at the estimate from 4x the per-step ensemble (noise in J inflates F), plus the
    # scatter of the averaged iterates (the optimiser's own noise), in quadrature
    s = tensor_sample(_params_for(base, est), jax.random.fold_in(key, steps), 4 * n_sim, nside,
                      [t_end], rL=float(est[1]), dt=dt, lmax=lmax)
    fmat = fisher_matrix(spectrum_model(s, float(est[3])), n_data, [THETA[i] for i in idx])
    sig = np.zeros(4)
    var_f = np.diag(np.linalg.inv(fmat))
    var_f = np.where(var_f > 0, var_f, np.inf)  # a direction the ensemble could not resolve
    sig[idx] = np.sqrt(var_f + path[len(path) // 2:, idx].var(0))
    return FitResult(est, sig, path, np.asarray(chi2))


def _halves(s: TensorSample):
    n = s.f.shape[0] // 2
    if n < 2:
        raise ValueError(f"n_sim must be >= 4 (two halves of >= 2); got {s.f.shape[0]}")

    def part(sl):
        return TensorSample(s.f[sl], s.dfdT[sl], s.score[sl], s.times, s.rL)

    return part(slice(0, n)), part(slice(n, 2 * n))


def _to_u(theta):
    return np.array([np.log(theta[0]), np.log(theta[1]), np.log(theta[2]), theta[3]])


def _from_u(u, theta):
    return np.array([np.exp(u[0]), np.exp(u[1]), np.exp(u[2]), u[3]])


def _dtheta_du(theta):
    return np.array([theta[0], theta[1], theta[2], 1.0])


# ----------------------------------------------------------------------------------------------
# gradient-free baseline (issue 13, item 3): Nelder–Mead on the same χ², the same ensembles


class BaselineResult(NamedTuple):
    """theta (4,) the lowest-χ² point evaluated; path (evals, 4) every θ evaluated; chi2 (evals,);
    n_ensembles: ensembles simulated; n_realisations: realisations simulated (the budget spent)."""

    theta: np.ndarray
    path: np.ndarray
    chi2: np.ndarray
    n_ensembles: int
    n_realisations: int


class _BudgetSpent(Exception):
    pass


def _profile_angle(sample: TensorSample, t, cinv):
    """α minimising χ² for one ensemble, in closed form: with the symmetrised tensor diag(a, a, b),
    Ĉ_ℓ(α) = b_ℓ + sin²α (a_ℓ − b_ℓ) is linear in s = sin²α, so χ²(s) is a parabola (s ∈ [0, 1])."""
    f = _symmetrise(sample.f[:, -1]).mean(0)
    a, b = np.asarray(f[0, 0, 1:]), np.asarray(f[2, 2, 1:])
    d = a - b
    dd = float(d @ cinv @ d)
    if not dd > 0:  # Ĉ_ℓ does not depend on α at all in this ensemble
        return 0.0
    s = float(np.clip(d @ cinv @ (t - b) / dd, 0.0, 1.0))
    return float(np.arcsin(np.sqrt(s)))


def fit_parameters_nelder_mead(
    target: ArrayLike,
    target_cov: ArrayLike,
    theta0: ArrayLike | Sequence[float],
    key: PRNGKeyArray,
    *,
    base: crjax.FieldParams,
    nside: int,
    t_end: float,
    dt: float,
    n_sim: int = 64,
    max_ensembles: int = 30,
    free: Sequence[str] = ("sigma2", "angle"),
    common_random_numbers: bool = True,
    profile_angle: bool = True,
    initial_step: float = 0.2,
) -> BaselineResult:
    """Gradient-free baseline to :func:`fit_parameters`: scipy Nelder–Mead on the same χ² =
    (t − μ)ᵀ C⁻¹ (t − μ), μ from ``n_sim`` realisations at θ (:func:`tensor_sample`), the same
    parametrisation (log σ², log rL, log γ, α), stopped when ``max_ensembles`` ensembles are spent.

    Ensembles are cached by (σ², rL, γ): the angle costs no simulation (tensor spectra), so only
    moves of the simulation parameters are counted. ``profile_angle``: α is not a simplex
    coordinate but minimised exactly for each ensemble (:func:`_profile_angle`; α ∈ [0, π/2], the
    spectrum is even in α and π-periodic) — the strongest gradient-free use of the same budget.
    ``common_random_numbers``: every ensemble uses ``key`` (a deterministic, if chaotic,
    objective; otherwise ``fold_in(key, i)`` for ensemble i, a noisy one that Nelder–Mead's
    comparisons mistake for structure). Returns the lowest-χ² point evaluated.
    """
    theta = _check_theta(theta0).copy()
    idx = _free_index(free)
    if int(max_ensembles) < 1 or int(n_sim) < 2:
        raise ValueError(f"max_ensembles must be >= 1 and n_sim >= 2; got {max_ensembles}, {n_sim}")
    t = np.asarray(target, dtype=float)
    cinv = np.linalg.inv(np.asarray(target_cov, dtype=float))
    sim_idx = [i for i in idx if i < 3]
    angle_free = 3 in idx
    simplex_idx = sim_idx if (profile_angle and angle_free) else idx
    if not simplex_idx:  # only the angle is free and it is profiled: one ensemble
        simplex_idx = []
    cache: dict[tuple, TensorSample] = {}
    path, chi2 = [], []

    def sample_at(th):
        k = tuple(float(x) for x in th[:3])
        if k not in cache:
            if len(cache) >= max_ensembles:
                raise _BudgetSpent
            sk = key if common_random_numbers else jax.random.fold_in(key, len(cache))
            cache[k] = tensor_sample(_params_for(base, th), sk, n_sim, nside, [t_end],
                                     rL=float(th[1]), dt=dt)
        return cache[k]

    def objective(v):
        u = _to_u(theta)
        u[simplex_idx] = v
        th = _from_u(u, theta)
        s = sample_at(th)
        if profile_angle and angle_free:
            th[3] = _profile_angle(s, t, cinv)
        r = t - spectrum_model(s, float(th[3])).mean
        val = float(r @ cinv @ r)
        path.append(th)
        chi2.append(val)
        return val

    v0 = _to_u(theta)[simplex_idx]
    try:
        if simplex_idx:
            simplex = np.vstack([v0] + [v0 + initial_step * np.eye(len(v0))[i]
                                        for i in range(len(v0))])
            scipy.optimize.minimize(objective, v0, method="Nelder-Mead",
                                    options={"initial_simplex": simplex, "xatol": 1e-3,
                                             "fatol": 1e-3, "maxfev": 100 * max_ensembles})
        else:
            objective(v0)
    except _BudgetSpent:
        pass
    path, chi2 = np.asarray(path), np.asarray(chi2)
    return BaselineResult(path[np.argmin(chi2)], path, chi2, len(cache), len(cache) * int(n_sim))


def compare_gradient_free(
    target: ArrayLike,
    target_cov: ArrayLike,
    truth: ArrayLike | Sequence[float],
    theta0: ArrayLike | Sequence[float],
    key: PRNGKeyArray,
    *,
    base: crjax.FieldParams,
    nside: int,
    t_end: float,
    dt: float,
    n_sim: int = 64,
    steps: int = 30,
    learning_rate: float = 0.05,
    free: Sequence[str] = ("sigma2", "angle"),
    n_data: int = 64,
    nm_n_sim: int | None = None,
    common_random_numbers: bool = True,
    profile_angle: bool = True,
) -> dict:
    """:func:`fit_parameters` (optax, stochastic score-function/exact-angle gradients) against
    :func:`fit_parameters_nelder_mead` with the same simulation budget, ``steps · n_sim``
    realisations for the estimate (the gradient fit spends another 4·n_sim on its Fisher interval).
    Nelder–Mead runs ``nm_n_sim`` realisations per ensemble (default ``n_sim``) and
    ``steps · n_sim // nm_n_sim`` ensembles. Returns, per method, θ̂, θ̂ − truth, the error in units
    of the gradient fit's Fisher σ (free components) and the realisations spent.
    """
    truth = _check_theta(truth)
    idx = _free_index(free)
    nm_n_sim = n_sim if nm_n_sim is None else int(nm_n_sim)
    budget = int(steps) * int(n_sim)
    grad = fit_parameters(target, target_cov, [float(x) for x in _check_theta(theta0)], key, base=base, nside=nside, t_end=t_end,
                          dt=dt, n_sim=n_sim, steps=steps, learning_rate=learning_rate,
                          free=free, n_data=n_data)
    nm = fit_parameters_nelder_mead(target, target_cov, _check_theta(theta0),
                                    jax.random.fold_in(key, 10**6),
                                    base=base, nside=nside, t_end=t_end, dt=dt, n_sim=nm_n_sim,
                                    max_ensembles=max(1, budget // nm_n_sim), free=free,
                                    common_random_numbers=common_random_numbers,
                                    profile_angle=profile_angle)
    sig = np.where(grad.sigma > 0, grad.sigma, np.nan)

    def row(theta, spent):
        err = theta - truth
        return {"theta": theta.tolist(), "error": err.tolist(),
                "error_over_sigma": {THETA[i]: float(err[i] / sig[i]) for i in idx},
                "n_realisations": int(spent)}

    return {"budget": budget,
            "fisher_sigma": {THETA[i]: float(grad.sigma[i]) for i in idx},
            "gradient": row(grad.theta, budget + 4 * n_sim),
            "nelder_mead": row(nm.theta, nm.n_realisations)}


def gradient_free_study(
    base: crjax.FieldParams,
    truth: ArrayLike | Sequence[float],
    theta0: ArrayLike | Sequence[float],
    *,
    nside: int,
    t_end: float,
    dt: float,
    n_data: int = 256,
    n_sim: int = 64,
    steps: Sequence[int] = (8, 16, 32),
    replicates: int = 4,
    learning_rate: float = 0.08,
    free: Sequence[str] = ("sigma2", "angle"),
    nm_n_sim: int | None = None,
    n_fisher: int = 512,
    seed: int = 0,
) -> dict:
    """What the gradients buy: :func:`compare_gradient_free` on ``replicates`` independent targets
    (``n_data`` held-out realisations each, keys never used by a fit) for each budget in ``steps``
    (``steps · n_sim`` realisations). Errors are in units of the Fisher σ at the truth from
    ``n_fisher`` realisations (raw, for ``n_data``), the same for both methods; returns every row
    and, per method and budget, the rms error (the target's own scatter, ≈ 1σ, is common to both).
    """
    truth = _check_theta(truth)
    idx = _free_index(free)
    key = jax.random.PRNGKey(seed)
    fs = tensor_sample(_params_for(base, truth), jax.random.fold_in(key, 1), n_fisher, nside,
                       [t_end], rL=float(truth[1]), dt=dt)
    fmat = fisher_matrix(spectrum_model(fs, float(truth[3])), n_data, [THETA[i] for i in idx],
                         debias=False)
    sig = np.zeros(4)
    sig[idx] = np.sqrt(np.diag(np.linalg.inv(fmat)))
    rows = []
    for rep in range(replicates):
        held = tensor_sample(_params_for(base, truth), jax.random.fold_in(key, 10**6 + rep),
                             n_data, nside, [t_end], rL=float(truth[1]), dt=dt)
        tm = spectrum_model(held, float(truth[3]))
        for s in steps:
            out = compare_gradient_free(
                tm.mean, tm.cov / n_data, truth, theta0, jax.random.fold_in(key, 1000 * rep + s),
                base=base, nside=nside, t_end=t_end, dt=dt, n_sim=n_sim, steps=s,
                learning_rate=learning_rate, free=free, n_data=n_data, nm_n_sim=nm_n_sim)
            for m in ("gradient", "nelder_mead"):
                err = np.asarray(out[m]["error"])
                rows.append({"replicate": rep, "steps": int(s), "method": m,
                             "n_realisations": out[m]["n_realisations"],
                             "theta": out[m]["theta"],
                             "z": {THETA[i]: float(err[i] / sig[i]) for i in idx}})
    summary = {}
    for m in ("gradient", "nelder_mead"):
        for s in steps:
            sel = [r for r in rows if r["method"] == m and r["steps"] == s]
            summary[f"{m}/{s}"] = {
                "n_realisations": int(np.mean([r["n_realisations"] for r in sel])),
                **{f"rms_z_{THETA[i]}": float(np.sqrt(np.mean([r["z"][THETA[i]] ** 2
                                                                for r in sel]))) for i in idx},
            }
    return {"fisher_sigma_at_truth": {THETA[i]: float(sig[i]) for i in idx},
            "summary": summary, "rows": rows}


# ----------------------------------------------------------------------------------------------
# the recovery study at a chosen size (issue 13, item 3: nside 16, 64 realisations, tΩ = 200)


def _main(argv=None) -> None:
    """``python -m inference.inverse OUT``: recover θ from a held-out synthetic target.

    The target (``--n-data`` realisations at the truth, key ``fold_in(seed, 1)``) and the Fisher
    ensemble at the truth (``--n-fisher``, key 2) are written to OUT as they finish and reused by a
    rerun (an interrupted study redoes only the fit, keys ≥ 3, which the target never sees). One
    JSON line: truth, estimate, 1σ, pulls, the Cramér–Rao 1σ at the truth, and the issue's aims
    (angle within 3°, σ² and rL within 10%)."""
    import argparse
    import json
    import pathlib
    import sys
    import time

    ap = argparse.ArgumentParser(description=_main.__doc__)
    ap.add_argument("out", type=pathlib.Path)
    ap.add_argument("--nside", type=int, default=16)
    ap.add_argument("--modes", type=int, default=64)
    ap.add_argument("--tomega", type=float, default=200.0)
    ap.add_argument("--rl", type=float, default=0.1)
    ap.add_argument("--angle", type=float, default=0.5, help="truth: angle(B0, ∇n) [rad]")
    ap.add_argument("--lmax", type=int, default=12)
    ap.add_argument("--n-data", type=int, default=64)
    ap.add_argument("--n-fisher", type=int, default=256)
    ap.add_argument("--n-sim", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--learning-rate", type=float, default=0.08)
    ap.add_argument("--free", nargs="+", default=["sigma2", "rL", "angle"])
    ap.add_argument("--start", type=float, nargs=4, default=None,
                    help="θ0 = σ², rL, γ, angle (default 0.6, 1.3 rL, 11/3, 0.9)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    crjax.use_cpu_cores()  # before anything runs JAX: the checks below do
    truth = np.array([1.0, a.rl, 11 / 3, a.angle])
    try:  # bad input: one line on stderr, exit 2, before anything is written
        idx = _free_index(a.free)
        _check_theta(truth)
        check_nside(a.nside)
        for name in ("lmax", "n_data", "n_fisher", "n_sim", "steps"):
            if getattr(a, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(a, name)}")
    except ValueError as err:
        ap.exit(2, f"python -m inference.inverse: {err}\n")
    a.out.mkdir(parents=True, exist_ok=True)
    base = crjax.FieldParams(n_modes=a.modes)
    t_end, dt = a.tomega * a.rl, a.rl / 20
    key = jax.random.PRNGKey(a.seed)
    t0 = time.perf_counter()

    def cached(name, n, k):
        path = a.out / f"{name}.npz"
        if path.exists():
            z = np.load(path)
            return SpectrumModel(*(z[f] for f in SpectrumModel._fields[:-1]), int(z["nreal"]))
        s = tensor_sample(base, jax.random.fold_in(key, k), n, a.nside, [t_end], rL=a.rl, dt=dt,
                          lmax=a.lmax)
        m = spectrum_model(s, a.angle)
        np.savez(path.with_suffix(".tmp.npz"), **m._asdict())
        path.with_suffix(".tmp.npz").replace(path)
        print(f"{name}: {n} realisations, {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        return m

    target = cached("target", a.n_data, 1)
    fisher_model = cached("fisher", a.n_fisher, 2)
    # Cramér–Rao 1σ, raw and with the Jacobian noise subtracted (None: not resolved, var <= 0)
    crb = {d: np.diag(np.linalg.inv(fisher_matrix(fisher_model, a.n_data, a.free, debias=d)))
           for d in (False, True)}

    def num(x):  # strict JSON: inf/NaN (an unresolved direction) as null
        return float(x) if np.isfinite(x) else None

    def progress(step, theta, chi2):
        print(f"step {step + 1}/{a.steps}: " + " ".join(f"{THETA[i]} {theta[i]:.4g}" for i in idx)
              + f"  chi2 {chi2:.1f}  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)

    start = np.array(a.start or [0.6, 1.3 * a.rl, 11 / 3, 0.9])
    fit = fit_parameters(target.mean, target.cov / a.n_data, start, jax.random.fold_in(key, 3),
                         base=base, nside=a.nside, t_end=t_end, dt=dt, n_sim=a.n_sim,
                         steps=a.steps, learning_rate=a.learning_rate, free=a.free,
                         n_data=a.n_data, lmax=a.lmax, on_step=progress)
    err = fit.theta - truth
    out = {
        "nside": a.nside, "modes": a.modes, "tomega": a.tomega, "lmax": a.lmax,
        "n_data": a.n_data, "n_sim": a.n_sim, "steps": a.steps, "n_fisher": a.n_fisher,
        "truth": {THETA[i]: float(truth[i]) for i in idx},
        "start": {THETA[i]: float(start[i]) for i in idx},
        "estimate": {THETA[i]: float(fit.theta[i]) for i in idx},
        "sigma": {THETA[i]: num(fit.sigma[i]) for i in idx},
        "pull": {THETA[i]: num(err[i] / fit.sigma[i]) if np.isfinite(fit.sigma[i]) else None
                 for i in idx},
        **{f"cramer_rao_at_truth{'_debiased' if d else '_raw'}": {
            THETA[i]: num(np.sqrt(v)) if v > 0 else None for i, v in zip(idx, var)}
           for d, var in crb.items()},
        "aims": {"angle_within_3deg": bool(abs(np.degrees(err[3])) <= 3.0) if 3 in idx else None,
                 **{f"{THETA[i]}_within_10pct": bool(abs(err[i]) <= 0.1 * truth[i])
                    for i in idx if i in (0, 1)}},
        "chi2_last": float(fit.chi2[-1]), "realisations_simulated":
            a.n_data + a.n_fisher + a.n_sim * a.steps + 4 * a.n_sim,
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    (a.out / "recovery.json").write_text(json.dumps(out, indent=1) + "\n")
    np.save(a.out / "path.npy", fit.path)
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    _main()
