"""crjax: a differentiable JAX simulator and inference toolkit for the small-scale anisotropy of
TeV cosmic rays (relative diffusion; Ahlers & Mertsch 2015, the "seed" paper).

Importing crjax enables float64 in JAX (``jax_enable_x64``): float64 is the default precision;
float32 is an explicit ``dtype`` option wherever it is offered.
"""

import jax as _jax

_jax.config.update("jax_enable_x64", True)

from .sky import healpix_directions, npix_to_nside  # noqa: E402
from .field import FieldParams, TurbulentField, realise_field, uniform_field  # noqa: E402
from .angular import noise_level, power_spectrum, relative_intensity  # noqa: E402
from .backtrack import Trajectory, backtrack, propagate, run_ensemble  # noqa: E402
from .theory import bgk_amplitude, bgk_spectrum, diffusion_dipole, spectrum_from_nu  # noqa: E402
from . import presets, reproduce, results  # noqa: E402  (crjax.reproduce.reproduce: main job)

__version__ = "0.1.0"
