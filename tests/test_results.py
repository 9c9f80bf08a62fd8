"""Resumable results store: atomic chunks, resumption, parameter checks, kill -9 recovery."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest

from crjax.results import RunStore, chunk_ranges, read_params, to_jsonable

PARAMS = {"n_items": 7, "chunk_size": 3, "seed": 5, "nside": 2, "times": [1.0, 2.0]}


def _compute(seed):
    """A deterministic per-realisation computation (realisation r ↔ fold_in(key, r))."""
    key = jax.random.PRNGKey(seed)

    def compute(start, stop):
        keys = jax.vmap(lambda r: jax.random.fold_in(key, r))(np.arange(start, stop))
        x = jax.vmap(lambda k: jax.random.normal(k, (4,)))(keys)
        return {"x": x, "r": np.arange(start, stop)}

    return compute


def test_chunk_ranges_cover_items_once():
    rs = chunk_ranges(7, 3)
    assert rs == [(0, 3), (3, 6), (6, 7)]
    with pytest.raises(ValueError, match="chunk_size"):
        chunk_ranges(7, 0)


def test_params_written_first_with_provenance(tmp_path):
    store = RunStore.open(tmp_path / "run", PARAMS)
    stored = read_params(store.directory)
    assert stored["params"] == to_jsonable(PARAMS)
    prov = stored["provenance"]
    assert prov["versions"]["jax"] == jax.__version__ and prov["backend"] == jax.default_backend()
    assert prov["x64"] is True
    assert store.missing_chunks() == [0, 1, 2]


def test_run_assembles_all_realisations_in_order(tmp_path):
    out = RunStore.open(tmp_path, PARAMS).run(_compute(5))
    np.testing.assert_array_equal(out["r"], np.arange(7))
    # Independent of chunking: one chunk of all 7 gives the same numbers bit for bit.
    whole = _compute(5)(0, 7)
    np.testing.assert_array_equal(out["x"], np.asarray(whole["x"]))


def test_resume_computes_only_missing_chunks(tmp_path):
    store = RunStore.open(tmp_path, PARAMS)
    full = store.run(_compute(5))
    store.chunk_path(1).unlink()  # a chunk lost
    (tmp_path / "chunk_00002.npz.tmp-999").write_bytes(b"half a file")  # debris of a killed run
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return _compute(5)(a, b)

    again = RunStore.open(tmp_path, PARAMS).run(spy)
    assert calls == [(3, 6)]
    assert not list(tmp_path.glob("*.tmp-*"))
    for k in full:
        np.testing.assert_array_equal(full[k], again[k])


def test_progress_counts_every_realisation_once(tmp_path):
    store = RunStore.open(tmp_path, PARAMS)
    store.write_chunk(0, _compute(5)(0, 3))
    assert store.n_done == 3  # on disk: a progress bar's initial count
    seen = []
    store.run(_compute(5), progress=seen.append)
    assert seen == [3, 1]  # the new chunks only (3 + 3 + 1 = 7 realisations)
    assert store.n_done == 7


def test_changed_params_name_the_keys(tmp_path):
    RunStore.open(tmp_path, PARAMS)
    changed = dict(PARAMS, seed=6, times=[1.0, 3.0])
    with pytest.raises(ValueError, match=r"\['seed', 'times'\]"):
        RunStore.open(tmp_path, changed)
    with pytest.raises(ValueError, match="already holds a run"):
        RunStore.open(tmp_path, PARAMS, resume=False)


def test_bad_params_and_reserved_names(tmp_path):
    with pytest.raises(ValueError, match="chunk_size"):
        RunStore.open(tmp_path, {"n_items": 3})
    with pytest.raises(ValueError, match="n_items"):
        RunStore.open(tmp_path, {"n_items": 0, "chunk_size": 1})
    store = RunStore.open(tmp_path, PARAMS)
    with pytest.raises(ValueError, match="reserved"):
        store.write_chunk(0, {"_start": np.zeros(3)})
    with pytest.raises(ValueError, match="incomplete"):
        store.read_chunks()


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "not a zip"])
def test_damaged_chunk_is_named_and_recomputed(damage, tmp_path):
    store = RunStore.open(tmp_path, PARAMS)
    full = store.run(_compute(5))
    path = store.chunk_path(1)
    data = bytearray(path.read_bytes())
    if damage == "flipped byte":  # inside the stored array data: only the zip checksum sees it
        i = data.index(np.asarray(full["x"][3]).tobytes()[:8])
        data[i + 3] ^= 0x01
    elif damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data = bytearray(b"garbage" * 10)
    path.write_bytes(bytes(data))
    calls = []

    def spy(a, b):
        calls.append((a, b))
        return _compute(5)(a, b)

    again = RunStore.open(tmp_path, PARAMS)
    with pytest.warns(UserWarning, match=r"chunk_00001\.npz will be recomputed"):
        out = again.run(spy)
    assert calls == [(3, 6)]
    for k in full:
        np.testing.assert_array_equal(full[k], out[k])


def test_stray_chunk_beyond_the_run_is_named(tmp_path):
    store = RunStore.open(tmp_path, PARAMS)
    store.write_chunk(0, _compute(5)(0, 3))
    (tmp_path / "chunk_00007.npz").write_bytes((tmp_path / "chunk_00000.npz").read_bytes())
    with pytest.raises(ValueError, match=r"chunk_00007\.npz lies beyond the 3 chunks"):
        store.missing_chunks()


def test_corrupt_params_json_is_named(tmp_path):
    RunStore.open(tmp_path, PARAMS)
    (tmp_path / "params.json").write_bytes(b"\x00\xff{")
    with pytest.raises(ValueError, match="params.json"):
        RunStore.open(tmp_path, PARAMS)
    (tmp_path / "params.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="must be a JSON object"):
        RunStore.open(tmp_path, PARAMS)
    (tmp_path / "params.json").write_text('{"provenance": {}}')
    with pytest.raises(ValueError, match="no 'params' object"):
        RunStore.open(tmp_path, PARAMS)


@pytest.mark.parametrize("case", ["existing file", "under a file", "foreign directory"])
def test_unusable_directory_is_refused_before_writing(case, tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    d = {"existing file": f, "under a file": f / "run", "foreign directory": tmp_path}[case]
    with pytest.raises(ValueError, match=str(d)):
        RunStore.open(d, PARAMS)
    assert f.read_text() == "x" and not (tmp_path / "params.json").exists()


def test_final_files_roundtrip(tmp_path):
    from crjax.results import read_results, read_summary

    store = RunStore.open(tmp_path, PARAMS)
    store.write_results({"a": np.arange(3.0)})
    store.write_summary({"K_par": np.float64(1.5), "p_interval": (0.4, 0.6)})
    np.testing.assert_array_equal(read_results(tmp_path)["a"], np.arange(3.0))
    assert read_summary(tmp_path) == {"K_par": 1.5, "p_interval": [0.4, 0.6]}
    assert json.loads((tmp_path / "params.json").read_text())["params"]["seed"] == 5


_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np, jax
    import crjax
    from crjax.results import RunStore
    params = {"n_items": 6, "chunk_size": 2, "seed": 11}
    key = jax.random.PRNGKey(11)
    def compute(a, b):
        if a > 0:
            time.sleep(float(sys.argv[2]))  # leave time to be killed after the first chunk
        ks = [jax.random.fold_in(key, r) for r in range(a, b)]
        return {"x": np.stack([np.asarray(jax.random.normal(k, (5,))) for k in ks])}
    RunStore.open(sys.argv[1], params).run(compute)
    """
)


@pytest.mark.slow  # two fresh interpreters importing crjax: ~25 s on a loaded machine. The default
# suite kills the real pipeline instead (tests/test_reproduce.py::test_kill_9_of_the_cli_...).
def test_kill_9_then_resume_is_bit_identical(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(_SCRIPT)
    run = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, str(script), str(run), "30"])
    try:
        deadline = time.time() + 120
        while not (run / "chunk_00000.npz").exists():
            assert proc.poll() is None and time.time() < deadline, "job died before chunk 0"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "chunk_00001.npz").exists()

    subprocess.run([sys.executable, str(script), str(run), "0"], check=True, timeout=120)
    b = RunStore.open(run, read_params(run)["params"]).read_chunks()
    # Reference: the same computation uninterrupted, in this process.
    key = jax.random.PRNGKey(11)
    ref = np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, r), (5,)))
                    for r in range(6)])
    np.testing.assert_array_equal(b["x"], ref)  # bit for bit
