"""Finite-time Lyapunov exponent: no chaos in a uniform field, chaos in strong turbulence.

Reference we did not write: the uniform-field helix, whose neighbouring orbits separate at most
linearly in time.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crjax
from crjax.chaos import lyapunov_exponent
from crjax.field import FieldParams, realise_field, uniform_field


@pytest.mark.slow
def test_lyapunov_uniform_vs_turbulent():
    rL = 0.1
    turb = realise_field(jax.random.PRNGKey(7), FieldParams(n_modes=64))
    b0_only = eqx.tree_at(lambda f: f.amplitudes, turb, jnp.zeros_like(turb.amplitudes))
    dirs = crjax.healpix_directions(1)
    T = np.array([1.0, 2.0])  # tΩ = 10, 20
    lam_b0 = lyapunov_exponent(b0_only, dirs, T, rL=rL)
    lam_turb = lyapunov_exponent(turb, dirs, T, rL=rL)
    # Uniform field: neighbouring helices separate at most linearly, |δr| ≲ δ·(rL + 2T), so
    # λ(T) ≤ ln(1 + 2T/rL)/T (no chaos).
    assert np.all(np.asarray(lam_b0) <= np.log(1 + 2 * T / rL) / T)
    # Strong turbulence is chaotic: exponential separation beats that bound clearly by tΩ = 20.
    assert lam_turb[-1] > 1.5 * np.log(1 + 2 * T[-1] / rL) / T[-1]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"delta": 0.0}, "delta"),
        ({"delta": np.nan}, "delta"),
        ({"delta": 0.5}, "delta"),  # not a linearised perturbation
        ({"rL": -0.1}, "rL"),
        ({"directions": np.zeros((2, 3))}, "directions must be non-zero"),
        ({"directions": np.full((2, 3), np.inf)}, "directions must be finite"),
        ({"times": [0.2, 0.1]}, "times"),
        ({"dt": 0.0}, "dt"),
        ({"rtol": 1e-9}, "unknown engine setting"),
    ],
)
def test_lyapunov_bad_input(kwargs, match):
    args = {"directions": np.eye(3), "times": [0.1], "rL": 0.1}
    args.update(kwargs)
    d, t = args.pop("directions"), args.pop("times")
    with pytest.raises(ValueError, match=match):
        lyapunov_exponent(uniform_field(), d, t, **args)
