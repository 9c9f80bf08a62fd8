"""Fit of the BGK exponent p (seed (4.7)) to an ensemble estimate Ĉ_ℓ on its full covariance.

Input: an estimate Ĉ_ℓ (e.g. ``crjax.spectrum_estimate(maps).estimate``), the covariance of that mean
Σ̂ (L × L, from the spread of the R per-realisation estimates) and R. Model μ_ℓ = A · bgk_spectrum(ℓ, p).

Why the full covariance: the scatter of the dipole and of each realisation's own noise level between
realisations is common to all ℓ, so the errors of Ĉ_ℓ are strongly correlated across ℓ; a diagonal
likelihood then understates the error of p (issue 9, cause 2; ``tests/test_covariance_fit.py`` measures it).

Choices (docs/physics.md):

* **Hartlap-corrected inverse**, Ψ = h Σ̂⁻¹ with h = (R − L − 2)/(R − 1) (Hartlap, Simon & Schneider 2007),
  not a shrinkage estimator. The mean of R realisations is close to Gaussian and Σ̂ is then a Wishart
  matrix, for which h Σ̂⁻¹ is *exactly* unbiased; the correction is known in closed form, involves no tuning
  and leaves χ² interpretable (E[χ²] = dof for a correct model). Shrinkage (e.g. Ledoit–Wolf) lowers the
  noise of Σ̂ when R is barely above L, but it biases Σ̂ towards its target by a data-dependent amount, so
  neither χ² nor the interval has a known calibration. Here L ≤ 13 (ℓ ≤ 12) while R is ~10²: h ≥ 0.9 and
  the simple unbiased estimator is the better trade.
  The residual noise of Ψ widens the true spread of p̂ by the factor m = 1 + B (L − 2) in variance with
  B = (R − L − 2)/((R − L − 1)(R − L − 4)) (Dodelson & Schneider 2013, PRD 88, 063537); the interval uses
  Δχ² = m instead of 1. Both need R ≥ L + 5: smaller R raises ValueError.
* **Amplitude profiled analytically**: the model is linear in A, so Â(p) and χ²_min(p) are closed forms
  (``inference.likelihoods.profiled_chi2``). We fit Ĉ_ℓ itself, not the shape Ĉ_ℓ/Ĉ_1: the ratio divides by a
  noisy Ĉ_1, is biased and non-Gaussian, and its covariance must be propagated to first order; profiling A
  uses the same information exactly (the profile in p *is* the shape fit) without these approximations.
* **Interval: profile likelihood**, the p where χ²_min(p) − χ²_min(p̂) = m (≈ 1), found by root finding on
  the profile; asymmetric where the profile is, and clipped at the edges of (0, 1) (flagged
  ``interval_at_boundary``). Not Laplace: the profile in p is visibly skewed near p → 0 or 1.
* χ², dof = L − 2 and the χ²_dof p-value are always reported (the p-value neglects the O(L/R) spread of
  Hartlap's χ² beyond χ²_dof).

``p_by_ell_range`` gives p as a function of the fitted ℓmax (4..12). ``compare_nu_families`` fits a
two-parameter alternative to BGK's ν_r ∝ (1−x)^p through ``crjax.theory.spectrum_from_nu``,
ν_r ∝ (1−x)^p [1 + b(1−x)/2] (b > −1: the rate at wide angles relative to the small-angle power law; b = 0
is BGK). ``summarise_fit`` is the pipeline's entry: all of the above as a JSON-ready dict.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Iterable
from numbers import Real

import numpy as np
from jaxtyping import ArrayLike
from scipy import optimize, stats

from crjax.theory import bgk_spectrum, spectrum_from_nu
from inference.likelihoods import hartlap_factor, hartlap_precision, profiled_chi2

__all__ = [
    "ALTERNATIVE_FAMILIES",
    "CovarianceFit",
    "FamilyFit",
    "compare_nu_families",
    "dodelson_schneider_factor",
    "fit_p_covariance",
    "p_by_ell_range",
    "summarise_fit",
]

DEFAULT_LMAX_TABLE = tuple(range(4, 13))
# a p-value below this rejects the BGK family (issue 9)
REJECT_BELOW = 0.01
_P_EDGE = 1e-3  # p is searched in [_P_EDGE, 1 − _P_EDGE]
_P_GRID = np.linspace(_P_EDGE, 1.0 - _P_EDGE, 999)
ALTERNATIVE_FAMILIES = {
    "tilted": "nu_r ∝ (1-x)^p [1 + b (1-x)/2], b > -1 (b = 0: BGK)",
}


def dodelson_schneider_factor(n_realisations: Real, n_multipoles: Real, n_params: int = 2) -> float:
    """m = 1 + B (L − k), B = (R − L − 2)/((R − L − 1)(R − L − 4)): the factor by which the noise of a
    Hartlap-corrected precision inflates the variance of k fitted parameters (Dodelson & Schneider 2013).
    Needs R ≥ L + 5 (ValueError otherwise)."""
    hartlap_factor(n_realisations, n_multipoles)  # validates the integers
    if n_realisations < n_multipoles + 5:
        raise ValueError(
            f"n_realisations={n_realisations} is too small for {n_multipoles} multipoles: the "
            f"Hartlap-corrected inverse with the Dodelson-Schneider error correction needs "
            f"n_realisations >= n_multipoles + 5 = {n_multipoles + 5} (fit fewer multipoles or use more "
            "realisations)"
        )
    d = n_realisations - n_multipoles
    b = (d - 2) / ((d - 1) * (d - 4))
    return 1.0 + b * (n_multipoles - n_params)


@dataclasses.dataclass(frozen=True)
class CovarianceFit:
    """BGK fit on the full covariance (module docstring). ``p_interval``: 68% profile-likelihood interval
    (Δχ² = ``delta_chi2``); ``p_err``: its half width; ``interval_at_boundary``: (low, high) end clipped at
    the edge of the searched range [1e-3, 1 − 1e-3]. ``amplitude`` = Â (the model's C_1) with its
    marginal 1σ from the Fisher matrix of (p, A) (times the Dodelson–Schneider factor). ``chi2`` uses the
    Hartlap-corrected precision; ``dof`` = L − 2; ``pvalue`` its χ²_dof survival probability."""

    p: float
    p_interval: tuple[float, float]
    p_err: float
    interval_at_boundary: tuple[bool, bool]
    amplitude: float
    amplitude_err: float
    chi2: float
    dof: int
    pvalue: float
    ell: np.ndarray
    n_realisations: int
    hartlap: float
    delta_chi2: float

    def summary(self) -> dict:
        """JSON-ready dict of the fit."""
        return {
            "family": "bgk",
            "p": float(self.p),
            "p_interval_68": [float(v) for v in self.p_interval],
            "p_err": float(self.p_err),
            "interval_at_boundary": [bool(v) for v in self.interval_at_boundary],
            "interval_method": f"profile likelihood, delta chi2 = {self.delta_chi2:.4f}",
            "amplitude": float(self.amplitude),
            "amplitude_err": float(self.amplitude_err),
            "chi2": float(self.chi2),
            "dof": int(self.dof),
            "pvalue": float(self.pvalue),
            "lmin": int(self.ell.min()),
            "lmax": int(self.ell.max()),
            "n_realisations": int(self.n_realisations),
            "covariance": "full, Hartlap-corrected inverse",
            "hartlap_factor": float(self.hartlap),
        }


@dataclasses.dataclass(frozen=True)
class FamilyFit:
    """Fit of one ν_r family on the full covariance: best shape ``params``, Â, χ², dof, p-value and
    whether it fits (p-value ≥ 0.01)."""

    family: str
    description: str
    params: dict
    amplitude: float
    chi2: float
    dof: int
    pvalue: float

    @property
    def fits(self) -> bool:
        return bool(self.pvalue >= REJECT_BELOW)

    def summary(self) -> dict:
        return {
            "family": self.family,
            "nu_r": self.description,
            "params": {k: float(v) for k, v in self.params.items()},
            "amplitude": float(self.amplitude),
            "chi2": float(self.chi2),
            "dof": int(self.dof),
            "pvalue": float(self.pvalue),
            "fits": self.fits,
        }


# ---------------------------------------------------------------------------------------------------
# input


@dataclasses.dataclass(frozen=True)
class _Selected:
    ell: np.ndarray  # (L,) int, ≥ 1
    estimate: np.ndarray  # (L,)
    covariance: np.ndarray  # (L, L)
    n_realisations: int


def _is_int(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, numbers.Integral)


def _as_inputs(ell, estimate, covariance, n_realisations):
    """Validated full arrays (before the ℓ selection)."""
    e = np.asarray(ell)
    if e.ndim != 1 or e.size == 0:
        raise ValueError(f"ell must be a non-empty 1-D array of multipoles; got shape {e.shape}")
    if not np.issubdtype(e.dtype, np.number) or not np.all(np.isfinite(e)):
        raise ValueError(f"ell must be finite integers >= 0; got {ell!r}")
    if not np.all(e == np.round(e)) or np.any(e < 0):
        raise ValueError(f"ell must be integers >= 0; got {ell!r}")
    e = e.astype(np.int64)
    if np.any(np.diff(e) <= 0):
        raise ValueError("ell must be strictly increasing (each multipole once)")
    c = np.asarray(estimate, dtype=float)
    if c.shape != e.shape:
        raise ValueError(f"estimate must have the shape of ell {e.shape}; got {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("estimate contains NaN or inf")
    cov = np.asarray(covariance, dtype=float)
    if cov.shape != (e.size, e.size):
        raise ValueError(f"covariance must have shape {(e.size, e.size)}; got {cov.shape}")
    if not np.all(np.isfinite(cov)):
        raise ValueError("covariance contains NaN or inf")
    scale = float(np.max(np.abs(np.diag(cov)))) or 1.0
    if np.max(np.abs(cov - cov.T)) > 1e-10 * scale:
        raise ValueError("covariance must be symmetric")
    if not _is_int(n_realisations) or n_realisations < 2:
        raise ValueError(f"n_realisations must be an integer >= 2; got {n_realisations!r}")
    return e, c, cov


def _select(ell, estimate, covariance, n_realisations, lmin, lmax) -> _Selected:
    e, c, cov = _as_inputs(ell, estimate, covariance, n_realisations)
    if not _is_int(lmin) or lmin < 1:
        raise ValueError(
            f"lmin must be an integer >= 1 (eq. 4.7 does not determine the monopole); got {lmin!r}"
        )
    if lmax is None:
        lmax = int(e.max())
    if not _is_int(lmax) or lmax < lmin:
        raise ValueError(f"lmax must be an integer >= lmin={lmin}; got {lmax!r}")
    keep = (e >= lmin) & (e <= lmax)
    n = int(np.count_nonzero(keep))
    if n < 3:
        raise ValueError(
            f"the range lmin={lmin}..lmax={lmax} holds {n} multipoles of the data; fitting p and the "
            "amplitude needs at least 3"
        )
    dodelson_schneider_factor(n_realisations, n)  # R large enough for this L (ValueError otherwise)
    return _Selected(e[keep], c[keep], cov[np.ix_(keep, keep)], int(n_realisations))


def _padded_lmax(ell: np.ndarray) -> int:
    # bgk_spectrum is jitted per input shape: evaluating it on ℓ = 1..(a power of two ≥ 16) and indexing
    # keeps every ℓ range of a table (and every validation trial) on one compiled program
    return max(16, 1 << int(np.ceil(np.log2(int(ell.max())))))


def _bgk(ell: np.ndarray, p) -> np.ndarray:
    """bgk_spectrum(ell, p) for ℓ ≥ 1 (p scalar or (n, 1)), through the padded ℓ range."""
    p = np.asarray(p, dtype=float)
    ells = np.arange(1, _padded_lmax(ell) + 1).reshape((1,) * max(p.ndim - 1, 0) + (-1,))
    return np.asarray(bgk_spectrum(ells, p))[..., ell - 1]


@functools.lru_cache(maxsize=8)
def _grid_full(lmax_pad: int) -> np.ndarray:
    return np.asarray(bgk_spectrum(np.arange(1, lmax_pad + 1)[None, :], _P_GRID[:, None]))


def _grid_shapes(ell: np.ndarray) -> np.ndarray:
    """bgk_spectrum on the p grid, shape (n_grid, L) (cached: validation trials reuse it)."""
    return _grid_full(_padded_lmax(ell))[:, ell - 1]


# ---------------------------------------------------------------------------------------------------
# fits


def _profile(sel: _Selected, psi: np.ndarray, p_values: np.ndarray):
    """(χ²_min(p), Â(p), f_p) for a batch of p: one bgk_spectrum call (batched: a fit makes ~5 calls)."""
    f = _bgk(sel.ell, np.asarray(p_values, dtype=float)[:, None])
    chi2, amp = profiled_chi2(f, sel.estimate, psi)
    return np.asarray(chi2), np.asarray(amp), f


_N_FINE = 201  # points of each refinement grid (fixed: one compiled shape)


def _fit_selected(sel: _Selected) -> CovarianceFit:
    L = sel.ell.size
    psi = hartlap_precision(sel.covariance, sel.n_realisations)
    m = dodelson_schneider_factor(sel.n_realisations, L)
    # 1. coarse grid in p (999 points, cached shapes), 2. a 201-point grid between the neighbours of its
    # minimum, 3. the vertex of the parabola through the three best fine points: p̂ to ~(Δp_fine)³
    coarse = np.asarray(profiled_chi2(_grid_shapes(sel.ell), sel.estimate, psi)[0])
    i = int(np.argmin(coarse))
    fine_p = np.linspace(_P_GRID[max(i - 1, 0)], _P_GRID[min(i + 1, _P_GRID.size - 1)], _N_FINE)
    fine, _, _ = _profile(sel, psi, fine_p)
    j = int(np.argmin(fine))
    p_hat = float(fine_p[j])
    if 0 < j < _N_FINE - 1:
        y0, y1, y2 = fine[j - 1 : j + 2]
        curv = y0 - 2 * y1 + y2
        if curv > 0:
            p_hat += 0.5 * (fine_p[1] - fine_p[0]) * (y0 - y2) / curv
    h = 1e-6 * min(1.0, p_hat / 1e-3, (1 - p_hat) / 1e-3)
    chi2_3, amp_3, f_3 = _profile(sel, psi, np.array([p_hat - h, p_hat, p_hat + h]))
    chi2_min, amp, f = float(chi2_3[1]), float(amp_3[1]), f_3[1]
    if fine[j] < chi2_min:  # the vertex can only improve on the fine grid point
        p_hat, chi2_min = float(fine_p[j]), float(fine[j])

    # profile-likelihood interval: the coarse grid brackets each crossing of χ²_min + m, a fine grid
    # narrows it to Δp ≈ 5e-6 and linear interpolation ends it (error ~Δp² χ''/χ' ≪ 1e-6)
    ends, clipped = [], []
    for side in (-1, 1):
        idx = np.arange(i, -1, -1) if side < 0 else np.arange(i, _P_GRID.size)
        above = np.nonzero(coarse[idx] - chi2_min - m > 0)[0]
        if above.size == 0:
            ends.append(float(_P_GRID[idx[-1]]))
            clipped.append(True)
            continue
        far = float(_P_GRID[idx[above[0]]])
        near = float(_P_GRID[idx[above[0] - 1]]) if above[0] > 0 else p_hat
        near = max(near, p_hat) if side > 0 else min(near, p_hat)
        g = np.linspace(near, far, _N_FINE)  # from inside the interval outwards
        e = _profile(sel, psi, g)[0] - chi2_min - m
        k = int(np.argmax(e > 0))
        if k == 0:  # crossing at or inside the first point (only if near = p̂ rounding)
            ends.append(float(g[0]))
        else:
            ends.append(float(g[k - 1] + (g[k] - g[k - 1]) * (-e[k - 1]) / (e[k] - e[k - 1])))
        clipped.append(False)
    # Fisher matrix of (p, A) for the amplitude's marginal error; ∂f/∂p by central differences
    # (h = 1e-6: truncation ~1e-12, round-off ~1e-10 relative — far below the statistical error)
    dfdp = (f_3[2] - f_3[0]) / (2 * h)
    jac = np.stack([amp * dfdp, f], axis=1)
    fisher = jac.T @ psi @ jac
    try:
        cov_pa = m * np.linalg.inv(fisher)
        amp_err = float(np.sqrt(cov_pa[1, 1])) if cov_pa[1, 1] > 0 else float("nan")
    except np.linalg.LinAlgError:
        amp_err = float("nan")
    dof = L - 2
    return CovarianceFit(
        p=p_hat,
        p_interval=(ends[0], ends[1]),
        p_err=0.5 * (ends[1] - ends[0]),
        interval_at_boundary=(clipped[0], clipped[1]),
        amplitude=amp,
        amplitude_err=amp_err,
        chi2=chi2_min,
        dof=dof,
        pvalue=float(stats.chi2.sf(chi2_min, dof)),
        ell=sel.ell,
        n_realisations=sel.n_realisations,
        hartlap=hartlap_factor(sel.n_realisations, L),
        delta_chi2=m,
    )


def fit_p_covariance(
    ell: ArrayLike,
    estimate: ArrayLike,
    covariance: ArrayLike,
    n_realisations: Real,
    *,
    lmin: Real = 1,
    lmax: Real | None = None,
) -> CovarianceFit:
    """Fit A · bgk_spectrum(ℓ, p) (4.7) to Ĉ_ℓ on its full covariance (module docstring for the choices).

    ``ell``: strictly increasing integers (shape (n,); ℓ = 0 rows are allowed and never fitted),
    ``estimate`` Ĉ_ℓ (n,), ``covariance`` the covariance of that mean (n, n), ``n_realisations`` R the
    number of realisations Ĉ_ℓ and its covariance come from. ``lmin`` ≥ 1 .. ``lmax`` (default: all)
    select the fitted multipoles (L of them, L ≥ 3). ValueError for bad input, a covariance that is not
    positive definite on the selection, or R < L + 5.
    """
    return _fit_selected(_select(ell, estimate, covariance, n_realisations, lmin, lmax))


def _table_lmax(e: np.ndarray, n_realisations: int, lmin: int, lmax_values) -> list[int]:
    if lmax_values is None:
        out = []
        for v in DEFAULT_LMAX_TABLE:
            n = int(np.count_nonzero((e >= lmin) & (e <= v)))
            if v <= e.max() and n >= 3 and n_realisations >= n + 5:
                out.append(v)
        return out
    vals = list(lmax_values)
    if not vals:
        raise ValueError("lmax_values must name at least one largest multipole; got none")
    for v in vals:
        if not _is_int(v):
            raise ValueError(f"lmax_values must be integers; got {v!r}")
        if v > e.max():
            raise ValueError(
                f"lmax_values: lmax={v} exceeds the largest multipole of the data ({int(e.max())})"
            )
    return [int(v) for v in vals]


def p_by_ell_range(
    ell: ArrayLike,
    estimate: ArrayLike,
    covariance: ArrayLike,
    n_realisations: Real,
    *,
    lmin: Real = 1,
    lmax_values: Iterable | None = None,
) -> list[CovarianceFit]:
    """``fit_p_covariance`` for each fitted range lmin..ℓmax, ℓmax in ``lmax_values``.

    Default: the ℓmax of 4..12 that the data cover and that R allows (R ≥ L + 5); explicit values that
    do not raise ValueError naming them. Rows share data, so they are correlated: a trend of p with ℓmax
    larger than the row errors is significant, a wiggle within them is not.
    """
    e, _, _ = _as_inputs(ell, estimate, covariance, n_realisations)
    return [
        fit_p_covariance(ell, estimate, covariance, n_realisations, lmin=lmin, lmax=v)
        for v in _table_lmax(e, n_realisations, lmin, lmax_values)
    ]


def _tilted_shapes(ell: np.ndarray, p: float, b: float) -> np.ndarray:
    """C_ℓ/C_1 of (4.7) for ν_r ∝ (1−x)^p [1 + b(1−x)/2] (exact endpoint weight, smooth remainder)."""
    ells = np.union1d([1], ell)

    def nu_r(x):
        return (1.0 - x) ** p * (1.0 + 0.5 * b * (1.0 - x))

    cl = np.asarray(spectrum_from_nu(ells, nu_r, endpoint_exponent=p))
    return cl[np.searchsorted(ells, ell)] / cl[0]


def _fit_tilted(sel: _Selected, psi: np.ndarray, p0: float) -> FamilyFit:
    # unconstrained (logit p, ln(b + 0.95)): b > −0.95 keeps 1/ν_r's pole x = 1 + 2/b well outside
    # [−1, 1], so the Gauss–Jacobi rule of spectrum_from_nu stays exact to round-off
    def unpack(u):
        return 1.0 / (1.0 + math.exp(-u[0])), math.exp(u[1]) - 0.95

    def chi2(u):
        if abs(u[0]) > 8 or u[1] > 6:  # p within (3e-4, 1 − 3e-4), b < 400
            return 1e30
        p, b = unpack(u)
        return float(profiled_chi2(_tilted_shapes(sel.ell, p, b), sel.estimate, psi)[0])

    best = None
    lp0 = math.log(p0 / (1 - p0))
    for b0 in (0.0, -0.6, 2.0, 10.0):
        r = optimize.minimize(
            chi2,
            [lp0, math.log(b0 + 0.95)],
            method="Nelder-Mead",
            options={"xatol": 1e-6, "fatol": 1e-8, "maxiter": 2000},
        )
        if best is None or r.fun < best.fun:
            best = r
    p, b = unpack(best.x)
    f = _tilted_shapes(sel.ell, p, b)
    chi2_min, amp = (float(v) for v in profiled_chi2(f, sel.estimate, psi))
    dof = sel.ell.size - 3
    return FamilyFit(
        family="tilted",
        description=ALTERNATIVE_FAMILIES["tilted"],
        params={"p": p, "b": b},
        amplitude=amp,
        chi2=chi2_min,
        dof=dof,
        pvalue=float(stats.chi2.sf(chi2_min, dof)) if dof > 0 else float("nan"),
    )


def compare_nu_families(
    ell: ArrayLike,
    estimate: ArrayLike,
    covariance: ArrayLike,
    n_realisations: Real,
    *,
    lmin: Real = 1,
    lmax: Real | None = None,
) -> list[FamilyFit]:
    """BGK and the alternative ν_r families (``ALTERNATIVE_FAMILIES``) fitted on the full covariance.

    Each entry says whether the family fits (χ²_dof p-value ≥ 0.01). The tilted family contains BGK
    (b = 0), so its χ² is never above BGK's; the drop Δχ² is χ²_1-distributed if BGK is right.
    Needs L ≥ 4 (three parameters and one dof).
    """
    sel = _select(ell, estimate, covariance, n_realisations, lmin, lmax)
    if sel.ell.size < 4:
        raise ValueError(
            f"comparing nu_r families needs at least 4 multipoles (3 parameters); got {sel.ell.size}"
        )
    bgk = _fit_selected(sel)
    psi = hartlap_precision(sel.covariance, sel.n_realisations)
    return [
        FamilyFit(
            "bgk",
            "nu_r ∝ (1-x)^p (seed eq. 4.7)",
            {"p": bgk.p},
            bgk.amplitude,
            bgk.chi2,
            bgk.dof,
            bgk.pvalue,
        ),
        _fit_tilted(sel, psi, min(max(bgk.p, 0.02), 0.98)),
    ]


def summarise_fit(
    ell: ArrayLike,
    estimate: ArrayLike,
    covariance: ArrayLike,
    n_realisations: Real,
    *,
    lmin: Real = 1,
    lmax: Real | None = None,
    lmax_values: Iterable | None = None,
) -> dict:
    """The pipeline's fit of an ensemble estimate, as a JSON-ready dict (for ``summary.json``):

    ``bgk`` (``fit_p_covariance`` on lmin..lmax), ``by_lmax`` (``p_by_ell_range`` rows), ``bgk_rejected``
    (p-value < 0.01), ``families`` (only when rejected: ``compare_nu_families``) and ``statement``, one
    plain sentence saying whether BGK fits and, if not, which family does.
    """
    fit = fit_p_covariance(ell, estimate, covariance, n_realisations, lmin=lmin, lmax=lmax)
    rows = p_by_ell_range(
        ell, estimate, covariance, n_realisations, lmin=lmin, lmax_values=lmax_values
    )
    out = {
        "bgk": fit.summary(),
        "by_lmax": [r.summary() for r in rows],
        "bgk_rejected": bool(fit.pvalue < REJECT_BELOW),
    }
    lo, hi = fit.p_interval
    rng = f"{int(fit.ell.min())} <= l <= {int(fit.ell.max())}"
    if not out["bgk_rejected"]:
        out["statement"] = (
            f"BGK fits ({rng}): p = {fit.p:.3f} [{lo:.3f}, {hi:.3f}], chi2 = {fit.chi2:.1f}/{fit.dof}, "
            f"p-value {fit.pvalue:.3g}."
        )
        return out
    if fit.ell.size < 4:
        out["families"] = []
        out["statement"] = (
            f"BGK is rejected ({rng}: chi2 = {fit.chi2:.1f}/{fit.dof}, p-value {fit.pvalue:.2g} < 0.01); "
            "too few multipoles to fit an alternative family."
        )
        return out
    fams = compare_nu_families(ell, estimate, covariance, n_realisations, lmin=lmin, lmax=lmax)
    out["families"] = [f.summary() for f in fams]
    good = [f for f in fams[1:] if f.fits]
    alt = "; ".join(
        f"{f.family} ({f.description}): "
        + ", ".join(f"{k} = {v:.3f}" for k, v in f.params.items())
        + f", chi2 = {f.chi2:.1f}/{f.dof}, p-value {f.pvalue:.2g}"
        for f in fams[1:]
    )
    out["statement"] = (
        f"BGK is rejected ({rng}: chi2 = {fit.chi2:.1f}/{fit.dof}, p-value {fit.pvalue:.2g} < 0.01). "
        + ("An alternative fits: " if good else "No alternative fits either: ")
        + alt
        + "."
    )
    return out
