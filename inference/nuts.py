"""Bayesian fit of the BGK exponent p (seed (4.7)) with numpyro NUTS.

``fit_p_nuts`` samples the posterior of (p, A, N) under ``Priors`` with the likelihoods of
``inference.likelihoods`` (per-multipole errors) and reports 68% credible intervals, split R-hat and ESS
(``numpyro.diagnostics``) and a posterior predictive p-value. Compare with ``inference.ml.fit_p_map``
(flat priors) where N is clearly positive: NUTS gives a free N a HalfNormal prior (N ≥ 0).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from numbers import Real

import jax
import jax.numpy as jnp
import numpy as np

from inference.data import Spectrum
from inference.likelihoods import _chi2_terms, _data, _model, _prepare, _Prepared, _Static, _static

__all__ = ["NutsResult", "Priors", "fit_p_nuts"]


@dataclasses.dataclass(frozen=True)
class Priors:
    """Priors of ``fit_p_nuts`` (s = max|C_ℓ| of the fitted data, so they are scale-free).

    p ~ Uniform(p_low, p_high), 0 ≤ p_low < p_high ≤ 1 (the seed's 0 < p < 1);
    ln(A/s) ~ Normal(0, log_amplitude_sd): weakly informative over many e-folds of the amplitude;
    N/s ~ HalfNormal(noise_scale) when the noise is free (noise is a non-negative power).
    """

    p_low: float = 0.0
    p_high: float = 1.0
    log_amplitude_sd: float = 10.0
    noise_scale: float = 1.0

    def __post_init__(self):
        for name in ("p_low", "p_high", "log_amplitude_sd", "noise_scale"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
                raise ValueError(f"Priors.{name} must be a finite number; got {v!r}")
        if not (0.0 <= self.p_low < self.p_high <= 1.0):
            raise ValueError(
                f"Priors need 0 <= p_low < p_high <= 1 (p is the BGK exponent in (0, 1)); "
                f"got p_low={self.p_low}, p_high={self.p_high}"
            )
        if self.log_amplitude_sd <= 0:
            raise ValueError(f"Priors.log_amplitude_sd must be > 0; got {self.log_amplitude_sd}")
        if self.noise_scale <= 0:
            raise ValueError(f"Priors.noise_scale must be > 0; got {self.noise_scale}")


@dataclasses.dataclass(frozen=True)
class NutsResult:
    """NUTS posterior. ``samples``: dict of arrays (chains·draws,) for "p", "amplitude", "noise" (data
    units). ``*_interval``: central 68% credible intervals (16th–84th percentiles); ``r_hat``/``ess``:
    split R-hat and effective sample size per parameter (numpyro.diagnostics); ``ppc_pvalue``: posterior
    predictive p-value of the −2 ln L discrepancy (replicated data drawn from the likelihood)."""

    samples: dict
    p_median: float
    p_interval: tuple[float, float]
    amplitude_median: float
    amplitude_interval: tuple[float, float]
    noise_median: float
    noise_interval: tuple[float, float]
    noise_mode: str
    r_hat: dict
    ess: dict
    num_divergences: int
    ppc_pvalue: float
    ell: np.ndarray
    likelihood: str
    priors: Priors

    def summary(self) -> dict:
        return {
            "p_median": self.p_median,
            "p_interval_68": list(self.p_interval),
            "amplitude_median": self.amplitude_median,
            "amplitude_interval_68": list(self.amplitude_interval),
            "noise_median": self.noise_median,
            "noise_interval_68": list(self.noise_interval),
            "noise_mode": self.noise_mode,
            "r_hat": self.r_hat,
            "ess": self.ess,
            "num_divergences": self.num_divergences,
            "ppc_pvalue": self.ppc_pvalue,
            "likelihood": self.likelihood,
            "priors": dataclasses.asdict(self.priors),
        }


@functools.partial(jax.jit, static_argnums=0)
def _loglike_natural(st: _Static, data: dict, p, log_amp, noise):
    # one jitted call: numpyro's initialisation traces the model eagerly, op by op
    mu = _model(st, data, p, jnp.exp(log_amp), noise)
    return -0.5 * jnp.sum(
        data["w"]
        * _chi2_terms(st.likelihood, mu, data["x"], data["lo"], data["hi"], data["offset"])
    )


def _numpyro_model(st: _Static, priors: Priors):
    import numpyro
    import numpyro.distributions as dist

    def model(data):
        p = numpyro.sample("p", dist.Uniform(priors.p_low, priors.p_high))
        log_amp = numpyro.sample("log_amp", dist.Normal(0.0, priors.log_amplitude_sd))
        if st.noise_mode == "free":
            noise = numpyro.sample("noise_scaled", dist.HalfNormal(priors.noise_scale))
        else:
            noise = data["noise_fixed"]
        numpyro.factor("loglike", _loglike_natural(st, data, p, log_amp, noise))

    return model


def fit_p_nuts(
    spectrum: Spectrum,
    *,
    lmin: Real | None = None,
    lmax: Real | None = None,
    noise: str = "auto",
    noise_level: Real | None = None,
    likelihood: str = "auto",
    forward: object = None,  # a callable (checked: ValueError otherwise)
    forward_lmax: Real | None = None,
    priors: object = None,  # a Priors (checked: ValueError otherwise)
    num_warmup: Real = 500,
    num_samples: Real = 1000,
    num_chains: Real = 1,
    seed: Real = 0,
    n_ppc: Real = 200,
) -> NutsResult:
    """NUTS posterior of (p, A, N) for the BGK model (4.7); arguments as ``fit_p_map`` plus ``Priors``.

    Chains run sequentially (``num_chains`` ≥ 2 gives a between-chain R-hat; with one chain numpyro's
    split R-hat compares its halves).
    """
    from numpyro.diagnostics import summary as _summary
    from numpyro.infer import MCMC, NUTS

    prep = _prepare(spectrum, lmin, lmax, noise, noise_level, likelihood, forward, forward_lmax)
    priors = Priors() if priors is None else priors
    if not isinstance(priors, Priors):
        raise ValueError(  # noqa: TRY004  (project convention: every bad input is a ValueError)
            f"priors must be an inference.nuts.Priors; got {type(priors).__name__}"
        )
    for name, v, lo in (
        ("num_warmup", num_warmup, 1),
        ("num_samples", num_samples, 2),
        ("num_chains", num_chains, 1),
        ("seed", seed, 0),
        ("n_ppc", n_ppc, 1),
    ):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
    mcmc = MCMC(
        NUTS(_numpyro_model(_static(prep), priors), dense_mass=True),
        num_warmup=num_warmup,
        num_samples=num_samples,
        num_chains=num_chains,
        chain_method="sequential",
        progress_bar=False,
    )
    mcmc.run(jax.random.PRNGKey(seed), _data(prep), extra_fields=("diverging",))
    by_chain = {k: np.asarray(v) for k, v in mcmc.get_samples(group_by_chain=True).items()}
    diag = _summary(by_chain, prob=0.68)
    names = {"p": "p", "log_amp": "amplitude", "noise_scaled": "noise"}
    r_hat = {names[k]: float(v["r_hat"]) for k, v in diag.items()}
    ess = {names[k]: float(v["n_eff"]) for k, v in diag.items()}
    flat = {k: v.reshape(-1) for k, v in by_chain.items()}
    n = flat["p"].size
    samples = {
        "p": flat["p"],
        "amplitude": np.exp(flat["log_amp"]) * prep.scale,
        "noise": (flat["noise_scaled"] if "noise_scaled" in flat else np.full(n, prep.noise_fixed))
        * prep.scale,
    }

    def interval(a):
        lo, hi = np.percentile(a, [15.865525393145707, 84.13447460685429])
        return (float(lo), float(hi))

    ppc = _ppc_pvalue(prep, flat, n_ppc, seed)
    diverging = mcmc.get_extra_fields()["diverging"]
    return NutsResult(
        samples=samples,
        p_median=float(np.median(samples["p"])),
        p_interval=interval(samples["p"]),
        amplitude_median=float(np.median(samples["amplitude"])),
        amplitude_interval=interval(samples["amplitude"]),
        noise_median=float(np.median(samples["noise"])),
        noise_interval=interval(samples["noise"]),
        noise_mode=prep.noise_mode,
        r_hat=r_hat,
        ess=ess,
        num_divergences=int(np.sum(np.asarray(diverging))),
        ppc_pvalue=ppc,
        ell=prep.ell,
        likelihood=prep.likelihood,
        priors=priors,
    )


def _sample_data(rng, mu, lo, hi, kind, x=None, offset=0.0):
    """Replicated data x̃ given μ under the likelihood (split normal in x̂: width σ⁺ below μ, σ⁻ above)."""
    if kind == "gaussian":
        return mu + 0.5 * (lo + hi) * rng.standard_normal(mu.shape)
    z = np.abs(rng.standard_normal(mu.shape))
    if kind == "lognormal":
        # the data's log-interval is centred on ln x̂ + shift; a replicate keeps width and shift
        z_lo, z_hi = np.log(x + offset - lo), np.log(x + offset + hi)
        shift = 0.5 * (z_lo + z_hi) - np.log(x + offset)
        zmu = np.log(np.maximum(mu + offset, 1e-300))
        return np.exp(zmu - shift + 0.5 * (z_hi - z_lo) * rng.standard_normal(mu.shape)) - offset
    # variable_gaussian is approximated by the split normal for replication
    below = rng.random(mu.shape) < hi / (hi + lo)
    return np.where(below, mu - hi * z, mu + lo * z)


@functools.partial(jax.jit, static_argnums=0)
def _model_batch(st: _Static, data: dict, p, amp, noise):
    return jax.vmap(lambda p, a, nz: _model(st, data, p, a, nz))(p, amp, noise)


def _ppc_pvalue(prep: _Prepared, flat: dict, n_ppc: int, seed: int) -> float:
    rng = np.random.default_rng(seed)
    idx = rng.choice(flat["p"].size, size=min(n_ppc, flat["p"].size), replace=False)
    noise = flat.get("noise_scaled", np.full(flat["p"].size, prep.noise_fixed))
    mus = np.asarray(
        _model_batch(
            _static(prep),
            _data(prep),
            jnp.asarray(flat["p"][idx]),
            jnp.asarray(np.exp(flat["log_amp"][idx])),
            jnp.asarray(noise[idx]),
        )
    )
    lo, hi = (np.broadcast_to(a, mus.shape) for a in (prep.lo, prep.hi))
    xb = np.broadcast_to(prep.x, mus.shape)
    rep = _sample_data(rng, mus, lo, hi, prep.likelihood, xb, prep.offset)
    t_obs = np.sum(np.asarray(_chi2_terms(prep.likelihood, mus, xb, lo, hi, prep.offset)), axis=1)
    t_rep = np.sum(np.asarray(_chi2_terms(prep.likelihood, mus, rep, lo, hi, prep.offset)), axis=1)
    extreme = int(np.sum(t_rep >= t_obs))
    return float(extreme / len(mus))
