"""Shared test configuration: strict JAX (x64, no implicit rank promotion), shared fixtures."""

import jax
import pytest

import crjax  # enables x64

# Two CPU devices, as the CLI sets up on a 2-core machine: every default backtrack in the suite runs
# the production path (particles split over devices); tests/test_backtrack.py compares it with
# devices=1. Must precede any JAX computation.
crjax.use_cpu_cores(2)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def key():
    return jax.random.PRNGKey(20151102)
