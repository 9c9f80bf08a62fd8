"""crjax.inference: measured spectra and fitting the BGK exponent p (optax MAP, numpyro NUTS)."""

import crjax as _crjax  # noqa: F401  (enables float64 before any inference code runs)
