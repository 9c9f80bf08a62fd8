"""Figures of the main job: the seed's Fig. 2 (⟨C_ℓ⟩ vs tΩ), Fig. 3 (Ĉ_ℓ/Ĉ_1 with BGK curves)
and a Mollweide sky map of δI. Pure drawing of numpy arrays (no physics here): ``inference.pipeline``
computes the arrays. Uses matplotlib's non-interactive Agg backend unless another backend was
already chosen.
"""

from __future__ import annotations

from collections.abc import Mapping

import healpy as hp
import matplotlib
import numpy as np
from numpy.typing import ArrayLike

if matplotlib.get_backend().lower() not in ("agg", "module://matplotlib_inline.backend_inline"):
    matplotlib.use("Agg")  # headless: the CLI must work without a display
import matplotlib.pyplot as plt

__all__ = ["arrival_map", "fig2", "fig3", "skymap"]

_PAR, _PERP = "-", ":"  # seed Fig. 2: solid g ∥ B0, dotted g ⊥ B0


def _positive(y):
    """NaN where y <= 0: log axes cannot show them (Ĉ_ℓ may be negative after noise subtraction)."""
    y = np.asarray(y, dtype=float)
    return np.where(y > 0, y, np.nan)


def fig2(
    t_omega: ArrayLike,
    cl_par: ArrayLike,
    cl_perp: ArrayLike,
    noise_par: ArrayLike,
    noise_perp: ArrayLike,
    dipole_standard_diffusion_par: ArrayLike,
    dipole_standard_diffusion_perp: ArrayLike,
    *,
    ell_hi: int = 9,
    title: str | None = None,
):
    """Seed Fig. 2: ⟨C_0⟩ (blue), ⟨C_1⟩ (black), ⟨C_ℓ⟩ for 2 ≤ ℓ ≤ ``ell_hi`` (green), the noise
    level N(T) of (3.1) (red) and the standard-diffusion dipole (magenta), vs tΩ on log-log axes;
    solid for g ∥ B0, dotted for g ⊥ B0.

    Shapes: ``t_omega`` (nt,), ``cl_*`` (nt, lmax+1), ``noise_*`` and ``dipole_standard_diffusion_*`` (nt,).
    Returns the matplotlib Figure.
    """
    t = np.asarray(t_omega)
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    for cl, noise, dip, ls in (
        (cl_par, noise_par, dipole_standard_diffusion_par, _PAR),
        (cl_perp, noise_perp, dipole_standard_diffusion_perp, _PERP),
    ):
        cl = np.asarray(cl)
        hi = min(ell_hi, cl.shape[-1] - 1)
        for ell in range(2, hi + 1):
            ax.plot(t, _positive(cl[:, ell]), ls, color="tab:green", lw=0.9)
        ax.plot(t, _positive(cl[:, 0]), ls, color="tab:blue", lw=1.5)
        ax.plot(t, _positive(cl[:, 1]), ls, color="black", lw=1.5)
        ax.plot(t, _positive(noise), ls, color="tab:red", lw=1.2)
        ax.plot(t, _positive(dip), ls, color="magenta", lw=1.2)
    handles = [
        plt.Line2D([], [], color="tab:blue", label=r"$\langle C_0\rangle$"),
        plt.Line2D([], [], color="black", label=r"$\langle C_1\rangle$"),
        plt.Line2D([], [], color="tab:green",
                   label=rf"$\langle C_\ell\rangle$ ($2\leq\ell\leq{ell_hi}$)"),
        plt.Line2D([], [], color="tab:red", label=r"noise $N$ (3.1)"),
        plt.Line2D([], [], color="magenta", label="standard-diffusion dipole"),
        plt.Line2D([], [], color="gray", ls=_PAR, label=r"$\nabla n\parallel B_0$"),
        plt.Line2D([], [], color="gray", ls=_PERP, label=r"$\nabla n\perp B_0$"),
    ]
    ax.set(xscale="log", yscale="log", xlabel=r"$t\,\Omega$", ylabel=r"$\langle C_\ell\rangle$")
    ax.legend(handles=handles, fontsize=7, loc="upper left", ncol=2)
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


def fig3(
    ell: ArrayLike,
    t_omega: ArrayLike,
    ratio_par: ArrayLike,
    err_par: ArrayLike,
    ratio_perp: ArrayLike,
    err_perp: ArrayLike,
    curves: Mapping[str, tuple[ArrayLike, ArrayLike]],
    *,
    noise_par: ArrayLike | None = None,
    noise_perp: ArrayLike | None = None,
    curves_perp: Mapping[str, tuple[ArrayLike, ArrayLike]] | None = None,
    title: str | None = None,
):
    """Seed Fig. 3: Ĉ_ℓ/Ĉ_1 (Ĉ_ℓ = ⟨C_ℓ⟩ − N) at three backtracking times for g ∥ B0 (left) and
    g ⊥ B0 (right), with 1σ error bars from the variance over realisations, the noise level N/Ĉ_1 as
    a dashed line per time (the level below which Ĉ_ℓ is noise-dominated), and model curves
    (e.g. BGK (4.7) for p = 1/3, 1/2, 2/3 and the best fit).

    Shapes: ``ell`` (nl,); ``ratio_*``, ``err_*`` (3, nl); ``noise_*`` (3,) normalised to Ĉ_1;
    ``curves`` maps a label to ``(ell_model, ratio_model)`` (both panels, or only the left one
    when ``curves_perp`` is given for the right). Returns the Figure.
    """
    ell = np.asarray(ell)
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), sharey=True)
    colors = ["tab:orange", "tab:purple", "tab:cyan"]
    for ax, ratio, err, noise, side, model in (
        (axes[0], ratio_par, err_par, noise_par, r"$\nabla n\parallel B_0$", curves),
        (axes[1], ratio_perp, err_perp, noise_perp, r"$\nabla n\perp B_0$",
         curves if curves_perp is None else curves_perp),
    ):
        for i, tw in enumerate(t_omega):
            c = colors[i % len(colors)]
            r = np.asarray(ratio)[i]
            ax.errorbar(
                ell * (1 + 0.03 * (i - 1)),  # small offsets so error bars do not overlap
                _positive(r),
                yerr=np.asarray(err)[i],
                fmt="o",
                ms=3.5,
                color=c,
                capsize=2,
                label=rf"$t\Omega={tw:.3g}$",
            )
            if noise is not None:
                ax.axhline(float(np.asarray(noise)[i]), color=c, ls="--", lw=0.8)
        styles = ["-", "--", "-.", ":"]
        for j, (label, (em, rm)) in enumerate(model.items()):
            ax.plot(em, _positive(rm), styles[j % 4], color="k" if j < 3 else "tab:red", lw=1,
                    label=label)
        ax.set(xscale="log", yscale="log", xlabel=r"$\ell$", title=side)
        ax.legend(fontsize=7)
    axes[0].set_ylabel(r"$\hat C_\ell/\hat C_1$")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def arrival_map(delta_i: ArrayLike) -> np.ndarray:
    """Re-index a map over momentum directions p̂ (crjax's convention) to arrival directions −p̂.

    HEALPix grids are symmetric under x → −x, so this is a permutation: out[j] = δI(p̂ = −n̂_j).
    Shape (npix,) → (npix,).
    """
    m = np.asarray(delta_i)
    nside = hp.npix2nside(m.shape[-1])
    x, y, z = hp.pix2vec(nside, np.arange(m.shape[-1]))
    return m[..., hp.vec2pix(nside, -x, -y, -z)]


def skymap(delta_i: ArrayLike, *, arrival: bool = True, title: str = "", unit: str = ""):
    """Mollweide map of the relative intensity δI of one realisation (``healpy.mollview``).

    ``delta_i`` is indexed by *momentum* direction p̂ (RING); with ``arrival=True`` (default, what
    observatories show) it is drawn at the arrival direction −p̂, else at p̂. The title says which.
    Returns the Figure.
    """
    m = arrival_map(delta_i) if arrival else np.asarray(delta_i)
    which = "arrival direction −p̂" if arrival else "momentum direction p̂"
    hp.mollview(m, title=f"{title} [{which}]".strip(), unit=unit, cmap="RdBu_r")
    hp.graticule(alpha=0.3)
    return plt.gcf()
