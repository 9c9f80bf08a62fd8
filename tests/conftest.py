"""Shared test configuration: strict JAX (x64, no implicit rank promotion), shared fixtures."""

import importlib
import os
import pkgutil

import jax
import pytest
from jaxtyping import install_import_hook


def _import_all(package: str) -> None:
    pkg = importlib.import_module(package)
    for info in pkgutil.walk_packages(pkg.__path__, package + "."):
        importlib.import_module(info.name)


# Runtime checks of every jaxtyping annotation (shapes and dtypes) in crjax and inference, with
# beartype: every module is imported inside the hook so that lazily imported ones are checked too.
# CRJAX_TYPECHECK=1 switches them on (default off while the annotations are being fixed).
if os.environ.get("CRJAX_TYPECHECK", "0") == "1":
    with install_import_hook(["crjax", "inference"], "beartype.beartype"):
        _import_all("crjax")
        _import_all("inference")

import crjax  # enables x64 (after the hook above, so that it checks crjax too)

# Two CPU devices, as the CLI sets up on a 2-core machine: every default backtrack in the suite runs
# the production path (particles split over devices); tests/test_backtrack.py compares it with
# devices=1. Must precede any JAX computation.
crjax.use_cpu_cores(2)
jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture(scope="session")
def key():
    return jax.random.PRNGKey(20151102)
