"""crjax.distributed: one sharding model for 1 device, several local devices and N processes.

The references are independent of the code under test: a sequential Python sum over the
per-realisation outputs of ``crjax.ensemble.run_ensemble`` (the single-process engine path), and
runs in fresh processes (2 processes over localhost gloo; 4 forced host devices). The suite's own
process has 2 CPU devices (conftest), so the in-process ``ensemble_sum`` already shards realisations.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from crjax import distributed, transport
from crjax.ensemble import run_ensemble
from crjax.field import FieldParams

ROOT = Path(__file__).resolve().parents[1]
N_REAL, RL, NSIDE = 5, 0.3, 2  # 5 realisations: padding is exercised on 2 and 4 devices
TIMES = np.array([0.5, 1.0, 2.0])


def _params():
    return FieldParams(sigma2=1.0, n_modes=8, lmin=0.1, lmax=10.0)


def _reducer(traj):  # module level: one function object, one compiled step
    return {"rr": transport.second_moments(traj.positions), "x_last": traj.positions[:, -1]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.pop("XLA_FLAGS", None)
    env.update(extra)
    return env


# The worker computes the same ensemble_sum as `test_ensemble_sum_*` in a fresh process.
_WORKER = textwrap.dedent(
    """
    import sys
    import numpy as np
    import crjax, jax
    from crjax import distributed, transport
    from crjax.field import FieldParams
    out, args = sys.argv[1], sys.argv[2:]
    if args:
        distributed.initialize(args[0], int(args[1]), int(args[2]))
    def reducer(traj):
        return {"rr": transport.second_moments(traj.positions), "x_last": traj.positions[:, -1]}
    s = distributed.ensemble_sum(
        FieldParams(sigma2=1.0, n_modes=8, lmin=0.1, lmax=10.0), jax.random.PRNGKey(3), 5, 2,
        np.array([0.5, 1.0, 2.0]), rL=0.3, reducer=reducer, chunk_size=2)
    info = distributed.process_info()
    np.savez(out, global_devices=info.global_devices, processes=info.count, **s)
    """
)


def _run_workers(tmp_path: Path, nproc: int, env: dict, timeout: float = 240) -> list[dict]:
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    port = _free_port()
    outs = [tmp_path / f"sum_{i}.npz" for i in range(nproc)]
    extra = (lambda i: [f"127.0.0.1:{port}", str(nproc), str(i)]) if nproc > 1 else (lambda i: [])
    procs = [
        subprocess.Popen([sys.executable, str(script), str(outs[i]), *extra(i)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(nproc)
    ]
    try:
        for p in procs:
            _, err = p.communicate(timeout=timeout)
            assert p.returncode == 0, err[-3000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [dict(np.load(o)) for o in outs]


@pytest.fixture(scope="module")
def reference():
    """Sequential sum (r = 0, 1, ...) of run_ensemble's per-realisation outputs, one process."""
    per = run_ensemble(_params(), jax.random.PRNGKey(3), N_REAL, NSIDE, TIMES, rL=RL,
                       reducer=_reducer, chunk_size=N_REAL, devices=1)
    total = {}
    for k, v in per.items():
        total[k] = np.zeros(np.shape(v)[1:])
        for r in range(N_REAL):
            total[k] = total[k] + np.asarray(v[r])
    return total


@pytest.fixture(scope="module")
def in_process():
    return distributed.ensemble_sum(_params(), jax.random.PRNGKey(3), N_REAL, NSIDE, TIMES, rL=RL,
                                    reducer=_reducer, chunk_size=2)


def test_ensemble_sum_matches_sequential_sum(reference, in_process):
    # Ordered reduction: the same additions in the same order as the sequential reference, and each
    # realisation's trajectories do not depend on the device (fold_in(key, r)): bitwise equal.
    assert jax.device_count() == 2  # the mesh of this process shards realisations 3 + 2 (padded)
    for k in reference:
        np.testing.assert_array_equal(in_process[k], reference[k], err_msg=k)


@pytest.mark.slow
def test_ensemble_sum_psum_agrees_to_round_off(reference):
    s = distributed.ensemble_sum(_params(), jax.random.PRNGKey(3), N_REAL, NSIDE, TIMES, rL=RL,
                                 reducer=_reducer, chunk_size=4, reduction="psum")
    # A tree all-reduce adds 5 O(1) terms in another order: ≤ a few ulp of the magnitude (fp64).
    for k in reference:
        np.testing.assert_allclose(s[k], reference[k], rtol=0, atol=1e-13 * np.abs(reference[k]).max())


# default tier: ~16 s on a quiet 2-core machine (~70 s under heavy load): two fresh processes
def test_two_processes_reproduce_one_process(tmp_path, in_process):
    # 2 processes, one CPU device each, gloo collectives over localhost: every process returns the
    # full sum, bitwise equal to the single-process one (ordered reduction).
    outs = _run_workers(tmp_path, 2, _env(XLA_FLAGS="--xla_force_host_platform_device_count=1"))
    for out in outs:
        assert int(out["processes"]) == 2 and int(out["global_devices"]) == 2
        for k in in_process:
            np.testing.assert_array_equal(out[k], in_process[k], err_msg=k)


@pytest.mark.slow
def test_four_local_devices_reproduce_one_process(tmp_path, in_process):
    (out,) = _run_workers(tmp_path, 1, _env(XLA_FLAGS="--xla_force_host_platform_device_count=4"))
    assert int(out["global_devices"]) == 4 and int(out["processes"]) == 1
    for k in in_process:
        np.testing.assert_array_equal(out[k], in_process[k], err_msg=k)


# -- bad input and small helpers (no processes started) ------------------------------------------


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (("127.0.0.1:1234", None, 0), "num_processes must be given"),
        (("127.0.0.1:1234", 0, 0), "num_processes"),
        (("127.0.0.1:1234", 2, 2), r"process_id must be an integer in \[0, 1\]"),
        (("127.0.0.1:1234", 2, -1), "process_id"),
        ((None, 2, 0), "coordinator must be given"),
        (("localhost", 2, 0), "coordinator must be 'host:port'"),
        (("127.0.0.1:99999", 2, 0), "coordinator must be 'host:port'"),
        ((None, 1, 1), "process_id must be 0"),
    ],
)
def test_initialize_rejects_bad_arguments(args, match):
    with pytest.raises(ValueError, match=match):
        distributed.initialize(*args)


def test_initialize_reads_env_and_single_process_is_a_no_op(monkeypatch):
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "2")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "5")
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "127.0.0.1:1234")
    with pytest.raises(ValueError, match="CRJAX_PROCESS_ID must be an integer in"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "x")
    with pytest.raises(ValueError, match="CRJAX_NUM_PROCESSES must be an integer"):
        distributed.initialize()
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "1")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "0")
    assert distributed.initialize() is None  # one process: nothing started
    info = distributed.process_info()
    assert (info.index, info.count, info.is_main) == (0, 1, True)
    assert not jax.distributed.is_initialized()


def test_owned_chunks_round_robin_covers_everything_once():
    missing = [0, 3, 4, 7, 8, 9, 12]
    for count in (1, 2, 3, 5):
        shares = [
            distributed.owned_chunks(missing, distributed.ProcessInfo(i, count, 1, count))
            for i in range(count)
        ]
        assert sorted(x for share in shares for x in share) == missing
        assert max(map(len, shares)) - min(map(len, shares)) <= 1  # balanced for any count


def test_auto_chunk_size_follows_memory_per_realisation():
    small = distributed.auto_chunk_size(48, 4, 8, limit=10**9)
    big = distributed.auto_chunk_size(48 * 64, 4, 8, limit=10**9)
    assert small >= 1 and big >= 1
    # ~64x the bytes per realisation (all terms ∝ npix but the small field term): ~64x fewer
    assert 32 < small / big < 80 or big == 1
    assert distributed.auto_chunk_size(48, 4, 8, limit=3) <= 3
    with pytest.raises(ValueError, match="fraction"):
        distributed.auto_chunk_size(48, 4, 8, fraction=2.0)
    with pytest.raises(ValueError, match="npix"):
        distributed.auto_chunk_size(0, 4, 8)


def test_default_dtype_is_float64_on_every_backend():
    for backend in ("cpu", "gpu", "tpu"):
        assert distributed.default_dtype(backend) == np.float64
    with pytest.raises(ValueError, match="backend"):
        distributed.default_dtype("abacus")


def test_ensemble_sum_rejects_bad_input():
    kw = {"rL": RL, "reducer": _reducer}
    with pytest.raises(ValueError, match="reduction"):
        distributed.ensemble_sum(_params(), jax.random.PRNGKey(0), 2, NSIDE, TIMES, reduction="x", **kw)
    with pytest.raises(ValueError, match="n_realisations"):
        distributed.ensemble_sum(_params(), jax.random.PRNGKey(0), 0, NSIDE, TIMES, **kw)
    with pytest.raises(ValueError, match="mesh"):
        distributed.ensemble_sum(_params(), jax.random.PRNGKey(0), 2, NSIDE, TIMES, mesh="x", **kw)
    with pytest.raises(ValueError, match="reducer"):
        distributed.ensemble_sum(_params(), jax.random.PRNGKey(0), 2, NSIDE, TIMES, rL=RL,
                                 reducer=None)
    with pytest.raises(ValueError, match="key"):
        distributed.ensemble_sum(_params(), 3, 2, NSIDE, TIMES, **kw)


def test_barrier_is_a_no_op_in_one_process():
    distributed.barrier("solo", timeout_s=1)
    assert distributed.is_main_process()
    json.dumps(distributed.process_info().__dict__)  # plain numbers (for logs and summaries)


# -- the crjax command in several processes sharing one run directory ----------------------------

_TINY = ["simulate", "--preset", "tiny", "--chunk-size", "1", "--no-progress"]  # 3 chunks


def _cli_processes(out: Path, nproc: int, **env_extra) -> list[subprocess.Popen]:
    port = _free_port()
    # 2 CPU devices per process, as in this test process (the engine's particle split): the
    # chunks are then the same computation wherever they run.
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2", **env_extra)
    return [
        subprocess.Popen(
            [sys.executable, "-m", "inference.cli", *_TINY, "--out", str(out), "--coordinator",
             f"127.0.0.1:{port}", "--num-processes", str(nproc), "--process-id", str(i)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(nproc)
    ]


@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
    """One process, in this process: the run every layout must reproduce."""
    from inference import cli

    out = tmp_path_factory.mktemp("one_process")
    assert cli.main([*_TINY, "--out", str(out)]) == 0
    return out


def _assert_same_results(a: Path, b: Path) -> None:
    ra, rb = np.load(a / "results.npz"), np.load(b / "results.npz")
    assert sorted(ra.files) == sorted(rb.files)
    for k in ra.files:  # fold_in(key, r) per realisation, whole chunks: the same bits
        np.testing.assert_array_equal(ra[k], rb[k], err_msg=k)


@pytest.mark.slow
def test_cli_two_processes_reproduce_one_process(tmp_path, tiny_reference):
    out = tmp_path / "two"
    procs = _cli_processes(out, 2)
    try:
        outs = [p.communicate(timeout=400) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    assert "K_par" in outs[0][0]  # process 0 analysed and printed the summary
    assert "process 1: its chunks are in" in outs[1][0] and "K_par" not in outs[1][0]
    assert sorted(f.name for f in out.glob("chunk_*.npz")) == [
        "chunk_00000.npz", "chunk_00001.npz", "chunk_00002.npz"]
    _assert_same_results(tiny_reference, out)
    assert json.loads((out / "summary.json").read_text())["realizations"] == 3


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:]
        time.sleep(0.1)


@pytest.mark.slow
def test_cli_kill_9_of_one_process_loses_only_its_chunk(tmp_path, tiny_reference):
    """Process 1 is killed (kill -9) in its first chunk; process 0 goes on, notices the missing
    heartbeats and computes process 1's chunk itself: the run finishes with the same results."""
    out = tmp_path / "killed"
    # every chunk but chunk 0 waits 20 s first: process 1 (chunk 1) is still in it when killed
    procs = _cli_processes(out, 2, CRJAX_TEST_CHUNK_DELAY="20", CRJAX_HEARTBEAT_TIMEOUT_S="5")
    try:
        _wait_for(out / "chunk_00000.npz", procs[0])
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait(timeout=60)
        _, err = procs[0].communicate(timeout=400)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode == 0, err[-3000:]
    assert "process(es) [1] stopped before finishing their chunks" in err
    _assert_same_results(tiny_reference, out)


@pytest.mark.slow
def test_cli_two_processes_interrupted_then_resumed_with_one(tmp_path, tiny_reference):
    """Both processes killed after chunk 0; the same command in one process completes the run."""
    from inference import cli

    out = tmp_path / "resumed"
    procs = _cli_processes(out, 2, CRJAX_TEST_CHUNK_DELAY="60")
    try:
        _wait_for(out / "chunk_00000.npz", procs[0])
    finally:
        for p in procs:
            p.kill()
            p.wait(timeout=60)
    assert sorted(f.name for f in out.glob("chunk_*.npz")) == ["chunk_00000.npz"]
    assert cli.main([*_TINY, "--out", str(out)]) == 0  # one process, no distributed flags
    _assert_same_results(tiny_reference, out)
