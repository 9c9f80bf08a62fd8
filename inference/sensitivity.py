"""dp/dθ: how the fitted BGK exponent p moves with the field parameters (issue 13, item 4).

**The fit.** For a data vector Ĉ_ℓ (ℓ in ``ell``) and a *fixed* precision matrix W, the generalised
least-squares BGK fit is

    p̂(Ĉ) = argmin_p min_A (Ĉ − A f_p)ᵀ W (Ĉ − A f_p),      f_p = bgk_spectrum(ℓ, p)   (seed (4.7)),

with A profiled out exactly (``inference.likelihoods.profiled_chi2``: χ²_min(p) = ĈᵀWĈ − (f_pᵀWĈ)²/f_pᵀWf_p).
:func:`gls_fit` finds the stationary point g(p, Ĉ) = ∂_p χ²_min / ĈᵀWĈ = 0 (the scale makes the
tolerance dimensionless and leaves the root and its derivative unchanged) by Newton's method
(``optimistix.root_find``) started from the best point of a 250-point grid in p ∈ [1e-3, 1 − 1e-3], the
range ``inference.covariance_fit`` searches. Its derivative is taken by **implicit differentiation**
(``optimistix.ImplicitAdjoint``, a lineax solve of the 1 × 1 linearised system): by the implicit function
theorem

    dp̂/dĈ = −(∂_p g)⁻¹ ∂_Ĉ g,

exact at the root, with no derivative of the Newton iterations or of the grid.
With W = the Hartlap precision of the same ensemble, p̂ is ``inference.covariance_fit.fit_p_covariance``'s
point estimate (``tests/test_sensitivity.py``).

**Composition with ensemble gradients.** The estimand is p(θ) = p̂(E_θ[f]), f_ℓ = C_ℓ − N the
per-realisation statistic whose mean is the seed's Ĉ_ℓ (``crjax.gradients``; with ``npix=`` the sample
functions below add the self-consistent offset δ̂_r of ``crjax.spectrum_estimate``, whose mean is the
unbiased S_ℓ the pipeline fits), so

    dp/dθ = ∇p̂(E_θ[f]) · dE_θ[f]/dθ.

Given per-realisation f^(r) (R, L) and per-realisation derivative samples d^(r) (R, L[, k]) whose mean is
dE[f]/dθ (score function for σ² and γ, the gyro rescaling for rL, central differences with common random
numbers for anything: ``crjax.gradients``; the exact ∂/∂α of the tensor spectra for the angle α between
∇n and B0: :func:`tensor_derivative_samples`), :func:`p_sensitivity` returns the **delta-method** estimate

    x_r = ∇p̂(f̄) · d^(r) + (∇²p̂(f̄) d̄) · (f^(r) − f̄),     dp/dθ = mean_r x_r = ∇p̂(f̄)·d̄,
    SE = std_r(x_r)/√R,

where the second term is the noise of ∇p̂ itself (it is evaluated at the noisy f̄: the delta method for
a function of the two means f̄ and d̄; ∇²p̂ d̄ by central differences of the implicit gradient). It is not
small where d^(r) moves with f^(r): for the exact angle derivative a realisation's overall amplitude
scatter moves d^(r) but never p̂ (∇p̂·Ĉ = 0), and the first term alone overstated the error 4–14×
(nside 4, tΩ = 50 and 200, α = 0.5, 256 realisations); with it, the delta method and the jackknife
agree to 2% (1024 realisations).

The **jackknife** over realisations is the check: x_(−r) = ∇p̂(f̄_(−r)) · d̄_(−r) from the R leave-one-out
means (the fit redone at each), SE_jk² = (R−1)/R Σ_r (x_(−r) − x̄_(·))². It needs no derivative of ∇p̂ and
agrees with the delta method where the fit is smooth over the spread of the leave-one-out means; a
leave-one-out fit that jumps to another minimum of the profile shows up as a jackknife SE far above the
delta method's. The same is done for p̂ itself (delta-method SE: std_r(∇p̂ · f^(r))/√R).

**W is held fixed** (not differentiated, and the same at every θ a finite-difference check compares):
p(θ) is the W-weighted fit's functional. Re-estimating W at each θ adds ∂p̂/∂W · dW/dθ, which is
proportional to the residual Ĉ − Â f_p̂ (for data that BGK fits exactly, p̂ does not depend on W at all),
so it is second order where BGK fits.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optimistix as optx
from jaxtyping import Array, ArrayLike, Bool, Float

import crjax
from crjax import gradients as G
from crjax.theory import bgk_spectrum
from inference import inverse
from inference.likelihoods import hartlap_precision, profiled_chi2

__all__ = [
    "GLSFit",
    "PSensitivity",
    "ensemble_derivative_samples",
    "fit_p",
    "fit_p_gradient",
    "gls_fit",
    "p_finite_difference",
    "p_sensitivity",
    "precision_of_mean",
    "tensor_derivative_samples",
]

_P_LO, _P_HI = 1e-3, 1.0 - 1e-3  # the range inference.covariance_fit searches
_N_GRID = 250  # spacing 4e-3: Newton's basin around a smooth profile's minimum is far wider
# Newton stops when the step is below 1e-12 (+ 1e-12·p) and |g| < 1e-12: p̂ to round-off
_NEWTON = optx.Newton(rtol=1e-12, atol=1e-12)
_MAX_STEPS = 64


class GLSFit(NamedTuple):
    """The fit at one Ĉ: p̂, Â (the model's C_1), χ²_min(p̂) = (Ĉ − Â f)ᵀW(Ĉ − Â f) and ``converged``:
    Newton succeeded inside (1e-3, 1 − 1e-3) at a point no worse than the grid's best (so a minimum,
    not a maximum, to round-off of ĈᵀWĈ). Where it is False (no interior minimum: e.g. a spectrum BGK
    cannot describe, whose profile falls to an edge) p̂, Â, χ² are those of the grid's best point and
    dp̂/dĈ is zero: the stationarity condition does not hold there."""

    p: Float[Array, ""]
    amplitude: Float[Array, ""]
    chi2: Float[Array, ""]
    converged: Bool[Array, ""]


class PSensitivity(NamedTuple):
    """:func:`p_sensitivity`'s result (module docstring). ``dp_dtheta``, ``se``, ``se_jackknife``:
    shape (k,) (scalars when the derivative samples had no k axis); ``contributions`` (R, k) the
    per-realisation x_r; ``dp_dc`` (L,) ∇p̂ at the mean; ``p_se``, ``p_se_jackknife`` the standard error
    of p̂; ``converged``: every fit (the full mean and the R leave-one-out ones) converged."""

    p: float
    p_se: float
    p_se_jackknife: float
    amplitude: float
    chi2: float
    dp_dc: np.ndarray
    dp_dtheta: np.ndarray
    se: np.ndarray
    se_jackknife: np.ndarray
    contributions: np.ndarray
    converged: bool


# ----------------------------------------------------------------------------------------------
# the fit and its implicit derivative


def _chi2(p, c, w, ell):
    return profiled_chi2(bgk_spectrum(ell, p), c, w)


def _stationarity(p, args):
    c, w, ell = args
    return jax.grad(lambda q: _chi2(q, c, w, ell)[0])(p) / (c @ w @ c)


def _gls_fit_core(c, w, ell):
    grid = jnp.linspace(_P_LO, _P_HI, _N_GRID, dtype=c.dtype)
    chi2_grid, _ = _chi2(grid[:, None], c, w, ell[None, :])  # (n_grid, L) shapes
    p0 = jax.lax.stop_gradient(grid[jnp.argmin(chi2_grid)])
    sol = optx.root_find(
        _stationarity,
        _NEWTON,
        p0,
        args=(c, w, ell),
        options={"lower": jnp.asarray(_P_LO, c.dtype), "upper": jnp.asarray(_P_HI, c.dtype)},
        max_steps=_MAX_STEPS,
        adjoint=optx.ImplicitAdjoint(),
        throw=False,
    )
    p = sol.value
    chi2, amp = _chi2(p, c, w, ell)
    p_ = jax.lax.stop_gradient(p)
    # an interior minimum: Newton from the grid's best point converged, inside the searched range,
    # and no worse than that grid point (a stationary point that is a maximum would be)
    edge = 1e-9
    converged = (
        (sol.result == optx.RESULTS.successful)
        & (p_ > _P_LO + edge)
        & (p_ < _P_HI - edge)
        & (jax.lax.stop_gradient(chi2) <= jnp.min(chi2_grid) + 1e-9 * jax.lax.stop_gradient(c @ w @ c))
    )
    # no interior minimum (the profile falls to an edge of the range, or Newton left the grid's basin):
    # report the grid's best point and its Â, χ² (and a zero derivative) rather than the last iterate
    chi2_0, amp_0 = _chi2(p0, c, w, ell)
    return GLSFit(jnp.where(converged, p, p0), jnp.where(converged, amp, amp_0),
                  jnp.where(converged, chi2, chi2_0), converged)


def _fit_and_grad_core(c, w, ell):
    def p_of(cc):
        fit = _gls_fit_core(cc, w, ell)
        return fit.p, fit

    grad, fit = jax.grad(p_of, has_aux=True)(c)
    return fit, grad


# ONE compiled program serves every fit: its compile (seconds, dominated by the second derivatives of
# log Γ in bgk_spectrum) dwarfs the run time (~3 ms per fit on CPU), so a gradient is always computed and
# the jackknife loops over it in Python rather than compiling a vmapped (batched while-loop) twin
_fit_and_grad = jax.jit(_fit_and_grad_core)


def _as_ell(ell) -> np.ndarray:
    e = np.asarray(ell)
    if (e.ndim != 1 or e.size < 3 or not np.issubdtype(e.dtype, np.number)
            or not np.all(np.isfinite(e))):
        raise ValueError(f"ell must be a 1-D array of at least 3 multipoles >= 1; got {ell!r}")
    if not np.all(e == np.round(e)) or np.any(e < 1) or np.any(np.diff(e) <= 0):
        raise ValueError(f"ell must be strictly increasing integers >= 1; got {ell!r}")
    return e.astype(float)


def _check_precision(precision, n):
    w = np.asarray(precision, dtype=float)
    if w.shape != (n, n) or not np.all(np.isfinite(w)):
        raise ValueError(f"precision must be a finite ({n}, {n}) matrix; got shape {w.shape}")
    if np.max(np.abs(w - w.T)) > 1e-10 * np.max(np.abs(w)):
        raise ValueError("precision must be symmetric")
    if np.linalg.eigvalsh(0.5 * (w + w.T))[0] <= 0:
        raise ValueError("precision must be positive definite")
    return w


def _check_estimate(estimate, n):
    c = np.asarray(estimate, dtype=float)
    if c.shape != (n,) or not np.all(np.isfinite(c)):
        raise ValueError(f"estimate must be a finite array of shape ({n},) (one value per ell); "
                         f"got shape {c.shape}")
    if not np.any(c != 0):
        raise ValueError("estimate must not be all zero (the BGK fit has no shape to fit)")
    return c


def gls_fit(
    estimate: ArrayLike, precision: ArrayLike, ell: ArrayLike
) -> GLSFit:
    """The GLS BGK fit of ``estimate`` Ĉ_ℓ (L,) with the fixed ``precision`` W (L, L) at multipoles
    ``ell`` (L ≥ 3 strictly increasing integers ≥ 1): p̂, Â, χ²_min, converged (module docstring).

    This entry validates its (concrete) input; for derivatives use :func:`fit_p` under ``jax.grad`` /
    ``jax.jvp`` (implicit differentiation in Ĉ and W) or :func:`fit_p_gradient`.
    """
    e = _as_ell(ell)
    c = _check_estimate(estimate, e.size)
    w = _check_precision(precision, e.size)
    return _fit_and_grad(jnp.asarray(c), jnp.asarray(w), jnp.asarray(e))[0]


def fit_p(
    estimate: ArrayLike, precision: ArrayLike, ell: ArrayLike
) -> Float[Array, ""]:
    """p̂ of :func:`gls_fit`. Under ``jax.grad``/``jax.jvp``/``jit`` (traced ``estimate`` or ``precision``)
    the checks are skipped and the derivative is the implicit one (forward and reverse mode)."""
    if isinstance(estimate, jax.core.Tracer) or isinstance(precision, jax.core.Tracer):
        e = jnp.asarray(_as_ell(ell))
        return _gls_fit_core(jnp.asarray(estimate), jnp.asarray(precision), e).p
    return gls_fit(estimate, precision, ell).p


def fit_p_gradient(
    estimate: ArrayLike, precision: ArrayLike, ell: ArrayLike
) -> tuple[GLSFit, Float[Array, " L"]]:
    """(the fit, dp̂/dĈ) at ``estimate`` by implicit differentiation (module docstring)."""
    e = _as_ell(ell)
    c = _check_estimate(estimate, e.size)
    w = _check_precision(precision, e.size)
    return _fit_and_grad(jnp.asarray(c), jnp.asarray(w), jnp.asarray(e))


def precision_of_mean(samples: ArrayLike) -> Float[np.ndarray, "L L"]:
    """W = Hartlap-corrected inverse of the covariance of the mean of ``samples`` (R per-realisation
    estimates, R ≥ L + 3): the weighting ``inference.covariance_fit`` uses (p̂ does not depend on
    the overall scale of W)."""
    x = np.asarray(samples, dtype=float)
    if x.ndim != 2 or x.shape[0] < 2:
        raise ValueError(f"samples must have shape (R, L) with R >= 2; got {x.shape}")
    return hartlap_precision(np.cov(x, rowvar=False, ddof=1) / x.shape[0], x.shape[0])


# ----------------------------------------------------------------------------------------------
# composition with per-realisation derivative samples


def _jk_se(x):
    n = x.shape[0]
    return np.sqrt((n - 1) / n * np.sum((x - x.mean(0)) ** 2, axis=0))


def p_sensitivity(
    samples: ArrayLike,
    derivative_samples: ArrayLike,
    ell: ArrayLike,
    *,
    precision: ArrayLike | None = None,
) -> PSensitivity:
    """dp/dθ of the GLS BGK fit from per-realisation statistics (module docstring).

    ``samples``: f_ℓ^(r) (R, L) at multipoles ``ell``; ``derivative_samples``: d^(r) (R, L) or (R, L, k)
    with mean dE[f]/dθ for k parameters (``crjax.gradients`` estimators, or
    :func:`ensemble_derivative_samples` / :func:`tensor_derivative_samples`); ``precision``: the fixed W
    (default :func:`precision_of_mean` of ``samples``; pass the same W to compare fits at several θ).

    Returns the delta-method dp/dθ = mean_r ∇p̂(f̄)·d^(r) with SE = std_r/√R, and the jackknife SE over
    realisations (the check: the fit is redone at each leave-one-out mean).
    """
    e = _as_ell(ell)
    c = np.asarray(samples, dtype=float)
    if c.ndim != 2 or c.shape[1] != e.size or c.shape[0] < 3:
        raise ValueError(f"samples must have shape (R, {e.size}) with R >= 3; got {c.shape}")
    d = np.asarray(derivative_samples, dtype=float)
    scalar = d.ndim == 2
    if scalar:
        d = d[..., None]
    if d.ndim != 3 or d.shape[:2] != c.shape:
        raise ValueError(f"derivative_samples must have shape {c.shape} or {c.shape + ('k',)}; "
                         f"got {np.shape(derivative_samples)}")
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(d))):
        raise ValueError("samples and derivative_samples must be finite")
    n = c.shape[0]
    w = precision_of_mean(c) if precision is None else _check_precision(precision, e.size)
    cbar = _check_estimate(c.mean(0), e.size)
    # row 0: the fit at the mean; rows 1..R: at the leave-one-out means (the jackknife)
    c_loo = (n * cbar[None] - c) / (n - 1)
    d_loo = (n * d.mean(0)[None] - d) / (n - 1)
    wj, ej = jnp.asarray(w), jnp.asarray(e)
    out = [_fit_and_grad(jnp.asarray(row), wj, ej) for row in np.concatenate([cbar[None], c_loo])]
    fits = jax.tree_util.tree_map(lambda *a: np.stack(a), *[o[0] for o in out])
    grads = np.stack([np.asarray(o[1]) for o in out])
    p_all = np.asarray(fits.p)
    grad = grads[0]
    # the delta method for g(f̄, d̄) = ∇p̂(f̄)·d̄, a function of two means: per-realisation influence
    # ∇p̂·d^(r) + (∇²p̂ d̄)·(f^(r) − f̄). The second term matters where d^(r) moves with f^(r) (the exact
    # angle derivative: a realisation's amplitude scatter moves d^(r) but never p̂, since ∇p̂·Ĉ = 0).
    # ∇²p̂ d̄ by central differences of the implicit gradient along d̄ (step 1e-4 of |f̄|: truncation
    # ~1e-8, the fits' 1e-12 tolerance adds ~1e-8 relative) — no second compile.
    dbar = d.mean(0)
    hess_d = np.zeros_like(dbar)
    for k in range(dbar.shape[1]):
        v = dbar[:, k]
        if np.any(v != 0):
            eps = 1e-4 * np.linalg.norm(cbar) / np.linalg.norm(v)
            gp = np.asarray(_fit_and_grad(jnp.asarray(cbar + eps * v), wj, ej)[1])
            gm = np.asarray(_fit_and_grad(jnp.asarray(cbar - eps * v), wj, ej)[1])
            hess_d[:, k] = (gp - gm) / (2 * eps)
    x = np.einsum("l,rlk->rk", grad, d) + (c - cbar) @ hess_d
    x_loo = np.einsum("rl,rlk->rk", grads[1:], d_loo)
    sq = (lambda a: a[0]) if scalar else (lambda a: a)
    return PSensitivity(
        p=float(p_all[0]),
        p_se=float(np.std(c @ grad, ddof=1) / np.sqrt(n)),
        p_se_jackknife=float(_jk_se(p_all[1:])),
        amplitude=float(fits.amplitude[0]),
        chi2=float(fits.chi2[0]),
        dp_dc=grad,
        dp_dtheta=sq(x.mean(0)),
        se=sq(np.std(x, axis=0, ddof=1) / np.sqrt(n)),
        se_jackknife=sq(_jk_se(x_loo)),
        contributions=x,
        converged=bool(np.all(np.asarray(fits.converged))),
    )


def p_finite_difference(
    plus: ArrayLike,
    minus: ArrayLike,
    h: float,
    ell: ArrayLike,
    *,
    precision: ArrayLike,
    paired: bool = False,
) -> tuple[float, float]:
    """The reference for :func:`p_sensitivity`: (p̂(θ+h) − p̂(θ−h))/(2h) and its standard error, from
    per-realisation f at θ ± h (both fitted with the same fixed ``precision``).

    ``paired=False``: independent ensembles, SE² = (SE₊² + SE₋²)/(2h)² with each SE by the delta
    method (std_r ∇p̂·f^(r)/√R). ``paired=True``: common random numbers (realisation r of both with the
    same key, R equal): SE = std_r(∇p̂₊·f₊^(r) − ∇p̂₋·f₋^(r))/(2h√R), which keeps their correlation.
    The O(h²) curvature of p(θ) is not in the SE.
    """
    if not (np.isfinite(h) and h > 0):
        raise ValueError(f"h must be finite and > 0 (allowed range: (0, inf)); got {h!r}")
    e = _as_ell(ell)
    w = jnp.asarray(_check_precision(precision, e.size))
    parts = []
    for name, x in (("plus", plus), ("minus", minus)):
        x = np.asarray(x, dtype=float)
        if x.ndim != 2 or x.shape[1] != e.size or x.shape[0] < 2 or not np.all(np.isfinite(x)):
            raise ValueError(f"{name} must be finite with shape (R, {e.size}), R >= 2; got {x.shape}")
        fit, grad = _fit_and_grad(jnp.asarray(_check_estimate(x.mean(0), e.size)), w, jnp.asarray(e))
        if not bool(fit.converged):
            raise ValueError(f"the BGK fit of {name} did not converge to an interior minimum "
                             f"(p = {float(fit.p):.4g})")
        parts.append((float(fit.p), x @ np.asarray(grad)))
    (pp, lp), (pm, lm) = parts
    if paired:
        if lp.shape != lm.shape:
            raise ValueError(f"paired samples must have equal R; got {lp.size} and {lm.size}")
        se = np.std(lp - lm, ddof=1) / np.sqrt(lp.size) / (2 * h)
    else:
        se = np.hypot(np.std(lp, ddof=1) / np.sqrt(lp.size), np.std(lm, ddof=1) / np.sqrt(lm.size))
        se /= 2 * h
    return (pp - pm) / (2 * h), float(se)


# ----------------------------------------------------------------------------------------------
# per-realisation derivative samples from the ensembles of crjax.gradients / inference.inverse


def _unbiased(f, d, npix):
    """(f, d) over ℓ = 0..L−1 → ℓ = 1..ℓmax: with ``npix``, plus the self-consistent offset δ̂ of
    ``crjax.estimate_from_spectra`` over ℓ ≤ ℓmax = 2·nside (its default range; f = C_ℓ − D_r is its
    pair-sum term). δ̂ is linear in f, so the derivative samples get the same map."""
    if npix is None:
        return np.asarray(f)[:, 1:], np.asarray(d)[:, 1:]
    nside = int(round(np.sqrt(npix / 12)))
    if isinstance(npix, bool) or npix != 12 * nside * nside or f.shape[1] < 2 * nside + 1:
        raise ValueError(f"npix must be 12·nside² of the maps the sample came from, with the sample's "
                         f"ℓ reaching 2·nside; got npix={npix!r} for ℓmax={f.shape[1] - 1}")
    lmax = 2 * nside

    def correct(x):  # (R, ..., L)
        zero = jnp.zeros(x.shape[:-1], x.dtype)
        return np.asarray(crjax.estimate_from_spectra(x[..., : lmax + 1], zero, npix=npix).samples)

    dk = correct(jnp.moveaxis(jnp.asarray(d), -1, 1))  # (R, k, L)
    return correct(jnp.asarray(f))[:, 1:], np.moveaxis(dk, 1, -1)[:, 1:]


def ensemble_derivative_samples(
    sample: G.EnsembleSample,
    names: Sequence[str] = ("sigma2", "rL"),
    *,
    time_index: int = -1,
    npix: int | None = None,
) -> tuple[Float[np.ndarray, "R L"], Float[np.ndarray, "R L k"], np.ndarray]:
    """(f^(r), d^(r), ell) from a ``crjax.gradients.EnsembleSample`` at one save time, ℓ ≥ 1.

    d^(r) per name: ``score_function_gradient`` (σ², γ, Lc) or ``rescaled_rl_gradient`` (rL); the
    sample must carry the names' scores (Gaussian amplitudes). ``npix`` (12·nside² of the run): the
    unbiased per-realisation Ĉ_ℓ^(r) of ``crjax.spectrum_estimate`` (offset δ̂ added, ℓ ≤ 2·nside)
    instead of the seed's C_ℓ − N, which is biased by −δ at every ℓ (docs/physics.md §4).
    """
    names = tuple(names)
    if not names:
        raise ValueError("names must name at least one parameter")
    per = [G.rescaled_rl_gradient(sample) if nm == "rL" else G.score_function_gradient(sample, nm)
           for nm in names]
    f = sample.f[:, time_index]
    d = jnp.stack([x[:, time_index] for x in per], axis=-1)
    f, d = _unbiased(f, d, npix)
    return f, d, np.arange(1, f.shape[1] + 1)


def tensor_derivative_samples(
    sample: inverse.TensorSample,
    angle: float,
    *,
    time_index: int = -1,
    npix: int | None = None,
    symmetrise: bool = True,
) -> tuple[Float[np.ndarray, "R L"], Float[np.ndarray, "R L 4"]]:
    """Per-realisation f_ℓ^(r)(α) (R, L) and d^(r) (R, L, 4) for θ = ``inverse.THETA`` (σ², rL, γ, α)
    at save time ``time_index``, ℓ = 1..ℓmax: at the last save time and without ``npix``, the samples
    whose means ``inverse.spectrum_model`` reports (tests check the means against it). ∂/∂α =
    2 ∂_αĝ·f^(r)·ĝ is exact per realisation (no trajectory is differentiated), σ² and γ are
    score-function samples, rL the gyro rescaling. ``npix``: the unbiased Ĉ_ℓ^(r) instead of C_ℓ − N,
    ℓ ≤ 2·nside (as in :func:`ensemble_derivative_samples`).
    """
    f = sample.f[:, time_index]
    dfdT = sample.dfdT[:, time_index]
    if symmetrise:
        f, dfdT = inverse._symmetrise(f), inverse._symmetrise(dfdT)
    g = inverse.gradient_direction(angle).astype(f.dtype)
    dg = inverse.gradient_direction(angle + np.pi / 2).astype(f.dtype)  # dĝ/dα
    fs = jnp.einsum("a,rabl,b->rl", g, f, g)
    dts = jnp.einsum("a,rabl,b->rl", g, dfdT, g)
    fa = 2.0 * jnp.einsum("a,rabl,b->rl", dg, f, g)
    n = fs.shape[0]
    if n < 2:
        raise ValueError(f"the sample needs >= 2 realisations; got {n}")
    centred = (fs - fs.mean(0, keepdims=True)) * (n / (n - 1))  # leave-one-out baseline
    T = float(sample.times[time_index])
    rl = sample.rL
    d = jnp.stack([
        centred * sample.score[:, :1],
        (2.0 / rl) * fs + centred * sample.score[:, 1:2] - (T / rl) * dts,
        centred * sample.score[:, 2:3],
        fa,
    ], -1)
    return _unbiased(fs, d, npix)


# ----------------------------------------------------------------------------------------------
# the measurement behind docs/gradients.md's dp/dθ numbers:  python -m inference.sensitivity OUT


def _tensor_ensemble(out, name, params, key, n, nside, times, rL, dt):
    """``inverse.tensor_sample``, cached as OUT/name.npz (resumable)."""
    import time
    from pathlib import Path

    path = Path(out) / f"{name}.npz"
    if not path.exists():
        t0 = time.perf_counter()
        s = inverse.tensor_sample(params, key, n, nside, times, rL=rL, dt=dt)
        np.savez(path, f=np.asarray(s.f), dfdT=np.asarray(s.dfdT), score=np.asarray(s.score),
                 times=np.asarray(s.times), rL=s.rL, seconds=time.perf_counter() - t0)
        print(f"{name}: {n} realisations in {time.perf_counter() - t0:.0f} s", flush=True)
    z = np.load(path)
    return inverse.TensorSample(jnp.asarray(z["f"]), jnp.asarray(z["dfdT"]), jnp.asarray(z["score"]),
                                jnp.asarray(z["times"]), float(z["rL"]))


def study(
    out,
    *,
    nside: int = 4,
    n_modes: int = 64,
    t_omega: Sequence[float] = (50.0, 200.0),
    n_central: int = 1024,
    n_fd: int = 512,
    h: float = 0.2,
    angles: Sequence[float] = (0.0, 0.5, np.pi / 2),
    verbose: bool = False,
) -> list[dict]:
    """dp/dθ at θ0 = (σ² = 1, rL = 0.1, γ = 11/3) for each horizon, angle α and estimator of Ĉ_ℓ
    (``"unbiased"``: ``crjax.spectrum_estimate``'s, ℓ = 1..2·nside; ``"seed"``: C_ℓ − N, ℓ = 1..3·nside − 1),
    against central finite differences of the fitted p (relative step ``h`` in σ² and rL).

    One tensor ensemble of ``n_central`` realisations at θ0 (Gaussian mode amplitudes) gives f^(r) and
    the derivative samples for all four θ (:func:`tensor_derivative_samples`); four ensembles of
    ``n_fd`` at σ²(1 ± h), rL(1 ± h), with a key of their own shared by each ± pair (common random
    numbers), give the reference; every fit uses the W of the central ensemble at that (tΩ, α,
    estimator). Save times T = tΩ·rL0 and dt = rL0/20 stay fixed when rL moves (as
    ``rescaled_rl_gradient`` assumes). Returns one dict per (tΩ, α, estimator); ``verbose`` prints
    each as a JSON line when it is done.
    """
    import json
    import sys
    from pathlib import Path

    import equinox as eqx

    Path(out).mkdir(parents=True, exist_ok=True)
    rl0, dt = 0.1, 0.1 / 20
    times = np.asarray(t_omega, dtype=float) * rl0
    base = crjax.FieldParams(n_modes=n_modes)
    kc, kf = jax.random.PRNGKey(1301), jax.random.PRNGKey(1302)
    central = _tensor_ensemble(out, "central", base, kc, n_central, nside, times, rl0, dt)
    fd = {}
    for sgn, tag in ((1, "p"), (-1, "m")):
        ps = eqx.tree_at(lambda q: q.sigma2, base, 1.0 + sgn * h)
        fd["sigma2", tag] = _tensor_ensemble(out, f"sigma2_{tag}", ps, kf, n_fd, nside, times, rl0, dt)
        fd["rL", tag] = _tensor_ensemble(out, f"rL_{tag}", base, kf, n_fd, nside, times,
                                         rl0 * (1 + sgn * h), dt)
    rows = []
    for it, tw in enumerate(t_omega):
        for alpha in angles:
            for estimator, npix in (("unbiased", 12 * nside**2), ("seed", None)):
                f, d = tensor_derivative_samples(central, alpha, time_index=it, npix=npix)
                ell = np.arange(1, f.shape[1] + 1)
                w = precision_of_mean(f)
                res = p_sensitivity(f, d, ell, precision=w)
                row = {"t_omega": float(tw), "angle": round(float(alpha), 4), "estimator": estimator,
                       "lmax": int(ell[-1]), "p": res.p, "p_se": res.p_se,
                       "p_se_jk": res.p_se_jackknife, "chi2": res.chi2, "dof": int(ell.size - 2),
                       "converged": res.converged, "n_central": n_central, "n_fd": n_fd, "h": h}
                for i, name in enumerate(inverse.THETA):
                    row[f"dp_d{name}"] = float(res.dp_dtheta[i])
                    row[f"dp_d{name}_se"] = float(res.se[i])
                    row[f"dp_d{name}_se_jk"] = float(res.se_jackknife[i])
                for name, step in (("sigma2", h * 1.0), ("rL", h * rl0)):
                    plus, minus = (tensor_derivative_samples(fd[name, tag], alpha, time_index=it,
                                                             npix=npix)[0] for tag in ("p", "m"))
                    try:
                        est, se = p_finite_difference(plus, minus, step, ell, precision=w,
                                                      paired=True)
                    except ValueError as err:  # a fit at the edge of (0, 1): no reference here
                        print(f"tΩ={tw} α={alpha:.3f} {estimator} {name}: {err}", file=sys.stderr)
                        est, se = float("nan"), float("nan")
                    row[f"fd_{name}"], row[f"fd_{name}_se"] = est, se
                    row[f"z_{name}"] = (row[f"dp_d{name}"] - est) / float(
                        np.hypot(row[f"dp_d{name}_se"], se))
                rows.append(row)
                if verbose:
                    print(json.dumps(row), flush=True)
    return rows


if __name__ == "__main__":
    import os
    import sys

    crjax.use_cpu_cores()
    kw = {k: int(os.environ[k.upper()]) for k in ("nside", "n_modes", "n_central", "n_fd")
          if k.upper() in os.environ}
    study(sys.argv[1] if len(sys.argv) > 1 else "sensitivity_out", verbose=True, **kw)
