"""Scale-out on JAX's distributed runtime: processes, the ensemble mesh, chunk ownership.

One sharding model serves one CPU core, several local devices and N processes on N hosts:

- **Mesh.** ``ensemble_mesh()`` is a 1-D ``jax.sharding.Mesh`` with the axis ``"realisations"``
  over every device of every process (``jax.devices()``). Realisation r is always drawn from
  ``jax.random.fold_in(key, r)``, so what a realisation computes does not depend on which device or
  process runs it. Particles of one realisation stay on one device here; the particle split over
  local devices (``Engine(devices=...)``) is what the per-process chunk path below uses.
- **Collectives.** ``ensemble_sum`` integrates each device's realisations locally (trajectories
  never leave their device, let alone their host) and reduces only the per-realisation summaries of
  a ``reducer`` with collectives inside ``jax.shard_map``: ``"ordered"`` (default) all-gathers the
  small summaries and adds them in realisation order, so the sum is bit-for-bit the same for any
  number of devices or processes; ``"psum"`` is the tree all-reduce (equal to round-off, less data).
- **Run directories.** A ``crjax simulate|reproduce`` run started in P processes shares one run
  directory (``crjax.results.RunStore``): process 0 writes ``params.json`` first
  (``open_store``), the missing chunks are dealt round-robin over the processes, each writes its
  own chunk files atomically (``run_chunks``), and only process 0 assembles the results. A process
  killed mid-run loses only its chunk in flight (process 0 computes what it left). A resumed run
  may use any number of processes (chunk k is realisations fold_in(key, r), r in its range,
  whoever computes it).

Processes are started with ``initialize`` (explicit arguments, ``CRJAX_COORDINATOR`` /
``CRJAX_NUM_PROCESSES`` / ``CRJAX_PROCESS_ID``, or SLURM / Open MPI auto-detection through
``jax.distributed.initialize()``); on CPUs the collectives run over gloo. Launch recipes and the
measured scaling: ``docs/scaling.md``.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import itertools
import math
import os
import re
import time
import warnings
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from jaxtyping import ArrayLike, PyTree

from ._checks import check_int_at_least, check_positive

__all__ = [
    "AXIS",
    "ENV_COORDINATOR",
    "ENV_HEARTBEAT",
    "ENV_NUM_PROCESSES",
    "ENV_PROCESS_ID",
    "ProcessInfo",
    "auto_chunk_size",
    "barrier",
    "default_dtype",
    "ensemble_mesh",
    "ensemble_sum",
    "initialize",
    "is_main_process",
    "open_store",
    "owned_chunks",
    "process_info",
    "run_chunks",
]

AXIS = "realisations"  #: the mesh axis that realisations are sharded over

ENV_COORDINATOR = "CRJAX_COORDINATOR"  #: host:port of process 0's coordination service
ENV_NUM_PROCESSES = "CRJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CRJAX_PROCESS_ID"
ENV_HEARTBEAT = "CRJAX_HEARTBEAT_TIMEOUT_S"  #: seconds before a silent (dead) process fails the run

# A barrier that outlives any sensible run (the C++ side takes int32 milliseconds: ~24.8 days).
_FOREVER_MS = 2**31 - 1
_POLL_S = 0.5  # how often process 0 looks for the other processes' chunks
_HOSTPORT = re.compile(r"^\[?[A-Za-z0-9_.:-]+\]?:(\d{1,5})$")


# ----------------------------------------------------------------------------------------------
# processes


@dataclasses.dataclass(frozen=True)
class ProcessInfo:
    """Where this process stands: ``index`` in ``[0, count)``, its local and all global devices."""

    index: int
    count: int
    local_devices: int
    global_devices: int

    @property
    def is_main(self) -> bool:
        """Process 0: the one that writes params.json, results, figures and the summary."""
        return self.index == 0


def process_info() -> ProcessInfo:
    """This process's index and count (1 process when ``initialize`` found no cluster)."""
    return ProcessInfo(
        index=jax.process_index(),
        count=jax.process_count(),
        local_devices=jax.local_device_count(),
        global_devices=jax.device_count(),
    )


def is_main_process() -> bool:
    """True in process 0 (and in a single-process run)."""
    return jax.process_index() == 0


def _check_coordinator(coordinator) -> str:
    if not isinstance(coordinator, str) or not (m := _HOSTPORT.match(coordinator)) or not (
        1 <= int(m.group(1)) <= 65535
    ):
        raise ValueError(
            "coordinator must be 'host:port' with a port in [1, 65535] (process 0's address, e.g. "
            f"127.0.0.1:12345); got {coordinator!r}"
        )
    return coordinator


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer; got {value!r}") from None


def _cluster_world_size() -> int:
    """Tasks of the SLURM step / Open MPI job this process belongs to (1: none)."""
    from jax._src.clusters import OmpiCluster, SlurmCluster  # what jax.distributed auto-detects

    if SlurmCluster.is_env_present():
        return _env_int("SLURM_NTASKS") or 1
    if OmpiCluster.is_env_present():
        return _env_int("OMPI_COMM_WORLD_SIZE") or 1
    return 1


def _resolve(coordinator, num_processes, process_id) -> tuple[str, int, int] | str | None:
    """(coordinator, n, id) from the arguments or CRJAX_* variables; "auto": a detected cluster;
    None: one process."""
    explicit = (coordinator, num_processes, process_id)
    if all(v is None for v in explicit):
        env = (os.environ.get(ENV_COORDINATOR) or None, _env_int(ENV_NUM_PROCESSES),
               _env_int(ENV_PROCESS_ID))
        if all(v is None for v in env):
            return "auto" if _cluster_world_size() > 1 else None
        explicit, source = env, (ENV_COORDINATOR, ENV_NUM_PROCESSES, ENV_PROCESS_ID)
    else:
        source = ("coordinator", "num_processes", "process_id")
    coordinator, num_processes, process_id = explicit
    if num_processes is None:
        raise ValueError(f"{source[1]} must be given (an integer >= 1) with {source[0]}/{source[2]}")
    check_int_at_least(source[1], num_processes, 1)
    if num_processes == 1:
        if process_id not in (None, 0):
            raise ValueError(f"{source[2]} must be 0 with {source[1]} = 1; got {process_id}")
        return None
    if coordinator is None or process_id is None:
        missing = [s for s, v in zip(source, explicit, strict=True) if v is None]
        raise ValueError(f"{' and '.join(missing)} must be given for {num_processes} processes")
    _check_coordinator(coordinator)
    if isinstance(process_id, bool) or not isinstance(process_id, (int, np.integer)) or not (
        0 <= process_id < num_processes
    ):
        raise ValueError(
            f"{source[2]} must be an integer in [0, {num_processes - 1}]; got {process_id!r}"
        )
    return coordinator, int(num_processes), int(process_id)


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    local_device_ids: list[int] | None = None,
    timeout_s: int = 300,
    heartbeat_timeout_s: int | None = None,
) -> None:
    """Join (or start) the JAX distributed runtime; must run before JAX computes anything.

    Explicit ``coordinator`` ("host:port" of process 0), ``num_processes`` and ``process_id``
    win; else the variables ``CRJAX_COORDINATOR``, ``CRJAX_NUM_PROCESSES``, ``CRJAX_PROCESS_ID``;
    else, inside a SLURM step (``srun``) or an Open MPI job (``mpirun``) of more than one task,
    ``jax.distributed.initialize()`` reads everything from the environment (on GPUs one device per
    task, ``SLURM_LOCALID``). Otherwise, and for one process, nothing is started: a single process
    with its local devices. On CPUs the cross-process collectives use gloo. Calling it again after a
    successful start is a no-op. It does not start JAX's backends (``crjax.use_cpu_cores()`` may
    follow); ``process_info()`` afterwards says where this process stands.

    ``timeout_s``: how long to wait for all processes to join. ``heartbeat_timeout_s`` (default
    ``CRJAX_HEARTBEAT_TIMEOUT_S`` or 100): after this long without a heartbeat from a process that
    died (``kill -9``, a lost node) the others stop with an error; the chunks on disk stay and the
    same command resumes. Processes that finish their chunks early wait (without a time limit) for
    process 0 to finish the analysis before they exit.
    """
    plan = _resolve(coordinator, num_processes, process_id)
    check_int_at_least("timeout_s", timeout_s, 1)
    if heartbeat_timeout_s is None:
        heartbeat_timeout_s = _env_int(ENV_HEARTBEAT) or 100
    check_int_at_least("heartbeat_timeout_s", heartbeat_timeout_s, 1)
    if plan is None or jax.distributed.is_initialized():
        return
    # CPU collectives across processes: gloo (the default, "none", cannot cross processes).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    # A process that dies (kill -9, a lost node) must not take the others down: they finish their
    # chunks and process 0 computes the dead one's (``run_chunks``).
    jax.config.update("jax_enable_recoverability", True)
    kwargs: dict[str, Any] = {
        "initialization_timeout": int(timeout_s),
        "heartbeat_timeout_seconds": int(heartbeat_timeout_s),
        # processes done with their chunks wait in jax's shutdown barrier for process 0's analysis
        "shutdown_timeout_seconds": _FOREVER_MS // 1000,
    }
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if plan != "auto":
        kwargs.update(coordinator_address=plan[0], num_processes=plan[1], process_id=plan[2])
    try:
        jax.distributed.initialize(**kwargs)
    except RuntimeError as err:
        if "before" in str(err) or "already" in str(err):
            raise RuntimeError(
                "crjax.distributed.initialize() must run before JAX computes anything (right after "
                "`import crjax`); JAX's backends are already running"
            ) from err
        raise
    if plan == "auto" or plan[2] == 0:  # process 0 (auto: decided at exit, backends are up then)
        # Registered after jax's own shutdown hook, so it runs first (atexit is LIFO).
        atexit.register(_wait_for_others_to_leave)


def _wait_for_others_to_leave(timeout_s: float = 600.0) -> None:
    """At exit of process 0: stay until the other processes have disconnected (or died).

    Process 0 hosts the coordination service; with recoverable tasks the shutdown is not
    synchronised, so a process still shutting down when it goes would abort. Bounded wait."""
    deadline = time.monotonic() + timeout_s
    with contextlib.suppress(Exception):  # the service may already be gone: nothing to wait for
        if jax.process_index() != 0:
            return
        count = jax.process_count()
        while len(_live_processes(count)) > 1 and time.monotonic() < deadline:
            time.sleep(0.2)


def barrier(name: str, timeout_s: Real | None = None) -> None:
    """Wait until every process reaches the barrier ``name`` (no-op in a single process).

    Uses the coordination service of ``jax.distributed`` (no device computation, so it also works
    while the processes hold different compiled programs). A process that dies makes the barrier
    fail in the others (an error, not a hang) once the service notices its missing heartbeats.
    """
    if jax.process_count() == 1:
        return
    from jax._src import distributed as _dist  # the runtime client (no public barrier API)

    ms = _FOREVER_MS if timeout_s is None else max(1, min(_FOREVER_MS, int(timeout_s * 1000)))
    _dist.global_state.client.wait_at_barrier(_unique(name), ms)


_CALLS = itertools.count()


def _unique(name: str) -> str:
    """A barrier / key name used once per session: every process makes the same calls in the same
    order (SPMD), so the n-th call has the same name everywhere, and a second run in the same
    session does not meet the first one's barrier."""
    return f"crjax/{next(_CALLS)}/{name}"


# ----------------------------------------------------------------------------------------------
# memory and precision per backend


def default_dtype(backend: str | None = None) -> np.dtype:
    """The default float dtype on ``backend`` (default: JAX's default backend): float64 everywhere.

    CPU: float64 (the reference precision; costs ~1.0-1.3x float32 here). GPU: float64 too, until
    float32 is validated against the float64 estimators (Ĉ_ℓ, K_ij to their statistical errors; the
    estimator issue): that validation has not been done, so float32 is only used when asked for
    (``dtype="float32"``, ``--dtype float32``), never picked silently — although consumer GPUs run
    float64 at 1/32-1/64 of the float32 rate (data-centre GPUs: 1/2).
    """
    backend = jax.default_backend() if backend is None else backend
    if backend not in ("cpu", "gpu", "cuda", "rocm", "tpu", "METAL"):
        raise ValueError(f"backend must be cpu, gpu, cuda, rocm or tpu; got {backend!r}")
    return np.dtype(np.float64)


def _device_free_bytes(device) -> int:
    """Bytes this device can still allocate: ``memory_stats()`` where the backend has it (GPU,
    TPU), else the host's available memory shared by its local devices (CPU)."""
    stats = None
    with contextlib.suppress(Exception):  # CPU devices have no memory_stats (None or raising)
        stats = device.memory_stats()
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    avail = None
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/meminfo", encoding="ascii"):  # noqa: SIM115
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
                break
    if avail is None:
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    return avail // max(1, jax.local_device_count())


def auto_chunk_size(
    npix: int,
    ntimes: int,
    n_modes: int,
    *,
    dtype: Any = None,
    device: Any = None,
    fraction: float = 0.5,
    limit: int = 4096,
) -> int:
    """Realisations per device per compiled batch that fit in ``fraction`` of the device's memory.

    Per realisation in flight: the saved trajectories (2 · ntimes · npix · 3 floats), the Boris
    state and field evaluation (≈ 8 arrays of npix · n_modes floats for the harmonic sum) and the
    field itself (≈ 10 · n_modes floats). Device memory: ``device.memory_stats()`` (GPU) or the
    host's available memory over its local devices (CPU). Clipped to [1, ``limit``].
    """
    for name, v in (("npix", npix), ("ntimes", ntimes), ("n_modes", n_modes), ("limit", limit)):
        check_int_at_least(name, v, 1)
    check_positive("fraction", fraction)
    if fraction > 1:
        raise ValueError(f"fraction must be in (0, 1]; got {fraction}")
    itemsize = np.dtype(default_dtype() if dtype is None else dtype).itemsize
    per = itemsize * (6 * ntimes * npix + 8 * npix * n_modes + 10 * n_modes + 12 * npix)
    free = _device_free_bytes(jax.local_devices()[0] if device is None else device)
    return int(max(1, min(limit, math.floor(fraction * free / per))))


# ----------------------------------------------------------------------------------------------
# the ensemble mesh and collective sums


def ensemble_mesh(devices: list | None = None) -> Mesh:
    """A 1-D mesh, axis ``"realisations"``, over ``devices`` (default: all devices of all
    processes, ``jax.devices()``, in process order)."""
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("devices must hold at least one device")
    return Mesh(np.asarray(devices), (AXIS,))


def _global(value, sharding: NamedSharding):
    """A global array of ``sharding`` from a host value every process holds identically."""
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _replicated(tree, mesh: Mesh):
    rep = NamedSharding(mesh, PartitionSpec())
    return jax.tree_util.tree_map(lambda a: _global(a, rep), tree)


def _host_key(key) -> np.ndarray:
    from .ensemble import _check_key

    _check_key(key)
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if jax.random.key_impl(key) != jax.random.key_impl(jax.random.key(0)):
            raise ValueError("key must use the default PRNG implementation (threefry)")
        return np.asarray(jax.random.key_data(key))
    return np.asarray(key)


@functools.lru_cache(maxsize=32)
def _sum_step(mesh: Mesh, static, reducer, realise, ordered: bool):
    """The compiled step: each device backtracks its block of realisation indices, reduces them
    with ``reducer`` and the blocks are summed across the mesh into the running sum ``acc``."""
    from .backtracking import Trajectory
    from .engine import cast_floats, coupling, integrate

    def local(dynamic, params, key, acc, indices, n, p, times, rL, b_ref):
        plan = eqx.combine(dynamic, static)

        def one(index):
            field = cast_floats(realise(jax.random.fold_in(key, index), params), plan.dtype)
            c = coupling(field, -1.0, rL, None if b_ref.size == 0 else b_ref).astype(plan.dtype)
            xs, vs, nsteps = integrate(plan, field, jnp.zeros_like(p), -p, times, c)
            return Trajectory(times=times, positions=xs, velocities=-vs, num_steps=nsteps)

        per = reducer(jax.vmap(one)(indices))  # (b, ...) per-realisation summaries, this device
        keep = indices < n  # padding beyond n counts zero

        def add(total, values):
            if ordered:
                # all blocks in realisation order on every device, then a sequential sum from
                # ``total``: the same additions in the same order for any mesh (bitwise equal)
                values = jax.lax.all_gather(values, AXIS, tiled=True)
                mask = jax.lax.all_gather(keep, AXIS, tiled=True)

                def body(s, vm):
                    v, m = vm
                    return s + jnp.where(m, v, jnp.zeros_like(v)), None

                return jax.lax.scan(body, total, (values, mask))[0]
            shape = (-1,) + (1,) * (values.ndim - 1)
            block = jnp.where(keep.reshape(shape), values, jnp.zeros_like(values)).sum(0)
            return total + jax.lax.psum(block, AXIS)

        return jax.tree_util.tree_map(add, acc, per)

    rep, shard = PartitionSpec(), PartitionSpec(AXIS)
    mapped = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(rep, rep, rep, rep, shard, rep, rep, rep, rep, rep),
        out_specs=rep,
        check_vma=False,  # the sums are replicated by construction (all_gather/psum)
    )
    return jax.jit(mapped)


def ensemble_sum(
    params: PyTree,
    key: ArrayLike,
    n_realisations: int,
    directions: ArrayLike,
    times: Any,
    *,
    rL: ArrayLike,
    reducer: Any,
    chunk_size: int | None = None,
    realise: Any = None,
    b_ref: ArrayLike | None = None,
    mesh: Any = None,
    reduction: str = "ordered",
    engine: Any = None,
    **settings,
) -> PyTree:
    """Σ_r ``reducer``(trajectories of realisation r), r = 0..n−1, over every device of every process.

    Realisation r backtracks ``directions`` through ``realise(fold_in(key, r), params)`` (as
    ``crjax.ensemble.run_ensemble``); the realisations are dealt in contiguous blocks over the
    ``realisations`` axis of ``mesh`` (default ``ensemble_mesh()``), ``chunk_size`` per device per
    compiled step (default: ``auto_chunk_size`` from the device memory), and the per-realisation
    summaries are summed with collectives (module docstring): ``reduction="ordered"`` gives the
    same bits for any number of devices and processes, ``"psum"`` agrees to round-off.

    Every process must call it with the same arguments (SPMD); each returns the full sum as numpy
    arrays. ``reducer`` maps a ``Trajectory`` batch (leading realisation axis) to a pytree of arrays
    with the same leading axis (e.g. ``crjax.transport.second_moments``); pass the same function
    object each call (it keys the compiled step). Memory per device: ``chunk_size`` realisations'
    trajectories. ``engine``/``**settings`` as in ``run_ensemble`` (``devices`` is ignored: the
    mesh places the work).
    """
    from .backtracking import directions_array, engine_from
    from .ensemble import _check_callable, _check_reducer, _default_realise

    engine = engine_from(engine, settings).replace(devices=1)
    check_int_at_least("n_realisations", n_realisations, 1)
    if chunk_size is not None:
        check_int_at_least("chunk_size", chunk_size, 1)
    if reduction not in ("ordered", "psum"):
        raise ValueError(f"reduction must be 'ordered' or 'psum'; got {reduction!r}")
    _check_callable("reducer", reducer, optional=False)
    _check_callable("realise", realise)
    if mesh is not None and (not isinstance(mesh, Mesh) or mesh.axis_names != (AXIS,)):
        raise ValueError(f"mesh must be a 1-D jax.sharding.Mesh with axis {AXIS!r} "
                         f"(crjax.distributed.ensemble_mesh()); got {mesh!r}")
    key_host = _host_key(key)
    if b_ref is not None:
        check_positive("b_ref", b_ref)
    p = np.asarray(directions_array(directions, engine.dtype))
    plan, times = engine.plan(times, rL)
    realise = _default_realise if realise is None else realise
    mesh = ensemble_mesh() if mesh is None else mesh
    ndev = mesh.devices.size
    if chunk_size is None:
        n_modes = _count_modes(params)
        chunk_size = auto_chunk_size(p.shape[0], times.shape[0], n_modes, dtype=plan.dtype)
    per_step = min(chunk_size, -(-n_realisations // ndev))  # no step wider than needed
    _check_reducer(reducer, per_step, times.shape[0], jnp.asarray(p))

    dynamic, static = eqx.partition(plan, eqx.is_array)
    step = _sum_step(mesh, static, reducer, realise, reduction == "ordered")
    dtype = plan.dtype
    # The running sum starts at zeros of the reducer's per-realisation output (all processes).
    shapes = jax.eval_shape(
        lambda: reducer(_dummy_trajectory(per_step, times.shape[0], p.shape[0], dtype))
    )
    acc = jax.tree_util.tree_map(lambda s: np.zeros(s.shape[1:], s.dtype), shapes)
    rep = functools.partial(_replicated, mesh=mesh)
    # Host numpy first (a process's arrays live on its own devices), then replicated global arrays.
    host = jax.tree_util.tree_map(np.asarray, (dynamic, params))
    dyn_g, params_g = rep(host)
    args = rep((key_host, np.asarray(n_realisations), p, np.asarray(times), np.asarray(rL, dtype),
                np.asarray([] if b_ref is None else b_ref, dtype)))
    key_g, n_g, p_g, times_g, rL_g, bref_g = args
    if jax.dtypes.issubdtype(getattr(key, "dtype", np.uint32), jax.dtypes.prng_key):
        key_g = jax.random.wrap_key_data(key_g)
    acc = rep(acc)
    shard = NamedSharding(mesh, PartitionSpec(AXIS))
    width = per_step * ndev
    for first in range(0, n_realisations, width):
        indices = _global(np.arange(first, first + width), shard)
        acc = step(dyn_g, params_g, key_g, acc, indices, n_g, p_g, times_g, rL_g, bref_g)
    return jax.tree_util.tree_map(lambda a: np.asarray(a.addressable_data(0)), acc)


def _dummy_trajectory(c: int, ntimes: int, npix: int, dtype):
    from .backtracking import Trajectory

    return Trajectory(
        times=jnp.zeros((c, ntimes), dtype),
        positions=jnp.zeros((c, ntimes, npix, 3), dtype),
        velocities=jnp.zeros((c, ntimes, npix, 3), dtype),
        num_steps=jnp.zeros((c, npix), jnp.int32),
    )


def _count_modes(params) -> int:
    n = getattr(params, "n_modes", None)
    if isinstance(n, (int, np.integer)) and n >= 1:
        return int(n)
    sizes = [np.size(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    return max([1, *sizes])


# ----------------------------------------------------------------------------------------------
# run directories shared by processes


def open_store(directory, params: Mapping[str, Any], *, resume: bool = True, upgrade=None):
    """``RunStore.open`` for all processes: process 0 checks the directory and writes
    ``params.json`` first; the others wait for it, then open the same run (its parameters must
    match, as on any resume). A single process: ``RunStore.open`` itself."""
    from .results import RunStore

    if jax.process_count() == 1:
        return RunStore.open(directory, params, resume=resume, upgrade=upgrade)
    store, error = None, None
    key = _unique("open-error")
    if is_main_process():
        try:
            store = RunStore.open(directory, params, resume=resume, upgrade=upgrade)
        except ValueError as err:  # tell the others through the coordination service, then raise
            error = err
        _publish(key, "" if error is None else str(error))
        barrier("open")
        if error is not None:
            raise error
        return store
    barrier("open")
    message = _read_published(key)
    if message:
        raise ValueError(f"process 0 could not open the run: {message}")
    return RunStore.open(directory, params, resume=True, upgrade=upgrade)


def _publish(name: str, value: str) -> None:
    from jax._src import distributed as _dist

    _dist.global_state.client.key_value_set(name, value)


def _read_published(name: str) -> str:
    from jax._src import distributed as _dist

    return _dist.global_state.client.blocking_key_value_get(name, 60_000)


def owned_chunks(missing: list[int], info: ProcessInfo | None = None) -> list[int]:
    """This process's share of the ``missing`` chunk indices: every ``count``-th, from ``index``
    (round-robin over what is left, so a resumed run is balanced for any process count)."""
    info = process_info() if info is None else info
    return list(missing[info.index :: info.count])


def run_chunks(
    store,
    compute_chunk: Callable[[int, int], Mapping[str, Any]],
    *,
    progress: Callable[[int], None] | None = None,
) -> dict[str, np.ndarray] | None:
    """``store.run`` over all processes: each computes and writes its share of the missing chunks
    (``owned_chunks``); process 0 then waits for the others' chunks and returns every chunk; the
    other processes return None as soon as their share is written.

    All processes list the missing chunks before any writes (a barrier), so they agree on the
    share. A process killed mid-run loses only the chunk it was computing: once the coordination
    service misses its heartbeats (``heartbeat_timeout_s``) process 0 computes its remaining
    chunks (``jax_enable_recoverability``: the others keep running). Process 0 itself dying stops
    the run (it hosts the coordination service); the chunks on disk stay, and the same command
    with any number of processes resumes.
    """
    info = process_info()
    if info.count == 1:
        return store.run(compute_chunk, progress=progress)
    missing = store.missing_chunks()
    barrier("listed")  # nobody writes before everybody has listed: one shared assignment

    def compute(i: int) -> None:
        start, stop = store.ranges[i]
        store.write_chunk(i, compute_chunk(start, stop))
        if progress is not None:
            progress(stop - start)

    for i in owned_chunks(missing, info):
        compute(i)
    if not info.is_main:
        return None  # done: process 0 collects (no waiting here: a finished process may exit)
    # Process 0 waits for the others' chunks; a process that is gone (killed, its node lost: no
    # heartbeats for heartbeat_timeout_s) leaves its chunks to process 0.
    owner = {i: k % info.count for k, i in enumerate(missing)}
    warned = False
    while left := store.missing_chunks():
        live = _live_processes(info.count)
        # a chunk nobody was given (it went bad after the listing) is process 0's as well
        orphans = [i for i in left if owner.get(i) not in live or owner.get(i) == 0]
        if not orphans:
            time.sleep(_POLL_S)
            continue
        gone = sorted({owner[i] for i in orphans if owner.get(i) not in (None, 0)})
        if gone and not warned:
            warnings.warn(f"process(es) {gone} stopped "
                          "before finishing their chunks; process 0 computes them", stacklevel=2)
            warned = True
        compute(orphans[0])
    return store.read_chunks()


def _live_processes(count: int) -> set[int]:
    from jax._src import distributed as _dist

    return {0, *_dist.global_state.client.get_live_nodes(list(range(count)))}
