"""Shared test configuration: strict JAX (x64, no implicit rank promotion), shared fixtures."""

import jax
import pytest

import crjax  # noqa: F401  (enables x64)

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def key():
    return jax.random.PRNGKey(20151102)
