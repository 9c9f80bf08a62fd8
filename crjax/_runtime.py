"""Process-level JAX setup: one JAX CPU device per core, so the engine can run a loop per core."""

from __future__ import annotations

import os

import jax

from ._checks import check_int_at_least

__all__ = ["use_cpu_cores"]


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def use_cpu_cores(n: int | None = None) -> int:
    """Expose ``n`` CPU cores (default: all this process may use) as ``n`` JAX CPU devices.

    XLA:CPU runs one compiled loop on one device and spreads only single operations over the
    cores; ``backtrack`` splits its particles over the local devices, so on a CPU this is what
    lets one integration run use every core (measured 1.1-1.5x at 2 cores, benchmarks/engine.py).
    Must run before JAX executes anything (it sets ``jax_num_cpu_devices``); a count given by
    the user in ``XLA_FLAGS=--xla_force_host_platform_device_count=...`` is left alone. It does
    not change which device unsharded work runs on (the first). Returns the CPU device count
    that will be used.
    """
    n = _available_cores() if n is None else n
    check_int_at_least("n", n, 1)
    flag = "xla_force_host_platform_device_count="
    flags = os.environ.get("XLA_FLAGS", "")
    if flag in flags:
        return int(flags.split(flag)[1].split()[0])
    try:
        jax.config.update("jax_num_cpu_devices", int(n))
    except RuntimeError as err:
        if jax.config.jax_num_cpu_devices == n:
            return n
        raise RuntimeError(
            "crjax.use_cpu_cores() must be called before JAX runs any computation (it sets "
            f"jax_num_cpu_devices); JAX has already started with {len(jax.devices('cpu'))} CPU "
            "device(s). Call it right after `import crjax`."
        ) from err
    return int(n)
