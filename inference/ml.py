"""Maximum-likelihood fit of the BGK exponent p (seed (4.7)) to a spectrum with per-multipole errors:
optax L-BFGS and a Laplace (inverse-Hessian) error.

The likelihoods and the model are in ``inference.likelihoods``. ``fit_p_map`` maximises the likelihood in
unconstrained coordinates u = (logit p, ln(A/s), N/s) (s: the data scale max|x̂|, so all are O(1)) and
returns the Laplace covariance (``jax.hessian``) transformed back with the Jacobian. It is plain maximum
likelihood (flat priors); a free N is unconstrained here (it may come out slightly negative when the data
need no offset), while NUTS (``inference.nuts``) gives it a HalfNormal prior (N ≥ 0).
``fit_p_map_by_lmax`` refits for each largest multipole ℓmax of a table (one compiled program for all).
For an ensemble estimate with its full covariance use ``inference.covariance_fit`` instead: the errors of
a simulated Ĉ_ℓ are correlated across ℓ and a diagonal likelihood understates the error of p.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterable
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.scipy.special import expit, logit
from scipy import stats

from crjax._checks import check_int_at_least
from inference.data import Spectrum
from inference.likelihoods import (
    _data,
    _natural,
    _neg2loglike,
    _prepare,
    _Prepared,
    _Static,
    _static,
    _wls_amplitude,
)

__all__ = ["DEFAULT_LMAX_TABLE", "MapResult", "fit_p_map", "fit_p_map_by_lmax"]

# the ℓmax values of the p-by-ℓ-range tables (issue 9: ℓmax = 4..12)
DEFAULT_LMAX_TABLE = tuple(range(4, 13))

_grad = jax.jit(jax.grad(_neg2loglike, argnums=2), static_argnums=0)
_hessian = jax.jit(jax.hessian(_neg2loglike, argnums=2), static_argnums=0)
_loss_grid = jax.jit(jax.vmap(_neg2loglike, in_axes=(None, None, 0)), static_argnums=0)


@dataclasses.dataclass(frozen=True)
class MapResult:
    """Maximum-likelihood fit. ``p_err``, ``amplitude_err``, ``noise_err``: Laplace 1σ (delta method);
    ``p_interval``: 68% interval sigmoid(logit p̂ ± σ_logit) (stays inside (0, 1)); ``cov``: covariance of
    (p, A, N) (N row/column zero unless free); ``chi2`` = −2 ln L at the optimum (up to constants; a true
    χ² for Gaussian errors), ``dof`` = n − #free, ``pvalue`` = χ²_dof survival probability of ``chi2``.
    The multipoles are treated as independent (a spectrum file has no correlations)."""

    p: float
    p_err: float
    p_interval: tuple[float, float]
    amplitude: float
    amplitude_err: float
    noise: float
    noise_err: float
    noise_mode: str
    cov: np.ndarray
    chi2: float
    dof: int
    pvalue: float
    ell: np.ndarray
    likelihood: str
    converged: bool
    n_iter: int

    def summary(self) -> dict:
        d = {
            k: getattr(self, k)
            for k in ("p", "p_err", "amplitude", "amplitude_err", "noise", "noise_err")
        }
        d.update(
            p_interval_68=list(self.p_interval),
            noise_mode=self.noise_mode,
            chi2=self.chi2,
            dof=self.dof,
            pvalue=self.pvalue,
            lmin=int(self.ell.min()),
            lmax=int(self.ell.max()),
            likelihood=self.likelihood,
            converged=self.converged,
        )
        return {k: (float(v) if isinstance(v, (np.floating, float)) else v) for k, v in d.items()}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _optimise(st: _Static, data: dict, u0, max_iter: int, tol):
    """optax L-BFGS (zoom line search) on −2 ln L from u0 until |∇| ≤ tol or max_iter steps."""

    def f(u):
        return _neg2loglike(st, data, u)

    opt = optax.lbfgs()
    vg = optax.value_and_grad_from_state(f)

    def step(carry):
        u, state, _ = carry
        value, grad = vg(u, state=state)
        updates, state = opt.update(grad, state, u, value=value, grad=grad, value_fn=f)
        return optax.apply_updates(u, updates), state, jnp.linalg.norm(grad)

    def cond(carry):
        _, state, gnorm = carry
        it = optax.tree_utils.tree_get(state, "count")
        return (it == 0) | ((it < max_iter) & (gnorm > tol))

    init = (u0, opt.init(u0), jnp.asarray(jnp.inf))
    u, state, _ = jax.lax.while_loop(cond, step, init)
    return u, optax.tree_utils.tree_get(state, "count")


def _safe_inverse(hess: np.ndarray) -> np.ndarray:
    # −2 ln L: covariance = 2 H⁻¹; NaN if the optimum is not a strict minimum (flat direction)
    try:
        evals = np.linalg.eigvalsh(hess)
        if np.all(np.isfinite(evals)) and np.min(evals) > 0:
            return 2.0 * np.linalg.inv(hess)
    except np.linalg.LinAlgError:
        pass
    return np.full_like(hess, np.nan)


def _fit_prepared(
    prep: _Prepared, weights: np.ndarray, p_grid: int, max_iter: int, tol: float
) -> MapResult:
    """ML fit of the multipoles with weight 1 (the others stay in the arrays: shared compile)."""
    st, data = _static(prep), _data(prep, weights)
    free = prep.noise_mode == "free"
    starts = []
    for pg in np.linspace(0.05, 0.95, p_grid):
        amp, nz = _wls_amplitude(prep, pg, free, weights)
        starts.append([float(logit(pg)), math.log(amp)] + ([nz] if free else []))
    starts = jnp.asarray(np.array(starts, dtype=float))
    u0 = starts[int(np.nanargmin(np.asarray(_loss_grid(st, data, starts))))]
    u, n_iter = _optimise(st, data, u0, max_iter, tol)
    gnorm = np.linalg.norm(np.asarray(_grad(st, data, u)))
    hess = np.asarray(_hessian(st, data, u))
    cov_u = _safe_inverse(hess)
    # gradient of −2 ln L (an O(n) number) below 1e-5 at an L-BFGS stop: converged for our purposes
    converged = bool(
        np.isfinite(float(gnorm)) and float(gnorm) <= 1e-5 and np.all(np.isfinite(cov_u))
    )
    p, amp, nz = (float(v) for v in _natural(st, data, u))
    jac = np.diag([p * (1 - p), amp * prep.scale] + ([prep.scale] if free else []))
    cov = jac @ cov_u @ jac.T
    cov3 = np.zeros((3, 3))
    k = cov.shape[0]
    cov3[:k, :k] = cov
    sig_u = math.sqrt(cov_u[0, 0]) if cov_u[0, 0] > 0 else float("nan")
    chi2 = float(_neg2loglike(st, data, u))
    dof = int(np.count_nonzero(weights) - k)
    return MapResult(
        p=p,
        p_err=float(np.sqrt(cov3[0, 0])),
        p_interval=(float(expit(u[0] - sig_u)), float(expit(u[0] + sig_u))),
        amplitude=amp * prep.scale,
        amplitude_err=float(np.sqrt(cov3[1, 1])),
        noise=nz * prep.scale,
        noise_err=float(np.sqrt(cov3[2, 2])),
        noise_mode=prep.noise_mode,
        cov=cov3,
        chi2=chi2,
        dof=dof,
        pvalue=float(stats.chi2.sf(chi2, dof)) if dof > 0 else float("nan"),
        ell=prep.ell[np.asarray(weights) > 0],
        likelihood=prep.likelihood,
        converged=converged,
        n_iter=int(n_iter),
    )


def _check_tol(tol) -> None:
    if (
        isinstance(tol, bool)
        or not isinstance(tol, numbers.Real)
        or not (math.isfinite(tol) and tol > 0)
    ):
        raise ValueError(f"tol must be a finite number > 0; got {tol!r}")


def fit_p_map(
    spectrum: Spectrum,
    *,
    lmin: Real | None = None,
    lmax: Real | None = None,
    noise: str = "auto",
    noise_level: Real | None = None,
    likelihood: str = "auto",
    forward: object = None,  # a callable (checked: ValueError otherwise)
    forward_lmax: Real | None = None,
    p_grid: Real = 19,
    max_iter: Real = 200,
    tol: Real = 1e-8,
) -> MapResult:
    """Maximum-likelihood (p, A, N) of the BGK model (4.7) with a Laplace error (module docstring).

    ``lmin`` (default 1; ≥ 1) / ``lmax`` (default: all) select the fitted multipoles, inclusive.
    The optimiser (optax L-BFGS) starts from the best of ``p_grid`` values of p on a grid in (0, 1)
    with weighted-least-squares amplitudes, so a multi-modal likelihood does not trap it.
    """
    prep = _prepare(spectrum, lmin, lmax, noise, noise_level, likelihood, forward, forward_lmax)
    check_int_at_least("p_grid", p_grid, 1)
    check_int_at_least("max_iter", max_iter, 1)
    _check_tol(tol)
    return _fit_prepared(prep, np.ones(prep.ell.size), p_grid, max_iter, tol)


def fit_p_map_by_lmax(
    spectrum: Spectrum,
    *,
    lmax_values: Iterable | None = None,
    lmin: Real | None = None,
    lmax: Real | None = None,
    noise: str = "auto",
    noise_level: Real | None = None,
    likelihood: str = "auto",
    p_grid: Real = 19,
    max_iter: Real = 200,
    tol: Real = 1e-8,
) -> list[MapResult]:
    """``fit_p_map`` for each largest multipole in ``lmax_values`` (the p-by-ℓ-range table of issue 9).

    Default ``lmax_values``: those of ℓmax = 4..12 (and ≤ ``lmax`` if given) that the data cover with more
    multipoles than free parameters. Explicit values outside that raise ValueError naming the value. All fits share the
    likelihood choice made on the widest range and one compiled program. Multipoles are treated as
    independent (per-multipole errors only), so neighbouring rows are strongly correlated and the
    intervals assume no correlation between ℓ.
    """
    lmin_ = 1 if lmin is None else lmin
    ell_all = spectrum.ell if isinstance(spectrum, Spectrum) else None
    explicit = lmax_values is not None
    if explicit:
        lmax_values = list(lmax_values)
        if not lmax_values:
            raise ValueError("lmax_values must name at least one largest multipole; got none")
        for v in lmax_values:
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ValueError(f"lmax_values must be integers; got {v!r}")  # noqa: TRY004  (project convention: every bad input is a ValueError)
        top = max(lmax_values)
    else:
        top = DEFAULT_LMAX_TABLE[-1] if lmax is None else min(DEFAULT_LMAX_TABLE[-1], lmax)
        if ell_all is not None:
            top = min(top, int(ell_all.max()))
    prep = _prepare(spectrum, lmin, top, noise, noise_level, likelihood, None, None)
    check_int_at_least("p_grid", p_grid, 1)
    check_int_at_least("max_iter", max_iter, 1)
    _check_tol(tol)
    if not explicit:
        lmax_values = [
            v
            for v in DEFAULT_LMAX_TABLE
            if v <= top and np.count_nonzero((prep.ell >= lmin_) & (prep.ell <= v)) > prep.n_free
        ]
    fits = []
    for v in lmax_values:
        if v > int(prep.ell.max()):
            raise ValueError(
                f"lmax_values: lmax={v} exceeds the largest multipole of the data ({int(prep.ell.max())})"
            )
        w = (prep.ell <= v).astype(float)
        n = int(np.count_nonzero(w))
        if n <= prep.n_free:
            raise ValueError(
                f"lmax_values: lmax={v} leaves {n} multipoles in {lmin_}..{v}; fitting {prep.n_free} "
                f"parameters needs at least {prep.n_free + 1}"
            )
        fits.append(_fit_prepared(prep, w, p_grid, max_iter, tol))
    return fits
