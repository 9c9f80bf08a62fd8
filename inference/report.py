"""Reports of the fits: ``fit_spectrum_file`` (what ``crjax fit FILE`` runs), the data-vs-BGK figure
``plot_fit`` and the text reports, including the p-by-ℓ-range table (issue 9).

A spectrum file carries per-multipole errors only (``docs/spectrum_format.md``), so its fits and its
ℓ-range table treat the multipoles as independent: the report says so. The full-covariance fit of an
ensemble estimate is ``inference.covariance_fit``; ``format_covariance_summary`` prints its summary.
"""

from __future__ import annotations

import json
import math
import numbers
import os
from numbers import Real

import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logit

from crjax.theory import bgk_spectrum
from inference.data import Spectrum, load_spectrum
from inference.likelihoods import _data, _neg2loglike, _prepare, _static
from inference.ml import MapResult, fit_p_map, fit_p_map_by_lmax
from inference.nuts import Priors, fit_p_nuts

__all__ = ["fit_spectrum_file", "format_covariance_summary", "format_p_table", "plot_fit"]

DIAGONAL_NOTE = (
    "spectrum files carry per-multipole errors only: the fits treat the multipoles as independent "
    "(correlations between l are unknown, so the intervals may be too narrow)"
)


def _profile_curve(spectrum: Spectrum, result: MapResult, ell_plot, p):
    """The model curve at fixed p with the amplitude maximising the fit's own likelihood (N held at its
    best fit), on ell_plot (no forward model)."""
    from scipy.optimize import minimize_scalar

    prep = _prepare(
        spectrum,
        int(result.ell.min()),
        int(result.ell.max()),
        "fixed" if result.noise_mode != "none" else "none",
        # a free linear offset may come out (insignificantly) negative; a fixed level must be >= 0
        max(result.noise, 0.0) if result.noise_mode != "none" else None,
        result.likelihood,
        None,
        None,
    )
    st, data = _static(prep), _data(prep)
    lam = float(logit(p))
    a0 = math.log(max(result.amplitude / prep.scale, 1e-12))
    best = minimize_scalar(
        lambda la: float(_neg2loglike(st, data, jnp.array([lam, la]))), bracket=(a0 - 1, a0 + 1)
    )
    amp = math.exp(best.x) * prep.scale
    return amp * np.asarray(bgk_spectrum(ell_plot, p)) + (
        result.noise if result.noise_mode != "none" else 0.0
    )


def plot_fit(
    spectrum: Spectrum, result: MapResult, path: str | os.PathLike | None = None, *, title=None
):
    """Data (asymmetric error bars) vs the best-fit BGK curve and p = 1/3, 1/2, 2/3 (the seed's Fig. 3
    values; amplitude of each maximising the same likelihood at fixed p). Curves are full-sky models (no
    forward model is drawn). Returns the figure."""
    if not isinstance(spectrum, Spectrum) or not isinstance(result, MapResult):
        raise ValueError(  # noqa: TRY004  (project convention: every bad input is a ValueError)
            "plot_fit needs an inference.data.Spectrum and an inference.ml.MapResult; got "
            f"{type(spectrum).__name__} and {type(result).__name__}"
        )
    _check_out_path("path", path)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.errorbar(
        spectrum.ell,
        spectrum.cl,
        yerr=[spectrum.err_lo, spectrum.err_hi],
        fmt="o",
        ms=3,
        color="k",
        label=spectrum.experiment or "data",
        alpha=0.8,
    )
    ell_plot = np.arange(1, int(spectrum.ell.max()) + 1)
    nz = result.noise if result.noise_mode != "none" else 0.0
    for pv, ls in ((1 / 3, ":"), (1 / 2, "--"), (2 / 3, "-.")):
        ax.plot(
            ell_plot,
            _profile_curve(spectrum, result, ell_plot, pv),
            ls,
            lw=1,
            label=f"BGK p = {pv:.3g}",
        )
    best = result.amplitude * np.asarray(bgk_spectrum(ell_plot, result.p)) + nz
    ax.plot(
        ell_plot,
        best,
        "-",
        color="C3",
        lw=2,
        label=f"best fit p = {result.p:.3f} ± {result.p_err:.3f}",
    )
    ax.axvspan(
        result.ell.min() - 0.5, result.ell.max() + 0.5, color="0.9", zorder=-1, label="fitted range"
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    pos = spectrum.cl[spectrum.cl > 0]
    if pos.size:
        ax.set_ylim(0.3 * pos.min(), 3 * max(pos.max(), best.max()))
    ax.set_xlabel(r"multipole $\ell$")
    ax.set_ylabel(r"$C_\ell$")
    ax.set_title(
        title or "BGK fit (seed eq. 4.7)" + (" — SYNTHETIC data" if spectrum.synthetic else "")
    )
    ax.legend(fontsize=7)
    fig.tight_layout()
    if path is not None:
        fig.savefig(os.fspath(path), dpi=120)
        plt.close(fig)
    return fig


def _check_out_path(name: str, path) -> None:
    """ValueError unless ``path`` (or None) can be written: its folder exists and it is not a folder."""
    if path is None:
        return
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"{name} must be a file path; got {path!r}")  # noqa: TRY004  (project convention: every bad input is a ValueError)
    p = os.fspath(path)
    if not p or os.path.isdir(p):
        raise ValueError(f"{name}: {p!r} is a directory; give a file path")
    parent = os.path.dirname(os.path.abspath(p))
    if not os.path.isdir(parent):
        raise ValueError(f"{name}: the folder {parent!r} of {p!r} does not exist")


def _check_options(
    noise_level, nuts, num_warmup, num_samples, num_chains, seed, priors, quiet, table
):
    if noise_level is not None and (
        isinstance(noise_level, bool)
        or not isinstance(noise_level, numbers.Real)
        or not (math.isfinite(noise_level) and noise_level >= 0)
    ):
        raise ValueError(f"noise_level must be a finite number >= 0; got {noise_level!r}")
    for name, v, lo in (
        ("num_warmup", num_warmup, 1),
        ("num_samples", num_samples, 2),
        ("num_chains", num_chains, 1),
        ("seed", seed, 0),
    ):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo:
            raise ValueError(f"{name} must be an integer >= {lo}; got {v!r}")
    for name, v in (("nuts", nuts), ("quiet", quiet), ("table", table)):
        if not isinstance(v, bool):
            raise ValueError(f"{name} must be True or False; got {v!r}")  # noqa: TRY004  (project convention: every bad input is a ValueError)
    if priors is not None and not isinstance(priors, Priors):
        raise ValueError(f"priors must be an inference.nuts.Priors; got {type(priors).__name__}")


def fit_spectrum_file(
    path: str | os.PathLike,
    *,
    lmin: Real | None = None,
    lmax: Real | None = None,
    noise: str = "auto",
    noise_level: Real | None = None,
    likelihood: str = "auto",
    nuts: bool = False,
    num_warmup: Real = 500,
    num_samples: Real = 1000,
    num_chains: Real = 1,
    seed: Real = 0,
    priors: object = None,  # a Priors (checked: ValueError otherwise)
    plot: str | os.PathLike | None = None,
    output: str | os.PathLike | None = None,
    quiet: bool = False,
    table: bool = True,
) -> dict:
    """Fit p to a spectrum file: ML + Laplace (always), the p-by-ℓmax table (``table=True``: ℓmax = 4..12
    where the data allow, ``inference.ml.fit_p_map_by_lmax``) and NUTS (``nuts=True``); print a report,
    write it as JSON to ``output`` and the data-vs-BGK plot to ``plot`` (if given). Returns the report
    dict. Every option and the file are checked (ValueError naming the option, or the file and line)
    before anything is fitted or written.
    """
    _check_options(
        noise_level, nuts, num_warmup, num_samples, num_chains, seed, priors, quiet, table
    )
    _check_out_path("output", output)
    _check_out_path("plot", plot)
    spectrum = load_spectrum(path)
    kw = {
        "lmin": lmin,
        "lmax": lmax,
        "noise": noise,
        "noise_level": noise_level,
        "likelihood": likelihood,
    }
    ml = fit_p_map(spectrum, **kw)
    report = {
        "file": os.fspath(path),
        "metadata": spectrum.metadata(),
        "ml": ml.summary(),
        "errors": DIAGONAL_NOTE,
    }
    if table:
        try:
            rows = fit_p_map_by_lmax(spectrum, **kw)
        except ValueError as err:  # the data's ℓ range allows no row (e.g. lmax < 4)
            report["by_lmax"] = []
            report["by_lmax_note"] = f"no l-range table: {err}"
        else:
            report["by_lmax"] = [r.summary() for r in rows]
            if not rows:
                report["by_lmax_note"] = "no l-range table: the data allow no lmax in 4..12"
    if nuts:
        post = fit_p_nuts(
            spectrum,
            **kw,
            priors=priors,
            num_warmup=num_warmup,
            num_samples=num_samples,
            num_chains=num_chains,
            seed=seed,
        )
        report["nuts"] = post.summary()
    if not quiet:
        print(_format_report(report))
    if output is not None:
        with open(os.fspath(output), "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=2, default=float)
    if plot is not None:
        plot_fit(spectrum, ml, plot)
        report["plot"] = os.fspath(plot)
    return report


def format_p_table(rows: list[dict]) -> str:
    """Text table of p by fitted ℓmax from ``summary()`` dicts (ML or full-covariance rows)."""
    lines = ["   lmax       p   68% interval         chi2/dof   p-value"]
    for r in rows:
        lo, hi = r["p_interval_68"]
        lines.append(
            f"  {r['lmin']:>2}..{r['lmax']:<3} {r['p']:6.3f}   [{lo:6.3f}, {hi:6.3f}]   "
            f"{r['chi2']:7.2f}/{r['dof']:<3}  {r['pvalue']:8.3g}"
        )
    return "\n".join(lines)


def _format_report(report: dict) -> str:
    ml = report["ml"]
    meta = report["metadata"]
    lines = [f"spectrum: {report['file']}" + ("  [SYNTHETIC]" if meta.get("synthetic") else "")]
    lines.append(
        f"  ell {ml['lmin']}..{ml['lmax']}, likelihood {ml['likelihood']}, noise {ml['noise_mode']}"
    )
    lo, hi = ml["p_interval_68"]
    lines.append(
        f"  ML:   p = {ml['p']:.4f} ± {ml['p_err']:.4f}  (68%: {lo:.4f}..{hi:.4f})  "
        f"C_1 = {ml['amplitude']:.4g} ± {ml['amplitude_err']:.2g}"
    )
    if ml["noise_mode"] == "free":
        lines.append(f"        N = {ml['noise']:.4g} ± {ml['noise_err']:.2g}")
    lines.append(
        f"        -2lnL = {ml['chi2']:.2f} for {ml['dof']} dof (p-value {ml['pvalue']:.3f})"
        + ("" if ml["converged"] else "  WARNING: optimiser did not converge")
    )
    lines.append(f"  note: {report['errors']}")
    if "by_lmax" in report:
        if report["by_lmax"]:
            lines.append("  p by fitted l range (same likelihood, multipoles independent):")
            lines.append(format_p_table(report["by_lmax"]))
        else:
            lines.append(f"  {report['by_lmax_note']}")
    if "nuts" in report:
        nu = report["nuts"]
        lo, hi = nu["p_interval_68"]
        lines.append(
            f"  NUTS: p = {nu['p_median']:.4f} (68%: {lo:.4f}..{hi:.4f}), R-hat(p) = {nu['r_hat']['p']:.3f}, "
            f"ESS(p) = {nu['ess']['p']:.0f}, divergences {nu['num_divergences']}, "
            f"PPC p-value {nu['ppc_pvalue']:.2f}"
        )
    return "\n".join(lines)


def format_covariance_summary(summary: dict) -> str:
    """Text report of ``inference.covariance_fit.summarise_fit``'s dict."""
    b = summary["bgk"]
    lo, hi = b["p_interval_68"]
    lines = [
        (
            f"  BGK (full covariance, Hartlap factor {b['hartlap_factor']:.3f}, "
            f"R = {b['n_realisations']}): p = {b['p']:.4f}, 68% [{lo:.4f}, {hi:.4f}] "
            f"({b['interval_method']})"
        ),
        f"        chi2 = {b['chi2']:.2f} for {b['dof']} dof (p-value {b['pvalue']:.3g})",
    ]
    if summary.get("by_lmax"):
        lines.append("  p by fitted l range:")
        lines.append(format_p_table(summary["by_lmax"]))
    for f in summary.get("families", []):
        pars = ", ".join(f"{k} = {v:.3f}" for k, v in f["params"].items())
        lines.append(
            f"  {f['family']:>6}: {pars}; chi2 = {f['chi2']:.2f}/{f['dof']} (p-value {f['pvalue']:.3g})"
            + (" fits" if f["fits"] else " rejected")
        )
    lines.append(f"  {summary['statement']}")
    return "\n".join(lines)
