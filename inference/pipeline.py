"""The main job: the seed's §3 pipeline end to end, resumable (``crjax reproduce``).

    simulate   ``crjax.runs.simulate``: the ensemble, chunk by chunk, into a resumable run
               directory (per-realisation C_ℓ(T) for g ∥ B0 and g ⊥ B0, ⟨r_i r_j⟩, K̃, maps).
    analyse    ⟨C_ℓ⟩(T), K(T) → K_∥, K_⊥, noise N(T) (3.1), Ĉ_ℓ = ⟨C_ℓ⟩ − N with its variance,
               the standard-diffusion dipole, convergence of Ĉ_ℓ/Ĉ_1, and the fit of the BGK
               exponent p (4.7) to Ĉ_ℓ at the last save time (``inference.ml``, ``inference.covariance_fit``).
    figures    fig2.png, fig3.png, skymap.png (``crjax.plot``).

This module sits above both packages: it only wires library calls and does bookkeeping. The
physics and its conventions are in ``docs/physics.md``.

Convergence criterion (``summary["converged"]``): with R_ℓ(T) = Ĉ_ℓ/Ĉ_1, compare R_ℓ at the last
save time T_last with R_ℓ at the latest save time T_prev ≤ T_last/2 for 2 ≤ ℓ ≤ fit_ell_max:
χ² = Σ_ℓ (ΔR_ℓ)²/(σ²_ℓ(T_last) + σ²_ℓ(T_prev)) must not exceed the 95% quantile of χ²(n_ℓ), i.e.
the change over the last factor of two in backtracking time is consistent with zero within the
statistical error over realisations (σ from the delta method on per-realisation C_ℓ, N taken as
exact). With few realisations σ is large and the test is weak: the summary also reports the largest
relative change max|ΔR_ℓ|/|R_ℓ|. Correlations between the two times are ignored (they share the
realisations, which makes the test conservative).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float
from scipy import stats

from crjax import estimators, plot, transport
from crjax.presets import Preset, get_preset
from crjax.results import read_params, read_results, read_summary, to_jsonable
from crjax.runs import gradient_directions, simulate
from crjax.theory import bgk_spectrum

from .covariance_fit import summarise_fit
from .data import save_spectrum, spectrum_from_estimate
from .ml import fit_p_map

__all__ = [
    "CONVERGENCE_SPAN",
    "analyse",
    "format_summary",
    "make_figures",
    "plot_run",
    "reproduce",
]

CONVERGENCE_SPAN = 2.0  # compare Ĉ_ℓ/Ĉ_1 at T_last with the save time ≤ T_last / CONVERGENCE_SPAN


def _ratio_and_error(
    cls: Float[np.ndarray, "nreal ntimes ell"], noise: Float[np.ndarray, " ntimes"]
) -> tuple[Float[np.ndarray, "ntimes ell"], Float[np.ndarray, "ntimes ell"]]:
    """R_ℓ = Ĉ_ℓ/Ĉ_1 and its 1σ error by the delta method over realisations.

    ``cls`` (n, nt, L+1) per-realisation spectra, ``noise`` (nt,). N is taken as exact, so
    Var(R) ≈ [Var C_ℓ − 2R Cov(C_ℓ, C_1) + R² Var C_1] / (n Ĉ_1²)."""
    n = cls.shape[0]
    chat = cls.mean(0) - noise[:, None]
    c1 = chat[:, 1:2]
    r = chat / c1
    d = cls - cls.mean(0)
    var = (d * d).sum(0) / (n - 1)
    cov1 = (d * d[..., 1:2]).sum(0) / (n - 1)
    v1 = var[:, 1:2]
    var_r = (var - 2 * r * cov1 + r * r * v1) / (n * c1 * c1)
    return r, np.sqrt(np.maximum(var_r, 0.0))


def _convergence(
    t_omega: Float[np.ndarray, " ntimes"],
    r: Float[np.ndarray, "ntimes ell"],
    err: Float[np.ndarray, "ntimes ell"],
    ell_hi: int,
) -> dict:
    """The documented criterion (module docstring) on R_ℓ, 2 ≤ ℓ ≤ ell_hi."""
    last = len(t_omega) - 1
    prev = np.flatnonzero(t_omega <= t_omega[-1] / CONVERGENCE_SPAN)
    if prev.size == 0:
        return {"converged": False, "chi2": None, "dof": 0, "max_rel_change": None,
                "t_omega_compared": [None, float(t_omega[-1])]}
    prev = int(prev[-1])
    sl = slice(2, ell_hi + 1)
    dr = r[last, sl] - r[prev, sl]
    s2 = err[last, sl] ** 2 + err[prev, sl] ** 2
    chi2 = float(np.sum(dr * dr / s2))
    dof = int(dr.size)
    return {
        "converged": bool(np.isfinite(chi2) and chi2 <= stats.chi2.ppf(0.95, dof)),
        "chi2": chi2,
        "dof": dof,
        "max_rel_change": float(np.max(np.abs(dr) / np.abs(r[last, sl]))),
        "t_omega_compared": [float(t_omega[prev]), float(t_omega[last])],
    }


def _simulated_spectrum(ell, chat, var, preset: Preset, side: str, t_omega: float):
    """Ĉ_ℓ at one time as an ``inference.data.Spectrum`` (symmetric errors √var; synthetic)."""
    return spectrum_from_estimate(
        ell, chat, var, experiment="crjax simulation", synthetic=True, noise_subtracted=True,
        provenance=(f"crjax reproduce preset {preset.name}: Chat_l = <C_l> - N, gradient {side} "
                    "B0, "
                    f"tOmega = {t_omega:g}, {preset.n_realisations} realisations, nside "
                    f"{preset.nside}; errors: sqrt of the variance of the mean over realisations"),
    )


def _fit_p(spec) -> dict:
    """Fit the BGK exponent p (4.7) to the simulated Ĉ_ℓ with its realisation variance
    (``inference.ml.fit_p_map``: free amplitude, no extra noise term since N is subtracted,
    Gaussian likelihood, Laplace 68% interval)."""
    ell = spec.ell
    res = fit_p_map(spec, lmin=int(ell[0]), lmax=int(ell[-1]), noise="none", likelihood="gaussian")
    return {"p_best": res.p, "p_err": res.p_err, "p_interval": list(res.p_interval),
            "amplitude": res.amplitude, "chi2": res.chi2, "dof": res.dof, "pvalue": res.pvalue,
            "fit_converged": res.converged, "ell": [int(ell[0]), int(ell[-1])]}


def _fit_covariance(samples: Float[np.ndarray, "nreal ell"], ell_hi: int,
                    table_hi: int | None = None) -> dict:
    """The fit of p (4.7) on the full covariance of the unbiased estimate at one time
    (``inference.covariance_fit.summarise_fit``: Hartlap-corrected inverse, profile interval, χ²
    and its p-value, p by fitted ℓmax, other ν_r families if BGK is rejected). ``samples`` are the
    per-realisation estimates Ĉ_ℓ^(r) (ℓ = 0..); the covariance of their mean is their sample
    covariance / n. The headline fit uses 1 ≤ ℓ ≤ ``ell_hi``; the ℓ-range table runs over the ℓmax
    of 4..12 up to ``table_hi`` (default ``ell_hi``). With too few realisations for the Hartlap
    inverse (n < L + 5) the fit is skipped and the reason recorded."""
    hi = max(ell_hi, table_hi or ell_hi)
    ell = np.arange(1, hi + 1)
    s = np.asarray(samples)[:, 1 : hi + 1]
    n = s.shape[0]
    cov = np.atleast_2d(np.cov(s, rowvar=False, ddof=1)) / n
    try:
        return summarise_fit(ell, s.mean(0), cov, n, lmax=ell_hi)
    except ValueError as err:
        return {"skipped": f"no full-covariance fit: {err}"}


def _headline_p(summary: dict) -> dict:
    """The headline p (∇n ∥ B0): the fit on the full covariance of the unbiased estimate where there
    are enough realisations for it, else the per-multipole fit of the seed's ⟨C_ℓ⟩ − N (the method
    is named in ``p_method``)."""
    cov = summary["fit_covariance_par"]
    if "bgk" in cov:
        return {"p_best": cov["bgk"]["p"], "p_interval": cov["bgk"]["p_interval_68"],
                "p_method": "full covariance of the unbiased estimate (inference.covariance_fit)"}
    return {"p_best": summary["fit_par"]["p_best"], "p_interval": summary["fit_par"]["p_interval"],
            "p_method": "per-multipole fit of <C_l> - N (too few realisations for the full "
                        "covariance)"}


def analyse(chunks: dict[str, np.ndarray], preset: Preset) -> tuple[dict, dict, dict]:
    """Ensemble statistics, convergence and the fit of p. Returns ``(arrays, summary, spectra)``:
    ``arrays`` go to ``results.npz``, ``summary`` (scalars) to ``summary.json``, ``spectra``
    (``inference.data.Spectrum`` of Ĉ_ℓ at the last time, ∥ and ⊥) to spectrum text files."""
    g_par, g_perp = gradient_directions(preset)
    times, t_omega = preset.times, np.asarray(preset.t_omega)
    n = preset.n_realisations
    K, K_se = (np.asarray(x) for x in transport.diffusion_tensor_from_moments(chunks["rr"], times))
    # Per-realisation K (for the spread of K_∥, K_⊥: parallel_perpendicular is linear in K).
    K_r = np.asarray(jax.vmap(lambda m: transport.diffusion_tensor_from_moments(m[None], times)[0])(
        jnp.asarray(chunks["rr"])))
    Kt = chunks["Ktilde"].mean(0)
    b0 = np.asarray(preset.b0_direction, dtype=float)
    K_par, K_perp = (np.asarray(x) for x in transport.parallel_perpendicular(K, b0))
    Kp_r, Kq_r = (np.asarray(x) for x in transport.parallel_perpendicular(K_r, b0))
    arrays: dict[str, Any] = {
        "t_omega": t_omega, "times": times, "K": K, "K_stderr": K_se, "Ktilde": Kt,
        "K_par": K_par, "K_perp": K_perp,
        "Ktilde_par": np.asarray(transport.parallel_perpendicular(Kt, b0)[0]),
        "Ktilde_perp": np.asarray(transport.parallel_perpendicular(Kt, b0)[1]),
        "K_par_stderr": Kp_r.std(0, ddof=1) / math.sqrt(n),
        "K_perp_stderr": Kq_r.std(0, ddof=1) / math.sqrt(n),
        "g_par": g_par, "g_perp": g_perp,
        "sky_par": chunks["sky_par"][0], "sky_perp": chunks["sky_perp"][0],
    }
    summary: dict[str, Any] = {"preset": preset.name}
    spectra = {}
    fit_ell = np.arange(1, preset.fit_ell_max + 1)
    for side, g in (("par", g_par), ("perp", g_perp)):
        cls = chunks[f"cl_{side}"]
        noise = np.asarray(estimators.noise_level(K, times, g, preset.npix))
        est = estimators.spectrum_estimator(cls, noise)
        mean_map = chunks[f"sum_maps_{side}"].sum(0) / n  # (nt, npix) = ⟨r⟩·g
        dip = np.asarray(estimators.standard_dipole(mean_map[None]))
        ratio, rerr = _ratio_and_error(cls, noise)
        arrays.update({
            f"cl_{side}": np.asarray(est.mean), f"cl_{side}_realisations": cls,
            f"noise_{side}": noise, f"chat_{side}": np.asarray(est.estimate),
            f"chat_{side}_var": np.asarray(est.variance), f"dipole_standard_diffusion_{side}": dip,
            f"ratio_{side}": ratio, f"ratio_{side}_err": rerr,
        })
        conv = _convergence(t_omega, ratio, rerr, preset.fit_ell_max)
        spec = _simulated_spectrum(fit_ell, np.asarray(est.estimate)[-1, fit_ell],
                                   np.asarray(est.variance)[-1, fit_ell], preset, side, t_omega[-1])
        spectra[side] = spec
        fit = _fit_p(spec)
        summary[f"convergence_{side}"] = conv
        summary[f"fit_{side}"] = fit
        est_r = chunks[f"est_{side}"]  # (n, nt, L+1) unbiased per-realisation estimates
        arrays[f"chat_unbiased_{side}"] = est_r.mean(0)
        arrays[f"chat_unbiased_{side}_stderr"] = est_r.std(0, ddof=1) / math.sqrt(n)
        # the ℓ-range table goes to ℓmax = 12 where the run stores it (issue 9: ℓmax = 4..12)
        cov_fit = _fit_covariance(est_r[:, -1], preset.fit_ell_max, min(12, preset.ell_max))
        summary[f"fit_covariance_{side}"] = cov_fit
        if "bgk" in cov_fit:  # χ², p-value and the ℓ-range table of the full-covariance fit
            summary[f"chi2_{side}"] = cov_fit["bgk"]["chi2"]
            summary[f"pvalue_{side}"] = cov_fit["bgk"]["pvalue"]
            summary[f"p_by_lmax_{side}"] = cov_fit["by_lmax"]
        else:  # too few realisations: the diagonal fit's χ² (multipoles taken as independent)
            summary[f"chi2_{side}"] = fit["chi2"]
            summary[f"pvalue_{side}"] = fit["pvalue"]
            summary[f"p_by_lmax_{side}"] = []
        arrays[f"p_best_{side}"] = fit["p_best"]
        arrays[f"fit_amplitude_{side}"] = fit["amplitude"]
    # Headline numbers: the parallel-gradient case (the seed's Fig. 3 left panel).
    summary.update({
        "K_par": float(K_par[-1]), "K_perp": float(K_perp[-1]),
        "K_par_stderr": float(arrays["K_par_stderr"][-1]),
        "K_perp_stderr": float(arrays["K_perp_stderr"][-1]),
        "lambda_par": float(3 * K_par[-1]),
        "Ktilde_par": float(arrays["Ktilde_par"][-1]),
        "Ktilde_perp": float(arrays["Ktilde_perp"][-1]),
        **_headline_p(summary),
        "converged": bool(summary["convergence_par"]["converged"]
                          and summary["convergence_perp"]["converged"]),
        "converged_criterion": (
            f"chi2 of the change of Chat_l/Chat_1 (2<=l<={preset.fit_ell_max}) between the last "
            f"save time and the latest one <= T_last/{CONVERGENCE_SPAN:g} is below the 95% "
            "quantile, for both gradient directions"),
        "nside": preset.nside, "realizations": n, "t_omega_last": float(t_omega[-1]),
        "rL": preset.rL, "sigma2": preset.sigma2, "n_modes": preset.n_modes,
    })
    return arrays, summary, spectra


def make_figures(arrays: dict, preset: Preset, out: str | Path) -> dict[str, str]:
    """fig2.png, fig3.png, skymap.png in ``out``; returns their paths."""
    import matplotlib.pyplot as plt

    out = Path(out)
    t_omega = np.asarray(arrays["t_omega"])
    label = (f"{preset.name}: nside {preset.nside}, {preset.n_realisations} realisations, "
             f"{preset.n_modes} modes, rL/Lc={preset.rL:g}, σ²={preset.sigma2:g}")
    paths = {}
    f = plot.fig2(t_omega, arrays["cl_par"], arrays["cl_perp"], arrays["noise_par"],
                  arrays["noise_perp"], arrays["dipole_standard_diffusion_par"],
                  arrays["dipole_standard_diffusion_perp"],
                  ell_hi=preset.fit_ell_max, title=label)
    paths["fig2"] = str(out / "fig2.png")
    f.savefig(paths["fig2"], dpi=120)
    plt.close(f)

    idx = [int(np.argmin(np.abs(t_omega - t))) for t in preset.fig3_t_omega]
    ell = np.arange(1, preset.ell_max + 1)
    bgk = {f"BGK p={p}": (ell, np.asarray(bgk_spectrum(ell, v)))
           for p, v in (("1/3", 1 / 3), ("1/2", 1 / 2), ("2/3", 2 / 3))}

    def with_fit(side):  # the fitted model A·bgk(ℓ, p) was fit to Ĉ_ℓ at the last time
        p, amp = float(arrays[f"p_best_{side}"]), float(arrays[f"fit_amplitude_{side}"])
        c1 = float(arrays[f"chat_{side}"][-1, 1])
        fit = (ell, amp * np.asarray(bgk_spectrum(ell, p)) / c1)
        return {**bgk, f"best fit p={p:.2f} (tΩ={t_omega[-1]:.3g})": fit}

    def noise_rel(side):
        return arrays[f"noise_{side}"][idx] / arrays[f"chat_{side}"][idx, 1]

    f = plot.fig3(ell, [t_omega[i] for i in idx],
                  arrays["ratio_par"][idx][:, ell], arrays["ratio_par_err"][idx][:, ell],
                  arrays["ratio_perp"][idx][:, ell], arrays["ratio_perp_err"][idx][:, ell],
                  with_fit("par"), noise_par=noise_rel("par"), noise_perp=noise_rel("perp"),
                  curves_perp=with_fit("perp"), title=label)
    paths["fig3"] = str(out / "fig3.png")
    f.savefig(paths["fig3"], dpi=120)
    plt.close(f)

    f = plot.skymap(arrays["sky_par"],
                    title=f"δI, realisation 0, ∇n ∥ B0, tΩ={t_omega[-1]:.3g}")
    paths["skymap"] = str(out / "skymap.png")
    f.savefig(paths["skymap"], dpi=100)
    plt.close(f)
    return paths


_RENAMED_ARRAYS = {"dipole_std_par": "dipole_standard_diffusion_par",
                   "dipole_std_perp": "dipole_standard_diffusion_perp"}  # names of earlier runs


def plot_run(directory: str | Path) -> dict[str, str]:
    """Re-draw the figures of a finished run from its ``params.json`` and ``results.npz``.

    A missing, empty or unfinished run directory is a ``ValueError`` naming it."""
    stored = read_params(directory)["params"]
    try:
        preset = Preset.from_dict(stored)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{Path(directory) / 'params.json'}: not valid run parameters ({err})") from err
    arrays = read_results(directory)
    arrays = {_RENAMED_ARRAYS.get(k, k): v for k, v in arrays.items()}
    needed = ("t_omega", "cl_par", "cl_perp", "noise_par", "noise_perp", "chat_par", "chat_perp",
              "ratio_par", "ratio_par_err", "ratio_perp", "ratio_perp_err", "sky_par",
              "p_best_par", "p_best_perp", "fit_amplitude_par", "fit_amplitude_perp",
              "dipole_standard_diffusion_par", "dipole_standard_diffusion_perp")
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise ValueError(f"{Path(directory) / 'results.npz'} lacks the arrays {missing} "
                         "(not written by crjax reproduce/simulate)")
    return make_figures(arrays, preset, directory)


def reproduce(
    preset: Preset | str = "quick",
    out: str | Path = "crjax_out",
    *,
    resume: bool = True,
    progress: bool = True,
    figures: bool = True,
) -> dict:
    """The whole job (module docstring): simulate (resumable) → analyse → fit → figures → summary.

    Writes ``params.json``, ``chunk_*.npz``, ``results.npz``, ``summary.json`` and the figures to
    ``out``; returns the summary dict. ``wall_s`` counts this call only (a resumed run reports the
    time of the resumption). In a distributed run (``crjax.distributed``) every process computes
    its share of the chunks and only process 0 goes on to write the results, figures and summary;
    the others return ``{"process_index": i, "chunks_only": True, ...}``."""
    t0 = time.perf_counter()
    preset = get_preset(preset) if isinstance(preset, str) else preset
    store, chunks = simulate(preset, out, resume=resume, progress=progress)
    if chunks is None:  # not process 0: its chunks are on disk, process 0 does the rest
        return {"process_index": jax.process_index(), "chunks_only": True,
                "directory": str(store.directory), "wall_s": time.perf_counter() - t0}
    arrays, summary, spectra = analyse(chunks, preset)
    store.write_results(arrays)
    files = {"directory": str(store.directory), "results": str(store.directory / "results.npz"),
             "params": str(store.directory / "params.json"),
             "summary": str(store.directory / "summary.json")}
    for side, spec in spectra.items():  # `crjax fit <file>` refits these
        files[f"spectrum_{side}"] = str(store.directory / f"simulated_spectrum_{side}.txt")
        save_spectrum(files[f"spectrum_{side}"], spec)
    if figures:
        files.update(make_figures(arrays, preset, store.directory))
    summary["files"] = files
    summary["wall_s"] = time.perf_counter() - t0
    store.write_summary(summary)
    return to_jsonable(summary)


def format_summary(summary: dict | str | Path) -> str:
    """One screen of text: K_∥, K_⊥, convergence, best-fit p, files (a dict or a run directory)."""
    s = summary if isinstance(summary, dict) else read_summary(summary)
    lines = [
        (f"crjax {s.get('preset', '')}: nside {s['nside']}, {s['realizations']} realisations, "
         f"tΩ up to {s['t_omega_last']:.4g}, wall {s['wall_s']:.1f} s"),
        (f"  K_par  = {s['K_par']:.4g} ± {s['K_par_stderr']:.2g} Lc c   (λ_par = 3K = "
         f"{s['lambda_par']:.3g} Lc)"),
        (f"  K_perp = {s['K_perp']:.4g} ± {s['K_perp_stderr']:.2g} Lc c   "
         f"(K_perp/K_par = {s['K_perp'] / s['K_par']:.3g})"),
        (f"  relative diffusion (2.4): K~_par = {s['Ktilde_par']:.4g}, K~_perp = "
         f"{s['Ktilde_perp']:.4g} Lc c"),
    ]
    for side, name in (("par", "∇n ∥ B0"), ("perp", "∇n ⊥ B0")):
        c, f = s[f"convergence_{side}"], s[f"fit_{side}"]
        lo, hi = f["p_interval"]
        chi = "n/a" if c["chi2"] is None else f"χ²={c['chi2']:.2f}/{c['dof']}"
        rel = "" if c["max_rel_change"] is None else f", max rel. change {c['max_rel_change']:.2g}"
        t0, t1 = c["t_omega_compared"]
        span = "" if t0 is None or t1 is None else f" tΩ {t0:.3g}→{t1:.3g}"
        lines.append(
            f"  {name}: p = {f['p_best']:.3f} [{lo:.3f}, {hi:.3f}] (68%, χ²={f['chi2']:.1f}/"
            f"{f['dof']});  Ĉ_ℓ/Ĉ_1 converged{span}: {c['converged']} ({chi}{rel})"
        )
    for side, name in (("par", "∇n ∥ B0"), ("perp", "∇n ⊥ B0")):
        cf = s.get(f"fit_covariance_{side}", {})
        if "statement" in cf:
            lines.append(f"  {name}, full covariance: {cf['statement']}")
        elif "skipped" in cf:
            lines.append(f"  {name}: {cf['skipped']}")
    lines.append(f"  converged (both): {s['converged']}   seed: p ≈ 1/2, steady state at tΩ ≳ 100")
    for k, v in s.get("files", {}).items():
        lines.append(f"  {k:13s} {v}")
    return "\n".join(lines)
