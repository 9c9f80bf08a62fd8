"""crjax: a differentiable JAX simulator and inference toolkit for the small-scale anisotropy of
TeV cosmic rays (relative diffusion; Ahlers & Mertsch 2015, the "seed" paper).

Importing crjax enables float64 in JAX (``jax_enable_x64``): float64 is the default precision;
float32 is an explicit ``dtype`` option wherever it is offered. ``crjax.use_cpu_cores()`` (called
by the ``crjax`` CLI) exposes each CPU core as a JAX device so that the engine uses all of them.

The engine lives in ``crjax.engine`` (``Engine`` settings, the ``SOLVERS`` registry),
``crjax.backtracking`` (``backtrack``, ``propagate``, ``Trajectory``), ``crjax.ensemble``
(``run_ensemble``) and ``crjax.chaos`` (``lyapunov_exponent``).
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)

from ._runtime import use_cpu_cores  # noqa: E402
from .sky import healpix_directions, npix_to_nside  # noqa: E402
from .field import (  # noqa: E402
    BendOverSpectrum,
    FieldParams,
    KolmogorovSpectrum,
    TurbulentField,
    realise_field,
    uniform_field,
)
from .spectra import (  # noqa: E402
    cross_power_spectra,
    declination_band_mask,
    power_spectrum,
    relative_intensity,
    sky_fraction,
)
from .estimators import (  # noqa: E402
    CrossSpectrumEstimate,
    SpectrumEstimate,
    cross_spectrum_estimate,
    mean_power_spectrum,
    noise_level,
    parseval,
    spectrum_estimate,
    spectrum_estimator,
    standard_dipole,
    sum_rules,
)
from .solvers import Boris  # noqa: E402
from .engine import Engine  # noqa: E402
from .backtracking import Trajectory, backtrack, propagate  # noqa: E402
from .ensemble import run_ensemble  # noqa: E402
from .chaos import lyapunov_exponent  # noqa: E402
from .transport import (  # noqa: E402
    binned_relative_dispersion,
    diffusion_tensor,
    parallel_perpendicular,
    relative_diffusion_tensor,
)
from .theory import bgk_amplitude, bgk_spectrum, diffusion_dipole, spectrum_from_nu  # noqa: E402
from . import presets, results, runs  # noqa: E402  (the main job: inference.pipeline.reproduce)

__version__ = "0.1.0"

__all__ = [
    "CrossSpectrumEstimate",
    "SpectrumEstimate",
    "cross_spectrum_estimate",
    "mean_power_spectrum",
    "parseval",
    "spectrum_estimate",
    "spectrum_estimator",
    "standard_dipole",
    "sum_rules",
    "cross_power_spectra",
    "declination_band_mask",
    "sky_fraction",
    "binned_relative_dispersion",
    "relative_diffusion_tensor",
    "BendOverSpectrum",
    "Boris",
    "Engine",
    "FieldParams",
    "KolmogorovSpectrum",
    "Trajectory",
    "TurbulentField",
    "backtrack",
    "bgk_amplitude",
    "bgk_spectrum",
    "diffusion_dipole",
    "diffusion_tensor",
    "healpix_directions",
    "lyapunov_exponent",
    "noise_level",
    "npix_to_nside",
    "parallel_perpendicular",
    "power_spectrum",
    "presets",
    "propagate",
    "realise_field",
    "relative_intensity",
    "results",
    "run_ensemble",
    "runs",
    "spectrum_from_nu",
    "uniform_field",
    "use_cpu_cores",
]
