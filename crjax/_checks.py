"""Input validation shared by every public entry point.

Each check raises ``ValueError`` naming the parameter and the allowed range, so users see
*what* was wrong and *what* would be accepted. Checks run on concrete (host) values only:
under ``jax.jit`` tracers are passed through unchecked, because a traced value has no
value to check and raising there would break differentiation.
"""

from __future__ import annotations

import numbers

import jax
import numpy as np

__all__ = [
    "check_positive",
    "check_nside",
    "check_int_at_least",
    "check_open_interval",
    "check_sorted_times",
    "check_finite",
    "is_concrete",
]


def is_concrete(x) -> bool:
    """True if ``x`` holds a value (not a JAX tracer)."""
    return not isinstance(x, jax.core.Tracer)


def check_positive(name: str, value) -> None:
    """Raise unless every element of ``value`` is finite and > 0."""
    if not is_concrete(value):
        return
    v = np.asarray(value)
    if not np.all(np.isfinite(v)) or not np.all(v > 0):
        raise ValueError(f"{name} must be finite and > 0 (allowed range: (0, inf)); got {value!r}")


def check_int_at_least(name: str, value, minimum: int) -> None:
    """Raise unless ``value`` is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}; got {value!r}")


def check_nside(nside) -> None:
    """Raise unless ``nside`` is a HEALPix resolution: a power of two in [1, 2**29]."""
    if (
        isinstance(nside, bool)
        or not isinstance(nside, numbers.Integral)
        or nside < 1
        or nside > 2**29
        or (nside & (nside - 1)) != 0
    ):
        raise ValueError(f"nside must be a power of two between 1 and 2**29; got {nside!r}")


def check_open_interval(name: str, value, lo: float, hi: float) -> None:
    """Raise unless every element of ``value`` lies in the open interval (lo, hi)."""
    if not is_concrete(value):
        return
    v = np.asarray(value)
    if not np.all(np.isfinite(v)) or not (np.all(v > lo) and np.all(v < hi)):
        raise ValueError(f"{name} must lie in the open interval ({lo}, {hi}); got {value!r}")


def check_sorted_times(name: str, times) -> None:
    """Raise unless ``times`` is a non-empty, finite, strictly increasing 1-D array of values > 0."""
    if not is_concrete(times):
        return
    t = np.asarray(times)
    if t.ndim != 1 or t.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-D array of save times; got shape {t.shape}")
    if not np.all(np.isfinite(t)) or np.any(t <= 0):
        raise ValueError(f"{name} must be finite and > 0 (allowed range: (0, inf)); got {t!r}")
    if np.any(np.diff(t) <= 0):
        raise ValueError(f"{name} must be strictly increasing; got {t!r}")


def check_finite(name: str, value) -> None:
    """Raise if ``value`` (a concrete array) contains NaN or inf."""
    if not is_concrete(value):
        return
    v = np.asarray(value)
    if not np.all(np.isfinite(v)):
        bad = int(np.size(v) - np.count_nonzero(np.isfinite(v)))
        raise ValueError(f"{name} contains {bad} non-finite value(s) (NaN or inf); all must be finite")
