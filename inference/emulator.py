"""A differentiable emulator of the ensemble spectrum Ĉ_ℓ over θ = (σ², rL/Lc, α), and the shape fit
``crjax fit --model simulation`` built on it.

* **What is emulated.** B0 ∥ ẑ with isotropic modes makes E[f_ℓ] = diag(a_ℓ, a_ℓ, b_ℓ)
  (``inference.inverse``), so Ĉ_ℓ(α) = ĝ·E[f_ℓ]·ĝ = sin²α a_ℓ + cos²α b_ℓ exactly: the angle costs no
  simulation. The emulator therefore learns the 2·L components (a_ℓ, b_ℓ), ℓ = 1..ℓmax, at the last
  save time, over (σ², rL) only (γ fixed), and contracts with the angle analytically.
* **Design.** A Latin hypercube (scipy's, centred-discrepancy optimised) in the unit square mapped
  log-uniformly onto the box ``sigma2_range × rL_range``. Each point is one ensemble of Gaussian-
  amplitude realisations (``inference.inverse``'s tensor reducer and realiser, i.e.
  ``tensor_sample`` without its amplitude scores, whose jit is static in rL and would recompile
  at every design point). Every point gets its own key, so the design points' noise is independent:
  the GP's diagonal noise model is then right (common random numbers would correlate it).
  One fixed step ``dt`` = rL_min/20 and one horizon ``t_end`` (in Lc/c, as ``fit_parameters``) for all
  points.
* **Gaussian process** per component, in pure JAX: inputs the unit-square coordinates, outputs
  standardised; kernel s²·exp(−½Σ(Δx_d/ℓ_d)²) + c²(1 + 4Σ(x_d−½)(x'_d−½)) (a squared exponential on
  top of a marginalised linear mean) plus, on the diagonal, the *known* noise variance of each design
  mean (its realisation spread / R) and a small fitted nugget. Hyper-parameters: MAP-II, optax Adam on
  the log marginal likelihood with weak log-normal priors (with ~10–30 design points a flat prior lets
  length scales run off). A component that is sign-definite at every design point (|mean| > 3 SE) is
  modelled in log|x| (σ² and rL act multiplicatively), the others linearly: at small nside the
  noise-subtracted Ĉ_ℓ (ℓ ≥ 2) is negative or crosses zero, so a log model cannot be used for all ℓ.
* **Output.** :func:`predict` is a pure, differentiable θ ↦ (Ĉ_ℓ, emulator variance) (the GP's latent
  variance; in the log components by the delta method, x²·var). a and b are independent GPs, so the
  variance of the contraction is sin⁴α var_a + cos⁴α var_b (their covariance is neglected).
* **Validation.** :func:`loo_validation`: closed-form leave-one-out at the fitted hyper-parameters
  (standardised residuals against the noisy design means, relative errors where the mean is resolved);
  :func:`holdout_validation`: fresh simulations at other θ. Numbers: ``docs/gradients.md`` (emulator).
* **Fit.** :func:`fit_shape`: which θ reproduce a measured Ĉ_ℓ *shape*: model A·Ĉ_ℓ(θ) (+ N), the
  amplitude profiled in closed form (the model is linear in A; with the emulator variance A²v in the
  weights, a fixed-point of 4 closed-form steps), or the spectrum itself (A = 1, the inverse problem
  of ``inference.inverse``). With data covariance C (diagonal from the file's errors, or full) and
  T = C + A² diag(v): −2 ln L = χ² + ln det T − ln det C, χ² = rᵀ T⁻¹ r (the log-determinant: without
  it the fit is pulled to θ where the emulator is least sure). When C is a sample covariance of n
  realisations, χ² enters as n·ln(1 + χ²/(n − 1)) (Sellentin & Heavens 2016: the likelihood with the
  covariance's own noise marginalised; a Hartlap-scaled χ² would understate the tails). Minimised
  by scipy L-BFGS-B with jax gradients in the box (multi-start). Intervals: **profile likelihood**
  (Δ(−2 ln L) = 1, each θ_j on a grid with the others re-minimised), clipped at the box edges and
  flagged.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import sys
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.optimize
from jaxtyping import Array, ArrayLike, Float
from scipy import stats

import crjax
from crjax import gradients as G
from inference import inverse

__all__ = [
    "DEFAULT_DESIGN",
    "Design",
    "Emulator",
    "ShapeFit",
    "build_emulator",
    "fit_shape",
    "fit_simulation_file",
    "format_simulation_report",
    "holdout_validation",
    "load_emulator",
    "loo_validation",
    "predict",
    "save_emulator",
    "simulate_components",
]

THETA_NAMES = ("sigma2", "rL", "angle")
_ANGLE_MAX = 0.5 * np.pi  # Ĉ_ℓ(α) is even and π-periodic: α ∈ [0, π/2] covers every direction
_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Design:
    """The simulations behind an emulator (all that fixes them; validated by :meth:`check`).

    Box: ``sigma2_range``, ``rL_range`` (log-uniform). Each of ``n_points`` points: ``n_realisations``
    Gaussian-amplitude realisations, ``n_modes`` modes, nside, one save time ``t_end`` (Lc/c) with step
    ``dt`` (default rL_min/20), γ = ``gamma``; keys from ``seed``. ``ell_max``: the emulated
    ℓ = 1..ell_max (default 3·nside − 1).
    """

    sigma2_range: tuple[float, float] = (0.25, 4.0)
    rL_range: tuple[float, float] = (0.05, 0.2)
    n_points: int = 16
    n_realisations: int = 64
    nside: int = 4
    n_modes: int = 8
    t_end: float = 1.0
    dt: float | None = None
    gamma: float = 11.0 / 3.0
    seed: int = 0
    ell_max: int | None = None

    def check(self) -> Design:
        for name, (lo, hi) in (("sigma2_range", self.sigma2_range), ("rL_range", self.rL_range)):
            if not (math.isfinite(lo) and math.isfinite(hi) and 0 < lo < hi):
                raise ValueError(f"{name} must be finite with 0 < low < high; got {lo:g} {hi:g}")
        if self.rL_range[1] > 1.0:
            # beyond rL ~ Lc the particles barely scatter within t_end: not the regime of the model
            raise ValueError(f"rL_range high must be <= 1 (Lc); got {self.rL_range[1]:g}")
        if self.sigma2_range[1] > 100.0:
            raise ValueError(f"sigma2_range high must be <= 100; got {self.sigma2_range[1]:g}")
        for name, v, lo in (("n_points", self.n_points, 6), ("n_realisations", self.n_realisations, 4),
                            ("n_modes", self.n_modes, 1)):
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
        if self.nside not in (1, 2, 4, 8, 16):
            raise ValueError(f"nside must be 1, 2, 4, 8 or 16 for an emulator design; got {self.nside!r}")
        if self.ell_max is not None and (isinstance(self.ell_max, bool) or not isinstance(
                self.ell_max, int) or not 1 <= self.ell_max <= 3 * self.nside - 1):
            raise ValueError(f"ell_max must be an integer in [1, 3*nside - 1 = {3 * self.nside - 1}]; "
                             f"got {self.ell_max!r}")
        if not (math.isfinite(self.t_end) and self.t_end > 0):
            raise ValueError(f"t_end must be finite and > 0; got {self.t_end!r}")
        if self.dt is not None and not (math.isfinite(self.dt) and 0 < self.dt <= self.t_end):
            raise ValueError(f"dt must be in (0, t_end]; got {self.dt!r}")
        if not (math.isfinite(self.gamma) and self.gamma > 0):
            raise ValueError(f"gamma must be finite and > 0; got {self.gamma!r}")
        if not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32); got {self.seed!r}")
        return self

    @property
    def step(self) -> float:
        return self.rL_range[0] / 20.0 if self.dt is None else float(self.dt)

    @property
    def lmax(self) -> int:
        return 3 * self.nside - 1 if self.ell_max is None else self.ell_max

    def describe(self) -> str:
        return (f"{self.n_points} design points × {self.n_realisations} realisations, nside "
                f"{self.nside} (ℓ ≤ {self.lmax}), {self.n_modes} modes, T = {self.t_end:g} Lc/c (dt = {self.step:g}), "
                f"σ² in [{self.sigma2_range[0]:g}, {self.sigma2_range[1]:g}], rL/Lc in "
                f"[{self.rL_range[0]:g}, {self.rL_range[1]:g}], γ = {self.gamma:.4g}")


#: the design ``crjax fit --model simulation`` builds when no ``--emulator`` is given (~10 s on 2 cores)
DEFAULT_DESIGN = Design()


# ----------------------------------------------------------------------------------------------
# box coordinates


def _to_unit(design: Design, sigma2, rL):
    """(σ², rL) → the unit square (log-uniform in the box)."""
    (s0, s1), (r0, r1) = design.sigma2_range, design.rL_range
    return jnp.stack([(jnp.log(sigma2) - math.log(s0)) / math.log(s1 / s0),
                      (jnp.log(rL) - math.log(r0)) / math.log(r1 / r0)], -1)


def _from_unit(design: Design, u):
    u = np.asarray(u, dtype=float)
    (s0, s1), (r0, r1) = design.sigma2_range, design.rL_range
    return s0 * (s1 / s0) ** u[..., 0], r0 * (r1 / r0) ** u[..., 1]


def _latin_hypercube(n: int, seed: int) -> np.ndarray:
    from scipy.stats import qmc

    return qmc.LatinHypercube(d=2, seed=seed, optimization="random-cd").random(n)


# ----------------------------------------------------------------------------------------------
# simulations


def simulate_components(
    design: Design, sigma2: float, rL: float, key
) -> tuple[np.ndarray, np.ndarray]:
    """Per-realisation (a_ℓ, b_ℓ), ℓ = 1..ℓmax at ``t_end``: shape (n_realisations, 2, L).

    The symmetrised tensor spectra of ``inference.inverse`` (same reducer, same Gaussian-amplitude
    realisations as ``tensor_sample``); a = Ĉ_ℓ(α = π/2), b = Ĉ_ℓ(α = 0). Returns (samples, f) with f
    the unsymmetrised (nreal, 3, 3, L+1) tensor (for checks against ``spectrum_model``).
    """
    params = inverse._params_for(crjax.FieldParams(n_modes=design.n_modes),
                                 [sigma2, rL, design.gamma, 0.0])
    f, _ = crjax.run_ensemble(params, key, design.n_realisations, design.nside,
                              jnp.asarray([design.t_end]), rL=float(rL), dt=design.step,
                              chunk_size=16, reducer=inverse._tensor_reducer(design.lmax),
                              realise=G.realise_gaussian_field)
    f = f[:, -1]
    s = inverse._symmetrise(f)
    comps = jnp.stack([s[:, 0, 0, 1:], s[:, 2, 2, 1:]], 1)
    return np.asarray(comps), np.asarray(f)


def _design_keys(design: Design):
    return jax.random.PRNGKey(design.seed)


def _simulate_design(design: Design, progress: Callable[[int, int], None] | None = None):
    u = _latin_hypercube(design.n_points, design.seed)
    s2, rl = _from_unit(design, u)
    key = _design_keys(design)
    means, variances = [], []
    for i in range(design.n_points):
        c, _ = simulate_components(design, float(s2[i]), float(rl[i]), jax.random.fold_in(key, i))
        means.append(c.mean(0))
        variances.append(c.var(0, ddof=1) / c.shape[0])
        if progress is not None:
            progress(i + 1, design.n_points)
    return u, np.asarray(means).reshape(design.n_points, -1), \
        np.asarray(variances).reshape(design.n_points, -1)


# ----------------------------------------------------------------------------------------------
# Gaussian process (pure JAX)

_N_HYPER = 5  # log s, log ℓ_1, log ℓ_2, log c, log nugget
# weak log-normal priors (MAP-II): centres and widths in log space. Length 0.5 of the box, unit
# amplitude (outputs are standardised), nugget 1e-3 of the output variance — each ±e^1.5 ≈ ×4.5
_PRIOR_MU = np.array([0.0, math.log(0.5), math.log(0.5), 0.0, math.log(1e-3)])
_PRIOR_SD = np.array([1.5, 1.0, 1.0, 1.5, 2.0])


def _kernel(h, x1, x2):
    """k(x1, x2) for hyper-parameters h (5,): SE + marginalised linear mean."""
    s2, ls, c2 = jnp.exp(2 * h[0]), jnp.exp(h[1:3]), jnp.exp(2 * h[3])
    d = (x1[:, None, :] - x2[None, :, :]) / ls[None, None, :]
    lin = 1.0 + 4.0 * (x1 - 0.5) @ (x2 - 0.5).T
    return s2 * jnp.exp(-0.5 * jnp.sum(d * d, -1)) + c2 * lin


def _gram(h, x, noise):
    return _kernel(h, x, x) + jnp.diag(noise + jnp.exp(h[4]) + 1e-10)


def _neg_log_post(h, x, y, noise):
    k = _gram(h, x, noise)
    chol = jnp.linalg.cholesky(k)
    alpha = jax.scipy.linalg.cho_solve((chol, True), y)
    nll = 0.5 * y @ alpha + jnp.sum(jnp.log(jnp.diag(chol)))
    return nll + 0.5 * jnp.sum(((h - _PRIOR_MU) / _PRIOR_SD) ** 2)


@functools.partial(jax.jit, static_argnames=("steps",))
def _fit_hyper(x, y, noise, steps: int = 400):
    """MAP-II hyper-parameters per output: vmapped Adam (lr 0.05) from the prior centre."""
    opt = optax.adam(0.05)

    def one(yk, nk):
        def step(carry, _):
            h, st = carry
            g = jax.grad(_neg_log_post)(h, x, yk, nk)
            upd, st = opt.update(g, st)
            return (h + upd, st), None

        h0 = jnp.asarray(_PRIOR_MU)
        (h, _), _ = jax.lax.scan(step, (h0, opt.init(h0)), None, length=steps)
        return h

    return jax.vmap(one, in_axes=(1, 1))(y, noise)


class Emulator(eqx.Module):
    """GP emulator of (a_ℓ, b_ℓ) over the design box (module doc). K = 2L outputs, n design points.

    Arrays: ``x`` (n, 2) design in the unit square; ``y`` (n, K) design means; ``noise`` (n, K) their
    variances; ``hyper`` (K, 5); ``alpha`` (K, n) = K⁻¹ z; ``kinv`` (K, n, n); ``y_mean``, ``y_scale``,
    ``sign`` (K,) (sign ±1: log|x| model, 0: linear). ``design`` and ``ell`` (L,) are static.
    """

    x: Float[Array, "n 2"]
    y: Float[Array, "n K"]
    noise: Float[Array, "n K"]
    hyper: Float[Array, "K 5"]
    alpha: Float[Array, "K n"]
    kinv: Float[Array, "K n n"]
    y_mean: Float[Array, " K"]
    y_scale: Float[Array, " K"]
    sign: Float[Array, " K"]
    design: Design = eqx.field(static=True)

    @property
    def ell(self) -> np.ndarray:
        return np.arange(1, self.design.lmax + 1)

    @property
    def n_ell(self) -> int:
        return self.design.lmax


def _transform(y, noise, sign):
    """Design means and variances in the model space: log|x| (delta method) where sign ≠ 0."""
    logm = sign != 0
    safe = np.where(logm, np.abs(y), 1.0)
    t = np.where(logm, np.log(safe), y)
    tv = np.where(logm, noise / safe**2, noise)
    return t, tv


def _assemble(design: Design, x, y, noise, hyper=None, steps: int = 400) -> Emulator:
    se = np.sqrt(noise)
    sign = np.where(np.all(y > 3 * se, 0), 1.0, np.where(np.all(y < -3 * se, 0), -1.0, 0.0))
    t, tv = _transform(y, noise, sign)
    mean = t.mean(0)
    scale = np.where(t.std(0) > 0, t.std(0), 1.0)
    z, zv = (t - mean) / scale, tv / scale**2
    xj, zj, zvj = jnp.asarray(x), jnp.asarray(z), jnp.asarray(zv)
    h = _fit_hyper(xj, zj, zvj, steps=steps) if hyper is None else jnp.asarray(hyper)
    grams = jax.vmap(lambda hk, nk: _gram(hk, xj, nk), in_axes=(0, 1))(h, zvj)
    kinv = jnp.linalg.inv(grams)
    kinv = 0.5 * (kinv + jnp.swapaxes(kinv, -1, -2))
    alpha = jnp.einsum("knm,mk->kn", kinv, zj)
    return Emulator(xj, jnp.asarray(y), jnp.asarray(noise), h, alpha, kinv, jnp.asarray(mean),
                    jnp.asarray(scale), jnp.asarray(sign), design)


def build_emulator(
    design: Design = DEFAULT_DESIGN, *, progress: Callable[[int, int], None] | None = None
) -> Emulator:
    """Simulate ``design`` (``progress(done, total)`` after each point) and fit the GPs."""
    design = design.check()
    x, y, noise = _simulate_design(design, progress)
    return _assemble(design, x, y, noise)


def _components(emu: Emulator, sigma2, rL):
    """(mean, var) of the K components at (σ², rL) (scalars): pure and differentiable."""
    u = _to_unit(emu.design, jnp.asarray(sigma2), jnp.asarray(rL))[None, :]
    ks = jax.vmap(lambda h: _kernel(h, u, emu.x)[0])(emu.hyper)  # (K, n)
    kss = jax.vmap(lambda h: _kernel(h, u, u)[0, 0])(emu.hyper)  # (K,)
    mz = jnp.sum(ks * emu.alpha, -1)
    vz = jnp.maximum(kss - jnp.einsum("kn,knm,km->k", ks, emu.kinv, ks), 0.0)
    t = emu.y_mean + emu.y_scale * mz
    vt = emu.y_scale**2 * vz
    logm = emu.sign != 0
    x = jnp.where(logm, emu.sign * jnp.exp(jnp.where(logm, t, 0.0)), t)
    v = jnp.where(logm, x**2 * vt, vt)
    return x, v


def predict(
    emu: Emulator, sigma2: ArrayLike, rL: ArrayLike, angle: ArrayLike
) -> tuple[Float[Array, " L"], Float[Array, " L"]]:
    """θ ↦ (Ĉ_ℓ, emulator variance), ℓ = 1..ℓmax: Ĉ_ℓ = sin²α a_ℓ + cos²α b_ℓ (pure, differentiable)."""
    x, v = _components(emu, sigma2, rL)
    n = emu.n_ell
    s2, c2 = jnp.sin(angle) ** 2, jnp.cos(angle) ** 2
    return s2 * x[:n] + c2 * x[n:], s2**2 * v[:n] + c2**2 * v[n:]


# ----------------------------------------------------------------------------------------------
# validation


def loo_validation(emu: Emulator) -> dict:
    """Closed-form leave-one-out at the fitted hyper-parameters (Rasmussen & Williams §5.4.2).

    Per design point i and component k: the LOO prediction of the design mean and its predictive
    variance (GP + the point's noise), in the model space; returns ``z`` (n, K) standardised residuals
    (O(1) if the GP and the noise model are right), ``rel`` (n, K) |LOO prediction − design mean| /
    |design mean| in the component's own units (NaN where the mean is not resolved, |mean| < 3 SE),
    and summaries: rms z, fraction |z| < 2, median and 90% quantile of rel.
    """
    y, noise, sign = np.asarray(emu.y), np.asarray(emu.noise), np.asarray(emu.sign)
    t, _ = _transform(y, noise, sign)
    kinv = np.asarray(emu.kinv)
    alpha = np.asarray(emu.alpha)  # (K, n)
    d = np.einsum("knn->kn", kinv)
    z = (alpha / np.sqrt(d)).T  # (n, K)
    t_loo = t - (np.asarray(emu.y_scale) * (alpha / d).T)
    logm = sign != 0
    x_loo = np.where(logm, sign * np.exp(np.where(logm, t_loo, 0.0)), t_loo)
    resolved = np.abs(y) > 3 * np.sqrt(noise)
    rel = np.where(resolved, np.abs(x_loo - y) / np.where(resolved, np.abs(y), 1.0), np.nan)
    return {"z": z, "rel": rel, "rms_z": float(np.sqrt(np.mean(z**2))),
            "frac_abs_z_below_2": float(np.mean(np.abs(z) < 2)),
            "median_rel": float(np.nanmedian(rel)), "q90_rel": float(np.nanquantile(rel, 0.9))}


def holdout_validation(emu: Emulator, n_points: int = 6, *, seed: int = 1) -> dict:
    """Fresh simulations at ``n_points`` new θ (a Latin hypercube with ``seed``, keys disjoint from
    the design's): standardised residuals (simulation − emulator)/√(var_sim + var_emu) of (a, b) and
    relative errors where the simulation resolves the component (|mean| > 3 SE); as ``loo_validation``.
    """
    d = emu.design
    u = _latin_hypercube(n_points, seed + 7919)  # another design than the emulator's
    s2, rl = _from_unit(d, u)
    key = jax.random.fold_in(jax.random.PRNGKey(d.seed), 10**6 + seed)
    zs, rels = [], []
    for i in range(n_points):
        c, _ = simulate_components(d, float(s2[i]), float(rl[i]), jax.random.fold_in(key, i))
        m, v = c.mean(0).ravel(), c.var(0, ddof=1).ravel() / c.shape[0]
        e, ev = (np.asarray(a) for a in _components(emu, float(s2[i]), float(rl[i])))
        zs.append((m - e) / np.sqrt(v + ev))
        ok = np.abs(m) > 3 * np.sqrt(v)
        rels.append(np.where(ok, np.abs(m - e) / np.where(ok, np.abs(m), 1.0), np.nan))
    z, rel = np.asarray(zs), np.asarray(rels)
    return {"theta": np.stack([s2, rl], 1), "z": z, "rel": rel,
            "rms_z": float(np.sqrt(np.mean(z**2))),
            "frac_abs_z_below_2": float(np.mean(np.abs(z) < 2)),
            "median_rel": float(np.nanmedian(rel)), "q90_rel": float(np.nanquantile(rel, 0.9))}


# ----------------------------------------------------------------------------------------------
# save / load


def save_emulator(path: str | os.PathLike, emu: Emulator) -> None:
    """Write the design and its simulated means (the fit is redone on load: exact, ~1 s)."""
    meta = dataclasses.asdict(emu.design)
    np.savez(os.fspath(path), x=np.asarray(emu.x), y=np.asarray(emu.y),
             noise=np.asarray(emu.noise), hyper=np.asarray(emu.hyper),
             meta=np.asarray(json.dumps({"format": _FORMAT_VERSION, "design": meta})))


def load_emulator(path: str | os.PathLike) -> Emulator:
    """Read what :func:`save_emulator` wrote (ValueError naming the file if it is not one)."""
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ValueError(f"emulator file {p!r} does not exist or is not a file")
    try:
        with np.load(p, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            x, y, noise, hyper = (np.asarray(z[k], dtype=float) for k in ("x", "y", "noise", "hyper"))
    except (OSError, KeyError, ValueError, json.JSONDecodeError) as err:
        raise ValueError(f"{p}: not an emulator file written by crjax ({type(err).__name__})") from err
    if meta.get("format") != _FORMAT_VERSION:
        raise ValueError(f"{p}: emulator format {meta.get('format')!r}; expected {_FORMAT_VERSION}")
    d = meta["design"]
    design = Design(**{**d, "sigma2_range": tuple(d["sigma2_range"]),
                       "rL_range": tuple(d["rL_range"])}).check()
    k = 2 * design.lmax
    if x.shape != (design.n_points, 2) or y.shape != (design.n_points, k) or \
            noise.shape != y.shape or hyper.shape != (k, _N_HYPER):
        raise ValueError(f"{p}: emulator arrays do not match its design ({design.describe()})")
    return _assemble(design, x, y, noise, hyper=hyper)


# ----------------------------------------------------------------------------------------------
# the shape fit


@dataclasses.dataclass(frozen=True)
class ShapeFit:
    """Best-fit θ = (σ², rL, α) of A·Ĉ_ℓ(θ) (+ N); ``intervals`` 68% profile-likelihood (Δ(−2lnL) =
    1), ``at_boundary`` (low, high) per parameter clipped at the box; ``amplitude`` Â (1 when not
    profiled); ``chi2`` with the data covariance plus the emulator variance, ``m2lnl`` the minimised
    −2 ln L (module doc); ``dof`` = L − 3 − (1 if the amplitude is profiled); ``likelihood``
    "gaussian" or "sellentin-heavens"; ``covariance`` "diagonal" or "full"."""

    theta: np.ndarray
    intervals: np.ndarray
    at_boundary: np.ndarray
    amplitude: float
    chi2: float
    m2lnl: float
    dof: int
    pvalue: float
    ell: np.ndarray
    profiles: dict
    converged: bool
    amplitude_profiled: bool = True
    likelihood: str = "gaussian"
    covariance: str = "diagonal"

    def summary(self) -> dict:
        out = {"model": "simulation", "lmin": int(self.ell.min()), "lmax": int(self.ell.max()),
               "amplitude": float(self.amplitude), "amplitude_profiled": self.amplitude_profiled,
               "likelihood": self.likelihood, "covariance": self.covariance, "chi2": float(self.chi2),
               "minus2lnL": float(self.m2lnl), "dof": int(self.dof), "pvalue": float(self.pvalue),
               "interval_method": "profile likelihood, delta(-2 ln L) = 1, others re-minimised",
               "converged": bool(self.converged)}
        for i, n in enumerate(THETA_NAMES):
            out[n] = float(self.theta[i])
            out[f"{n}_interval_68"] = [float(v) for v in self.intervals[i]]
            out[f"{n}_interval_at_boundary"] = [bool(v) for v in self.at_boundary[i]]
        return out


def _theta_of_unit(design: Design, w):
    """Fit coordinates w ∈ [0,1]³ → (σ², rL, α) (jnp, differentiable)."""
    (s0, s1), (r0, r1) = design.sigma2_range, design.rL_range
    return s0 * (s1 / s0) ** w[0], r0 * (r1 / r0) ** w[1], _ANGLE_MAX * w[2]


def _objective(emu: Emulator, idx, d, cov, *, amplitude_free: bool = True, n_cov: int | None = None):
    """−2 ln L(w) (up to a constant) and (χ², Â) (module doc): data covariance ``cov`` (L, L) plus the
    emulator variance A²·diag(v); Â profiled in closed form (GLS, fixed-point in the weights) when
    ``amplitude_free``, else 1; ``n_cov``: the covariance is a sample covariance of that many
    realisations, and χ² enters through Sellentin & Heavens' (2016) t-likelihood n·ln(1 + χ²/(n − 1))."""
    logdet_c = float(np.linalg.slogdet(np.asarray(cov))[1])

    def f(w):
        s2, rl, a = _theta_of_unit(emu.design, w)
        m, v = predict(emu, s2, rl, a)
        m, v = m[idx], v[idx]
        if amplitude_free:
            amp = m @ jnp.linalg.solve(cov, d) / (m @ jnp.linalg.solve(cov, m))
            for _ in range(4):  # the weights depend on Â through A²v: a few fixed-point steps
                tot = cov + jnp.diag(amp**2 * v)
                amp = m @ jnp.linalg.solve(tot, d) / (m @ jnp.linalg.solve(tot, m))
        else:
            amp = jnp.asarray(1.0, m.dtype)
        tot = cov + jnp.diag(amp**2 * v)
        chol = jnp.linalg.cholesky(tot)
        z = jax.scipy.linalg.solve_triangular(chol, d - amp * m, lower=True)
        chi2 = z @ z
        # the log-det term: without it the fit is pulled to θ where the emulator is least sure
        logdet = 2.0 * jnp.sum(jnp.log(jnp.diag(chol))) - logdet_c
        fit = chi2 if n_cov is None else n_cov * jnp.log1p(chi2 / (n_cov - 1))
        return fit + logdet, (chi2, amp)

    return f


def _minimise(vg, w0, fixed=None):
    """L-BFGS-B in the unit cube; ``fixed`` = (j, value) holds w_j."""
    free = [i for i in range(3) if fixed is None or i != fixed[0]]

    def full(v):
        w = np.empty(3)
        w[free] = v
        if fixed is not None:
            w[fixed[0]] = fixed[1]
        return w

    def fun(v):
        val, g = vg(jnp.asarray(full(v)))
        return float(val), np.asarray(g)[free]

    r = scipy.optimize.minimize(fun, np.asarray(w0)[free], jac=True, method="L-BFGS-B",
                                bounds=[(0.0, 1.0)] * len(free), options={"maxiter": 200})
    return full(r.x), float(r.fun), bool(r.success)


def fit_shape(
    emu: Emulator,
    ell: ArrayLike,
    cl: ArrayLike,
    sigma: ArrayLike | None = None,
    *,
    covariance: ArrayLike | None = None,
    amplitude: str = "profiled",
    n_cov: int | None = None,
    noise: float = 0.0,
    n_starts: int = 8,
    n_grid: int = 25,
) -> ShapeFit:
    """Fit θ to a spectrum (module doc). ``ell`` must lie in the emulator's 1..ℓmax and hold at least
    3 + (amplitude profiled) + 1 multipoles; errors either ``sigma`` (1σ, independent multipoles) or
    the full ``covariance`` (L, L); ``amplitude`` "profiled" fits the shape (A·Ĉ_ℓ, A free), "fixed"
    the spectrum itself (A = 1); ``n_cov``: the errors were estimated from that many realisations
    (Sellentin–Heavens likelihood; must exceed L + 1). ``noise`` N is added to the model (0 for a
    noise-subtracted spectrum). ``n_starts`` L-BFGS-B starts (a Latin hypercube), ``n_grid`` points
    per profile."""
    if amplitude not in ("profiled", "fixed"):
        raise ValueError(f"amplitude must be 'profiled' or 'fixed'; got {amplitude!r}")
    free_amp = amplitude == "profiled"
    n_min = 5 if free_amp else 4
    e = np.asarray(ell, dtype=int)
    if e.ndim != 1 or e.size < n_min or e.min() < 1 or e.max() > emu.n_ell or \
            np.unique(e).size != e.size:
        raise ValueError(f"ell must hold >= {n_min} distinct multipoles in the emulator's range "
                         f"1..{emu.n_ell} (3 parameters{', the amplitude' if free_amp else ''} and "
                         f"1 dof); got {e.tolist()}")
    d = np.asarray(cl, dtype=float) - float(noise)
    if (sigma is None) == (covariance is None):
        raise ValueError("give exactly one of sigma (1σ errors) and covariance")
    if covariance is None:
        var = np.asarray(sigma, dtype=float) ** 2
        if var.shape != e.shape or not np.all(np.isfinite(var)) or np.any(var <= 0):
            raise ValueError("sigma must be finite, of the shape of ell, sigma > 0")
        cov = np.diag(var)
    else:
        cov = np.asarray(covariance, dtype=float)
        if cov.shape != (e.size, e.size) or not np.all(np.isfinite(cov)) or \
                not np.allclose(cov, cov.T, rtol=1e-10, atol=0.0) or np.linalg.eigvalsh(cov).min() <= 0:
            raise ValueError(f"covariance must be a finite symmetric positive-definite "
                             f"{e.size}x{e.size} matrix (one row per ell)")
    if d.shape != e.shape or not np.all(np.isfinite(d)):
        raise ValueError("cl must be finite and of the shape of ell")
    if n_cov is not None and (isinstance(n_cov, bool) or not isinstance(n_cov, int | np.integer)
                              or n_cov <= e.size + 1):
        raise ValueError(f"n_cov must be an integer > L + 1 = {e.size + 1}; got {n_cov!r}")
    obj = _objective(emu, jnp.asarray(e - 1), jnp.asarray(d), jnp.asarray(cov),
                     amplitude_free=free_amp, n_cov=None if n_cov is None else int(n_cov))
    vg = jax.jit(jax.value_and_grad(lambda w: obj(w)[0]))
    aux = jax.jit(lambda w: obj(w)[1])
    from scipy.stats import qmc

    starts = qmc.LatinHypercube(d=3, seed=0).random(n_starts)
    best = min((_minimise(vg, s) for s in starts), key=lambda r: r[1])
    w_hat, f_hat, ok = best
    grid = np.linspace(0.0, 1.0, n_grid)
    intervals, clipped, profiles = np.zeros((3, 2)), np.zeros((3, 2), bool), {}
    theta_hat = np.array([float(v) for v in _theta_of_unit(emu.design, jnp.asarray(w_hat))])
    for j in range(3):
        prof = []
        for g in grid:
            w0 = w_hat.copy()
            w0[j] = g
            prof.append(_minimise(vg, w0, (j, g))[1])  # warm start at the best fit
        prof = np.asarray(prof)
        f_min = min(f_hat, float(prof.min()))
        lo, hi, cl_lo, cl_hi = _crossings(grid, prof - f_min, w_hat[j])
        ends = []
        for v in (lo, hi):
            w = w_hat.copy()
            w[j] = v
            ends.append(float(_theta_of_unit(emu.design, jnp.asarray(w))[j]))
        intervals[j] = ends
        clipped[j] = (cl_lo, cl_hi)
        profiles[THETA_NAMES[j]] = {
            "grid": [float(_theta_of_unit(emu.design, jnp.asarray(np.r_[g, g, g]))[j]) for g in grid],
            "delta_minus2lnL": (prof - f_min).tolist()}
    chi2, amp = (float(v) for v in aux(jnp.asarray(w_hat)))
    dof = e.size - 3 - int(free_amp)
    return ShapeFit(theta=theta_hat, intervals=intervals, at_boundary=clipped, amplitude=amp,
                    chi2=chi2, m2lnl=f_hat, dof=dof, pvalue=float(stats.chi2.sf(chi2, dof)),
                    ell=e, profiles=profiles, converged=ok, amplitude_profiled=free_amp,
                    likelihood="gaussian" if n_cov is None else "sellentin-heavens",
                    covariance="diagonal" if covariance is None else "full")


def _crossings(grid, delta, w_best):
    """Where the profile Δ(−2 ln L) crosses 1 on either side of the best fit (linear interpolation
    between grid points); clipped at the box edge (flagged) if it never does."""
    out, flags = [], []
    i0 = int(np.clip(np.searchsorted(grid, w_best), 0, grid.size - 1))
    for side in (-1, 1):
        idx = range(i0, -1, -1) if side < 0 else range(i0, grid.size)
        prev_g, prev_d = w_best, 0.0
        found = None
        for i in idx:
            if (grid[i] - w_best) * side < 0:
                continue
            if delta[i] > 1.0:
                t = (1.0 - prev_d) / (delta[i] - prev_d) if delta[i] != prev_d else 0.0
                found = prev_g + t * (grid[i] - prev_g)
                break
            prev_g, prev_d = grid[i], max(delta[i], 0.0)
        out.append(float(found) if found is not None else (0.0 if side < 0 else 1.0))
        flags.append(found is None)
    return out[0], out[1], flags[0], flags[1]


# ----------------------------------------------------------------------------------------------
# the command's work: crjax fit --model simulation FILE


def fit_simulation_file(
    path: str | os.PathLike,
    *,
    emulator: Emulator | str | os.PathLike | None = None,
    design: Design = DEFAULT_DESIGN,
    save_emulator_to: str | os.PathLike | None = None,
    lmin: int | None = None,
    lmax: int | None = None,
    noise: str = "auto",
    noise_level: float | None = None,
    output: str | os.PathLike | None = None,
    quiet: bool = False,
    progress: bool = True,
) -> dict:
    """Load the spectrum file, check it against the emulator's ℓ range, build (or load) the emulator,
    fit (:func:`fit_shape`), print the report and write it as JSON. ValueError before any simulation
    or write for bad input."""
    from inference.data import load_spectrum

    spectrum = load_spectrum(path)
    if noise not in ("auto", "none", "fixed"):
        raise ValueError(f"--noise {noise} is not available with --model simulation "
                         "(auto, none or fixed)")
    if noise == "none" or (noise == "auto" and spectrum.noise_subtracted):
        n_level = 0.0
    elif noise_level is not None:
        n_level = float(noise_level)
    elif spectrum.noise_level is not None:
        n_level = float(spectrum.noise_level)
    else:
        raise ValueError(f"{path}: the simulation model needs the noise level: the file says neither "
                         "noise_subtracted: true nor noise_level (or give --noise-level)")
    emu_lmax = (emulator.n_ell if isinstance(emulator, Emulator) else None)
    if emulator is not None and not isinstance(emulator, Emulator):
        emulator = load_emulator(emulator)
        emu_lmax = emulator.n_ell
    if emu_lmax is None:
        emu_lmax = design.check().lmax
    lo = max(1, lmin or 1)
    hi = min(emu_lmax, lmax if lmax is not None else emu_lmax)
    keep = (spectrum.ell >= lo) & (spectrum.ell <= hi)
    if np.count_nonzero(keep) < 5:
        raise ValueError(
            f"{path}: {np.count_nonzero(keep)} multipoles in ell = {lo}..{hi} (the emulator covers "
            f"1..{emu_lmax}); the simulation model needs >= 5 (3 parameters, amplitude, 1 dof)")
    if emulator is None:
        if not quiet:
            print(f"crjax fit: building the default emulator: {design.describe()}", file=sys.stderr)

        def show(i, n):
            if progress and not quiet:
                print(f"  design point {i}/{n}", file=sys.stderr, flush=True)

        emulator = build_emulator(design, progress=show)
        if save_emulator_to is not None:
            save_emulator(save_emulator_to, emulator)
    sig = 0.5 * (spectrum.err_lo[keep] + spectrum.err_hi[keep])  # symmetric: the χ² is Gaussian
    fit = fit_shape(emulator, spectrum.ell[keep], spectrum.cl[keep], sig, noise=n_level)
    loo = loo_validation(emulator)
    report = {"file": os.fspath(path), "metadata": spectrum.metadata(), "simulation": fit.summary(),
              "noise": n_level, "emulator": {
                  "design": emulator.design.describe(),
                  "loo_rms_z": loo["rms_z"], "loo_median_rel": loo["median_rel"],
                  "saved_to": None if save_emulator_to is None else os.fspath(save_emulator_to)},
              "errors": "per-multipole errors (mean of err_lo, err_hi) plus the emulator variance; "
                        "multipoles treated as independent"}
    if not quiet:
        print(format_simulation_report(report))
    if output is not None:
        with open(os.fspath(output), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=float)
    return report


def format_simulation_report(report: dict) -> str:
    """Text report of :func:`fit_simulation_file`, in the style of ``crjax fit``'s BGK report."""
    s = report["simulation"]
    meta = report["metadata"]
    lines = [f"spectrum: {report['file']}" + ("  [SYNTHETIC]" if meta.get("synthetic") else "")]
    lines.append(f"  ell {s['lmin']}..{s['lmax']}, model simulation (emulator), noise "
                 f"{report['noise']:.4g}, amplitude profiled")
    lines.append(f"  emulator: {report['emulator']['design']}; leave-one-out rms z "
                 f"{report['emulator']['loo_rms_z']:.2f}, median relative error "
                 f"{report['emulator']['loo_median_rel']:.2g}")
    for n, label in (("sigma2", "sigma2"), ("rL", "rL/Lc "), ("angle", "angle ")):
        lo, hi = s[f"{n}_interval_68"]
        b = s[f"{n}_interval_at_boundary"]
        flag = " (interval reaches the box edge)" if any(b) else ""
        lines.append(f"  {label}= {s[n]:.4f}  (68%: {lo:.4f}..{hi:.4f}){flag}")
    lines.append(f"        C_1 scale A = {s['amplitude']:.4g}")
    lines.append(f"        chi2 = {s['chi2']:.2f} for {s['dof']} dof (p-value {s['pvalue']:.3f})"
                 + ("" if s["converged"] else "  WARNING: optimiser did not converge"))
    lines.append(f"  intervals: {s['interval_method']}")
    lines.append(f"  note: {report['errors']}")
    return "\n".join(lines)
