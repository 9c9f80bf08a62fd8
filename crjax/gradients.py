"""Gradient estimators for ENSEMBLE statistics at chaotic horizons (docs/physics.md §8).

Pathwise derivatives of a backtracked trajectory grow like e^{λ_L T}: exact but useless once
λ_L T ≫ 1 (tΩ ≳ 30 at the seed's parameters). What is smooth is the ensemble mean
E_θ[f] of a per-realisation statistic f, here f_ℓ = C_ℓ − N (seed (2.2) and (3.1)), whose mean is the
seed's Ĉ_ℓ = ⟨C_ℓ⟩ − N. This module estimates dE_θ[f]/dθ without differentiating trajectories:

* **Score function (likelihood ratio).** With *Gaussian random mode amplitudes*
  (:func:`gaussian_amplitudes`), a_n = s_n (z₁ ξ̂_n + z₂ κ̂_n × ξ̂_n), z ~ N(0, 1), s_n² = A_n²/2
  (so E|a_n|² = A_n², the seed's amplitude), the parameters σ², γ, Lc enter only the amplitude
  density p(a; θ), and

      d/dθ E[f] = E[(f − b) ∂_θ log p(a; θ)],   ∂_θ log p = Σ_n (|a_n|²/(2 s_n²) − 1) ∂_θ log s_n²,

  for any baseline b independent of the sample (leave-one-out mean: :func:`score_function_gradient`).
* **rL by rescaling.** dx/dt = v, dv/dt = v × B(x)/rL is invariant under x = rL·y, t = rL·s, with
  the field's wavenumbers multiplied by rL. Keep the wavenumber grid fixed *in gyro units*
  (the grid λ_min, λ_max ∝ rL; amplitudes follow the spectrum at the moved k): then rL leaves the
  trajectories and enters only (i) the amplitude density (score, as above), (ii) the horizon
  S = T/rL (a time derivative of the map, bounded: dr(−T)/dT is a velocity) and (iii) the explicit
  scale δI = rL·y·g. Per realisation (:func:`rescaled_rl_gradient`)

      d E[f]/drL = E[(2/rL) f + (f − b) ∂_rL log p − (T/rL) ∂_T f].

  It differs from the seed's model (grid fixed in Lc) by the derivative with respect to a dilation of
  the wavenumber grid, which moves only the (weak) ends of the spectrum; that bias is measured
  (docs/gradients.md), not assumed.
* **Finite differences with common random numbers** (:func:`central_difference`), the reference.
* **Pathwise AD** (:func:`pathwise_gradient`), exact and useful only for λ_L T ≲ 3, and **truncated
  pathwise** gradients (:func:`truncated_pathwise_gradient`): only the last window of the trajectory
  is differentiated (biased; the bias is measured).

The Gaussian-amplitude option is a different (randomised-amplitude) field model from the seed's
fixed amplitudes; the seed's stays the default everywhere else in crjax.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

import crjax

from ._checks import check_int_at_least, check_positive
from .field import gaussian_amplitudes  # re-exported: the score-function field option

__all__ = [
    "THETA_NAMES",
    "EnsembleSample",
    "amplitude_score",
    "central_difference",
    "ensemble_sample",
    "gaussian_amplitudes",
    "mode_variances",
    "pathwise_gradient",
    "realisations_for_precision",
    "realise_gaussian_field",
    "rescaled_rl_gradient",
    "score_function_gradient",
    "spectrum_statistic",
    "truncated_pathwise_gradient",
    "with_theta",
]

#: Parameters θ the estimators know: σ², rL/Lc (Lc = 1), spectral index γ, bend-over scale Lc.
THETA_NAMES = ("sigma2", "rL", "gamma", "Lc")
_FOUR_PI = 4.0 * np.pi


# ----------------------------------------------------------------------------------------------
# Gaussian random mode amplitudes (a field option)


def realise_gaussian_field(key: PRNGKeyArray, params: crjax.FieldParams) -> crjax.TurbulentField:
    """One realisation with Gaussian mode amplitudes: ``realise_field`` with
    ``amplitude_law="gaussian"`` whatever ``params`` says (directions and phases from
    ``fold_in(key, 0)``, the amplitudes' normals from ``fold_in(key, 1)``); usable as
    ``run_ensemble(..., realise=realise_gaussian_field)``.
    """
    return crjax.realise_field(key, _with_law(params, "gaussian"))


def _with_law(params: crjax.FieldParams, law: str) -> crjax.FieldParams:
    return params if params.amplitude_law == law else dataclasses.replace(params, amplitude_law=law)


def mode_variances(params: crjax.FieldParams) -> Float[Array, " n"]:
    """Per-component variances s_n² = A_n²/2 of the Gaussian amplitudes (seed §3 amplitudes).

    A_n² = 2σ²B0² G_n/ΣG_m depends on θ only (not on the key); differentiable in the params' leaves.
    """
    field = crjax.realise_field(jax.random.PRNGKey(0), _with_law(params, "fixed"))
    return 0.5 * jnp.sum(field.amplitudes**2, axis=-1)


def with_theta(params: crjax.FieldParams, name: str, value, rL0: float) -> crjax.FieldParams:
    """FieldParams with θ-component ``name`` set to ``value`` (for the amplitude density only).

    ``"rL"`` moves the wavenumber grid with rL (λ_min, λ_max × value/rL0): the gyro-unit grid of
    the rescaling (module docstring), so only the amplitudes at the moved k change.
    """
    if name == "sigma2":
        return eqx.tree_at(lambda p: p.sigma2, params, value)
    if name == "gamma":
        return eqx.tree_at(lambda p: p.spectrum.gamma, params, value)
    if name == "Lc":
        return eqx.tree_at(lambda p: p.Lc, params, value)
    if name == "rL":
        scale = value / rL0
        return eqx.tree_at(
            lambda p: (p.lmin, p.lmax), params, (params.lmin * scale, params.lmax * scale)
        )
    raise ValueError(f"name must be one of {THETA_NAMES}; got {name!r}")


def _theta_value(params, name, rL0):
    return {
        "sigma2": lambda: params.sigma2,
        "gamma": lambda: params.spectrum.gamma,
        "Lc": lambda: params.Lc,
        "rL": lambda: rL0,
    }[name]()


def _check_names(names):
    names = tuple(names)
    if not names or any(n not in THETA_NAMES for n in names):
        raise ValueError(f"names must be a non-empty subset of {THETA_NAMES}; got {names!r}")
    return names


def amplitude_score(
    amplitudes: Float[Array, "n 3"],
    params: crjax.FieldParams,
    names: Sequence[str] = ("sigma2",),
    *,
    rL0: float = 0.1,
) -> Float[Array, " k"]:
    """∂_θ log p(a; θ) = Σ_n (|a_n|²/(2 s_n²) − 1) ∂_θ log s_n² for each θ in ``names`` (module doc).

    ``amplitudes``: a field's Gaussian amplitudes a_n (n, 3). ``rL0``: the gyroradius of the run
    (for ``"rL"``). Returns shape (len(names),).
    """
    names = _check_names(names)
    a2 = jnp.sum(amplitudes**2, axis=-1)

    def log_p(values):
        p = params
        for nm, v in zip(names, values):
            p = with_theta(p, nm, v, rL0)
        s2 = mode_variances(p)
        return jnp.sum(-a2 / (2.0 * s2) - jnp.log(s2))

    theta0 = jnp.asarray([_theta_value(params, n, rL0) for n in names], a2.dtype)
    return jax.grad(log_p)(theta0)


# ----------------------------------------------------------------------------------------------
# the per-realisation statistic f_ℓ = C_ℓ − N and its time derivative


def _f_of_maps(maps, lmax):
    npix = maps.shape[-1]
    cl = crjax.power_spectrum(maps, lmax=lmax)
    # N (3.1) = (4π/Npix)·2T·g·K·g with K = ⟨r r⟩/(2T) is (4π/Npix)·⟨(r·g)²⟩: linear in the ensemble,
    # so the mean of this per-realisation value is the seed's N exactly (tests/test_gradients.py).
    noise = (_FOUR_PI / npix) * jnp.mean(maps * maps, axis=-1)
    return cl - noise[..., None]


def spectrum_statistic(
    positions: Float[Array, "... npix 3"],
    velocities: Float[Array, "... npix 3"],
    g: ArrayLike | Sequence[float],
    lmax: int,
) -> tuple[Float[Array, "... L"], Float[Array, "... L"]]:
    """(f_ℓ, ∂_T f_ℓ) per map: f_ℓ = C_ℓ − N (seed (2.2), (3.1)), so E[f_ℓ] = Ĉ_ℓ.

    ``positions`` r(−T), ``velocities`` p̂(−T) as in ``Trajectory``; dr(−T)/dT = −p̂(−T) (the
    backtracked antiparticle moves with −p̂), so ∂_T f is a jvp of f along −p̂·g: bounded, no chaos.
    """
    g = jnp.asarray(g, positions.dtype)
    maps = positions @ g
    dmaps = -(velocities @ g)
    return jax.jvp(functools.partial(_f_of_maps, lmax=lmax), (maps,), (dmaps,))


class EnsembleSample(eqx.Module):
    """Per-realisation statistics of one ensemble (realisations on the leading axis).

    f: (nreal, ntimes, L) f_ℓ = C_ℓ − N; dfdT: ∂_T f; score: (nreal, k) amplitude scores for
    ``names``; times: (ntimes,); rL: the run's gyroradius; names: the score's θ names.
    """

    f: Float[Array, "nreal ntimes L"]
    dfdT: Float[Array, "nreal ntimes L"]
    score: Float[Array, "nreal k"]
    times: Float[Array, " ntimes"]
    rL: float = eqx.field(static=True)
    names: tuple[str, ...] = eqx.field(static=True)


@functools.cache
def _reducer(g: tuple, lmax: int):
    def reduce(traj):
        return spectrum_statistic(traj.positions, traj.velocities, jnp.asarray(g), lmax)

    return reduce


def ensemble_sample(
    params: crjax.FieldParams,
    key: PRNGKeyArray,
    n_realisations: int,
    nside: int,
    times: ArrayLike | Sequence[float],
    *,
    rL: float,
    dt: float,
    g: Sequence[float] = (0.0, 0.0, 1.0),
    lmax: int | None = None,
    names: Sequence[str] = ("sigma2", "rL"),
    gaussian: bool = True,
    chunk_size: int = 8,
) -> EnsembleSample:
    """Run an ensemble (``crjax.run_ensemble``) and keep f_ℓ, ∂_T f_ℓ and the amplitude scores.

    ``gaussian``: Gaussian amplitudes (:func:`realise_gaussian_field`, needed for the scores) or the
    seed's fixed ones (scores are then zero and meaningless). Realisation r uses
    ``fold_in(key, r)``, so two calls with the same key share their random numbers (CRN).
    """
    check_int_at_least("n_realisations", n_realisations, 1)
    check_positive("rL", rL)
    check_positive("dt", dt)
    names = _check_names(names)
    lmax = 3 * nside - 1 if lmax is None else lmax
    realise = realise_gaussian_field if gaussian else _seed_realise
    f, dfdT = crjax.run_ensemble(
        params,
        key,
        n_realisations,
        nside,
        jnp.asarray(times),
        rL=rL,
        dt=dt,
        chunk_size=chunk_size,
        reducer=_reducer(tuple(float(x) for x in g), lmax),
        realise=realise,
    )
    if gaussian:
        score = _scores(params, key, n_realisations, names, float(rL))
    else:
        score = jnp.zeros((n_realisations, len(names)), f.dtype)
    return EnsembleSample(f, dfdT, score, jnp.asarray(times), float(rL), names)


def _seed_realise(key, params):
    return crjax.realise_field(jax.random.fold_in(key, 0), _with_law(params, "fixed"))


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _scores(params, key, n, names, rL0):
    def one(i):
        field = realise_gaussian_field(jax.random.fold_in(key, i), params)
        return amplitude_score(field.amplitudes, params, names, rL0=rL0)

    return jax.vmap(one)(jnp.arange(n))


# ----------------------------------------------------------------------------------------------
# estimators: per-realisation samples whose mean is the gradient


def _loo_centre(f):
    """f_r − (leave-one-out mean of the others) = R/(R−1)·(f_r − f̄)."""
    n = f.shape[0]
    if n < 2:
        raise ValueError(f"the sample needs >= 2 realisations for a baseline; got {n}")
    return (f - jnp.mean(f, axis=0, keepdims=True)) * (n / (n - 1))


def score_function_gradient(sample: EnsembleSample, name: str) -> Float[Array, "nreal ntimes L"]:
    """Per-realisation samples (f_r − b_{−r})·∂_θ log p_r of dE[f]/dθ, θ ∈ {σ², γ, Lc}.

    b_{−r}: leave-one-out mean (independent of sample r, so the mean stays unbiased). The gradient
    is the mean over the leading axis; its standard error std/√nreal.
    """
    if name not in sample.names or name == "rL":
        raise ValueError(f"name must be one of the sample's amplitude parameters "
                         f"{tuple(n for n in sample.names if n != 'rL')}; got {name!r}")
    s = sample.score[:, sample.names.index(name)]
    return _loo_centre(sample.f) * s[:, None, None]


def rescaled_rl_gradient(sample: EnsembleSample) -> Float[Array, "nreal ntimes L"]:
    """Per-realisation samples of dE[f]/drL by the gyro-unit rescaling (module docstring):
    (2/rL) f + (f − b_{−r}) ∂_rL log p − (T/rL) ∂_T f, at fixed save times T."""
    if "rL" not in sample.names:
        raise ValueError(f"the sample has no 'rL' score (names={sample.names})")
    s = sample.score[:, sample.names.index("rL")]
    rL = sample.rL
    t = sample.times[None, :, None]
    return (2.0 / rL) * sample.f + _loo_centre(sample.f) * s[:, None, None] - (t / rL) * sample.dfdT


def central_difference(
    plus: EnsembleSample, minus: EnsembleSample, h: float
) -> Float[Array, "nreal ntimes L"]:
    """Per-pair samples (f(θ+h) − f(θ−h))/(2h); with common random numbers (same key) the pairs
    share their fields, which lowers the variance only as far as chaos lets them stay correlated."""
    check_positive("h", h)
    if plus.f.shape != minus.f.shape:
        raise ValueError(f"plus and minus samples must have the same shape; got "
                         f"{plus.f.shape} and {minus.f.shape}")
    return (plus.f - minus.f) / (2.0 * h)


# ----------------------------------------------------------------------------------------------
# pathwise (and truncated pathwise) derivatives of one realisation


def _params_at(params, names, theta, rL0):
    """FieldParams and rL with θ applied (here rL moves the dynamics, not the grid)."""
    rL = rL0
    for nm, v in zip(names, theta):
        if nm == "rL":
            rL = v
        else:
            params = with_theta(params, nm, v, rL0)
    return params, rL


def pathwise_gradient(
    params: crjax.FieldParams,
    key: PRNGKeyArray,
    nside: int,
    times: ArrayLike | Sequence[float],
    *,
    rL: float,
    dt: float,
    names: Sequence[str] = ("sigma2", "rL"),
    g: Sequence[float] = (0.0, 0.0, 1.0),
    lmax: int | None = None,
    gaussian: bool = True,
) -> tuple[Float[Array, "ntimes L"], Float[Array, "ntimes L k"]]:
    """(f_ℓ, ∂f_ℓ/∂θ) of ONE realisation by forward-mode AD through the trajectories.

    Exact for that realisation; its variance grows like e^{2λ_L T} (docs/physics.md §8), so it is
    only useful for λ_L T ≲ 3. Forward mode (``diffrax.ForwardMode``): memory independent of the
    number of steps. Here rL enters the dynamics (the seed's model), dt stays fixed.
    """
    names = _check_names(names)
    lmax = 3 * nside - 1 if lmax is None else lmax
    directions = crjax.healpix_directions(nside)
    times = np.asarray(times, dtype=float)  # concrete: the step grid is fixed (also under jit)
    gv = jnp.asarray(g, directions.dtype)
    realise = realise_gaussian_field if gaussian else _seed_realise

    def f(theta):
        p, rl = _params_at(params, names, theta, rL)
        field = realise(key, p)
        traj = crjax.backtrack(field, directions, times, rL=rl, dt=dt,
                               adjoint=diffrax.ForwardMode(), devices=1)
        return _f_of_maps(traj.positions @ gv, lmax)

    theta0 = jnp.asarray([_theta_value(params, n, rL) for n in names], directions.dtype)
    return f(theta0), jax.jacfwd(f)(theta0)


def truncated_pathwise_gradient(
    params: crjax.FieldParams,
    key: PRNGKeyArray,
    nside: int,
    t_end: float,
    window: float,
    *,
    rL: float,
    dt: float,
    names: Sequence[str] = ("sigma2", "rL"),
    g: Sequence[float] = (0.0, 0.0, 1.0),
    lmax: int | None = None,
    gaussian: bool = True,
) -> tuple[Float[Array, " L"], Float[Array, "L k"]]:
    """(f_ℓ(T), truncated ∂f_ℓ/∂θ) of one realisation: the state at T − window is held fixed
    (its θ-dependence dropped) and only the last ``window`` of the path is differentiated.

    Variance bounded by e^{2λ_L·window}; biased by the dropped part (measured in docs/gradients.md).
    """
    names = _check_names(names)
    check_positive("window", window)
    check_positive("t_end", t_end)
    if not float(window) < float(t_end):
        raise ValueError(f"window must be < t_end (allowed range (0, {t_end})); got {window}")
    lmax = 3 * nside - 1 if lmax is None else lmax
    directions = crjax.healpix_directions(nside)
    realise = realise_gaussian_field if gaussian else _seed_realise
    dtype = directions.dtype
    gv = jnp.asarray(g, dtype)
    t_mid = float(t_end) - float(window)
    field0 = realise(key, params)
    mid = crjax.backtrack(field0, directions, np.asarray([t_mid]), rL=rL, dt=dt, devices=1)
    x_mid, p_mid = mid.positions[0], mid.velocities[0]

    def f(theta):
        p, rl = _params_at(params, names, theta, rL)
        field = realise(key, p)
        # continue the antiparticle (charge −1, velocity −p̂(−T)) from the frozen state
        tr = crjax.propagate(field, x_mid, -p_mid, np.asarray([float(window)]), rL=rl,
                             charge=-1.0, dt=dt, adjoint=diffrax.ForwardMode(), devices=1)
        return _f_of_maps(tr.positions[0] @ gv, lmax)

    theta0 = jnp.asarray([_theta_value(params, n, rL) for n in names], dtype)
    return f(theta0), jax.jacfwd(f)(theta0)


# ----------------------------------------------------------------------------------------------
# cosmic variance


def realisations_for_precision(
    samples: Float[ArrayLike, "nreal ..."], precision: float = 0.2
) -> Float[Array, ...]:
    """Realisations needed for the mean of per-realisation ``samples`` to reach relative standard
    error ``precision``: (std/(precision·|mean|))² (the cosmic-variance floor of an estimator)."""
    check_positive("precision", precision)
    x = jnp.asarray(samples)
    if x.ndim < 1 or x.shape[0] < 2:
        raise ValueError(f"samples needs a leading axis of length >= 2; got shape {x.shape}")
    m = jnp.mean(x, axis=0)
    s = jnp.std(x, axis=0, ddof=1)
    return (s / (precision * jnp.abs(m))) ** 2
