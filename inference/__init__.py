"""crjax.inference: measured spectra and fitting the BGK exponent p (seed eq. 4.7).

Modules (one idea each): ``data`` (spectrum files), ``likelihoods`` (per-multipole and full-covariance
likelihoods), ``ml`` (optax maximum likelihood + Laplace), ``nuts`` (numpyro NUTS), ``covariance_fit``
(p on the full covariance of an ensemble estimate, ℓ-range table, ν_r families), ``pseudo_cl``
(partial-sky coupling), ``report`` (``crjax fit`` reports and plots), ``make_synthetic`` (synthetic data).
"""

import crjax as _crjax  # noqa: F401  (enables float64 before any inference code runs)
from inference.covariance_fit import (
    fit_p_covariance,
    p_by_ell_range,
    summarise_fit,
)
from inference.data import Spectrum, load_spectrum, save_spectrum
from inference.ml import fit_p_map, fit_p_map_by_lmax
from inference.nuts import Priors, fit_p_nuts
from inference.pseudo_cl import coupling_forward, mask_coupling_matrix
from inference.report import fit_spectrum_file, plot_fit

__all__ = [
    "Priors",
    "Spectrum",
    "coupling_forward",
    "fit_p_covariance",
    "fit_p_map",
    "fit_p_map_by_lmax",
    "fit_p_nuts",
    "fit_spectrum_file",
    "load_spectrum",
    "mask_coupling_matrix",
    "p_by_ell_range",
    "plot_fit",
    "save_spectrum",
    "summarise_fit",
]
