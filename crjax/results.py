"""Resumable results store: one directory per run, npz + JSON (open, self-describing formats).

Layout of a run directory::

    params.json        every parameter (incl. seed, dtype, chunk size) + provenance; written FIRST
    chunk_00000.npz    per-chunk arrays, leading axis = realisations [start, stop) of that chunk
    chunk_00001.npz    ...
    results.npz        final (assembled / reduced) arrays, written at the end
    summary.json       small scalar summary, written last

Every file is written atomically (temporary file in the same directory, flushed, ``os.replace``), so
``kill -9`` at any moment loses at most the chunk in flight and never leaves a half-written file
under a final name. Realisation ``r`` must draw its randomness from
``jax.random.fold_in(seed_key, r)`` (``crjax.runs.simulate`` does): then which chunks were computed
in which process does not matter, and a resumed run is bit-for-bit identical to an uninterrupted one.
A chunk file that cannot be read back in full (truncated, a flipped byte: its zip checksums fail) is
named in a warning and recomputed.

Resuming with *different* parameters is an error (``ValueError`` naming the differing keys), never a
silent mix of two ensembles. Every problem with the directory itself (an existing file, a path under a
file, no write permission, a directory holding something other than a run, a corrupt ``params.json``)
is a ``ValueError`` naming the path, raised before anything is written. Provenance (package versions, backend, time) may differ on resumption;
it is recorded, not compared.
"""

from __future__ import annotations

import json
import os
import platform
import re
import sys
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._checks import check_int_at_least

__all__ = [
    "RunStore",
    "chunk_ranges",
    "provenance",
    "read_params",
    "read_results",
    "read_summary",
    "to_jsonable",
]

PARAMS_FILE = "params.json"
RESULTS_FILE = "results.npz"
SUMMARY_FILE = "summary.json"
_CHUNK_RE = re.compile(r"^chunk_(\d{5})\.npz$")
_TMP_MARK = ".tmp-"


def to_jsonable(obj: Any) -> Any:
    """Plain-JSON version of ``obj`` (tuples → lists, numpy/JAX scalars and arrays → Python)."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if isinstance(obj, (str, bool)) or obj is None:
        return obj
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj)
    if hasattr(obj, "__array__"):
        a = np.asarray(obj)
        return a.item() if a.ndim == 0 else a.tolist()
    if isinstance(obj, type) or callable(obj):
        return getattr(obj, "__name__", repr(obj))
    return repr(obj)


def provenance() -> dict[str, Any]:
    """Package versions, Python, JAX backend/devices and the time: what produced a run."""
    import jax

    versions = {"python": platform.python_version()}
    for name in ("crjax", "jax", "jaxlib", "numpy", "diffrax", "equinox", "healpy", "scipy"):
        mod = sys.modules.get(name)
        if mod is None:
            try:
                mod = __import__(name)
            except ImportError:  # optional at run time; record its absence instead of failing
                versions[name] = None
                continue
        versions[name] = getattr(mod, "__version__", None)
    return {
        "versions": versions,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "x64": bool(jax.config.read("jax_enable_x64")),
        "platform": platform.platform(),
        "created_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def chunk_ranges(n_items: int, chunk_size: int) -> list[tuple[int, int]]:
    """``[(start, stop), ...]`` covering ``range(n_items)`` in chunks of ``chunk_size``.

    The last chunk may be short."""
    check_int_at_least("n_items", n_items, 1)
    check_int_at_least("chunk_size", chunk_size, 1)
    return [(s, min(s + chunk_size, n_items)) for s in range(0, n_items, chunk_size)]


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> None:
    """Write via ``write(fileobj)`` to a temp file next to ``path``, fsync, then ``os.replace``.

    ``os.replace`` is atomic on POSIX within one file system, so readers (and a resumed run) see
    either the old file or the complete new one, never a truncated file.
    """
    tmp = path.with_name(f"{path.name}{_TMP_MARK}{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():  # only when write() raised: do not leave debris behind
            tmp.unlink()


def _write_json(path: Path, obj: Mapping) -> None:
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(path, lambda f: f.write(text.encode()))


def _write_npz(path: Path, arrays: Mapping[str, Any]) -> None:
    data = {k: np.asarray(v) for k, v in arrays.items()}
    # np.savez on a file object keeps our name (it appends ".npz" only to string paths).
    _atomic_write_bytes(path, lambda f: np.savez(f, **data))


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    """Every array of an npz file, read in full (zip checksums verified); a file that cannot be
    read is a ``ValueError`` naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except FileNotFoundError:
        raise
    except Exception as err:  # BadZipFile, a CRC error, a truncated member, a pickled array ...
        raise ValueError(f"{path} is not a readable npz file ({type(err).__name__}: {err})") from err


def _diff_keys(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths at which two JSON-like trees differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            p = f"{prefix}.{k}" if prefix else k
            if k not in a or k not in b:
                out.append(p)
            else:
                out.extend(_diff_keys(a[k], b[k], p))
        return out
    return [] if a == b else [prefix or "<root>"]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: cannot read the {what} ({err})") from err
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: the {what} is not valid JSON ({err})") from err
    if not isinstance(obj, dict):
        raise ValueError(  # noqa: TRY004  (bad input is a ValueError throughout crjax)
            f"{path}: the {what} must be a JSON object; got {type(obj).__name__}")
    return obj


def _run_directory(directory: str | os.PathLike) -> Path:
    d = Path(directory)
    if not d.exists():
        raise ValueError(f"run directory {str(d)!r} does not exist")
    if not d.is_dir():
        raise ValueError(f"run directory {str(d)!r} is not a directory")
    if not (d / PARAMS_FILE).exists():
        raise ValueError(f"{str(d)!r} holds no run (no {PARAMS_FILE})")
    return d


def read_params(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``params.json`` of a run: ``{"params": ..., "provenance": ...}``."""
    d = _run_directory(directory)
    stored = _read_json(d / PARAMS_FILE, "run parameters")
    if not isinstance(stored.get("params"), dict):
        raise ValueError(  # noqa: TRY004  (bad input is a ValueError throughout crjax)
            f"{d / PARAMS_FILE}: no 'params' object (not a crjax run file)")
    return stored


def read_results(directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """The arrays of ``results.npz`` of a finished run."""
    path = _run_directory(directory) / RESULTS_FILE
    if not path.exists():
        raise ValueError(
            f"{path} not found: the run has not finished (run the same command again to resume it)"
        )
    return _read_npz(path)


def read_summary(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``summary.json`` of a finished run."""
    path = _run_directory(directory) / SUMMARY_FILE
    if not path.exists():
        raise ValueError(f"{path} not found: the run has not finished")
    return _read_json(path, "run summary")


def _is_run_file(name: str) -> bool:
    return (name in (PARAMS_FILE, RESULTS_FILE, SUMMARY_FILE) or bool(_CHUNK_RE.match(name))
            or _TMP_MARK in name)


def _prepare_directory(d: Path) -> None:
    """Refuse, before writing anything, a path that cannot hold a run (ValueError naming it)."""
    for parent in [d, *d.parents]:
        if parent.exists():
            if not parent.is_dir():
                what = "is an existing file" if parent == d else f"lies under the file {str(parent)!r}"
                raise ValueError(f"out directory {str(d)!r} {what}; choose a directory path")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"out directory {str(d)!r}: no permission to write in {str(parent)!r}")
            break
    if d.is_dir() and not (d / PARAMS_FILE).exists():
        other = sorted(f.name for f in d.iterdir() if not _is_run_file(f.name))
        if other:
            raise ValueError(
                f"out directory {str(d)!r} is not empty and holds no crjax run (found {other[:3]}); "
                "choose a new or empty directory"
            )


@dataclass
class RunStore:
    """A run directory: parameters, per-chunk arrays, final results (see module docstring).

    Create with :meth:`open`. ``params`` must be JSON-able (after :func:`to_jsonable`) and must
    contain everything that determines the results, in particular ``n_items`` (number of
    realisations), ``chunk_size`` and the seed.
    """

    directory: Path
    params: dict[str, Any]
    _verified: dict[Path, tuple[int, int]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        params: Mapping[str, Any],
        *,
        resume: bool = True,
        upgrade: Callable[[dict[str, Any]], Mapping[str, Any]] | None = None,
    ) -> RunStore:
        """Open (create or resume) the run in ``directory`` with ``params``.

        - new/empty directory: writes ``params.json`` first (parameters + :func:`provenance`);
        - existing run, ``resume=True``: the stored parameters must equal ``params``, else
          ``ValueError`` naming the differing keys; completed chunks are kept;
        - existing run, ``resume=False``: ``ValueError`` (choose another directory or resume);
        - ``upgrade(stored_params)``, if given, rewrites parameters stored by an older version in
          today's names before they are compared;
        - a path that cannot hold a run (module docstring): ``ValueError`` naming it, nothing written.
        Stale temporary files from an interrupted process are removed.
        """
        d = Path(directory)
        p = to_jsonable(dict(params))
        for name in ("n_items", "chunk_size"):
            if name not in p:
                raise ValueError(f"params must contain {name!r} (an integer >= 1)")
            check_int_at_least(f"params[{name!r}]", p[name], 1)
        _prepare_directory(d)
        pfile = d / PARAMS_FILE
        if pfile.exists():
            if not resume:
                raise ValueError(
                    f"out directory {str(d)!r} already holds a run; resume it (resume=True, the "
                    "CLI default) or choose another directory"
                )
            stored = read_params(d)
            old_params = stored["params"]
            if upgrade is not None:
                try:
                    old_params = to_jsonable(upgrade(old_params))
                except (TypeError, ValueError) as err:
                    raise ValueError(f"{pfile}: stored parameters are not valid ({err})") from err
            diff = _diff_keys(old_params, p)
            if diff:
                raise ValueError(
                    f"cannot resume {str(d)!r}: parameters differ from the stored run in keys "
                    f"{diff}; use the same parameters or another out directory"
                )
            prov = provenance()
            old = stored.get("provenance", {})
            changed = [k for k in ("versions", "backend") if old.get(k) != prov.get(k)]
            if changed:
                warnings.warn(
                    f"resuming {str(d)!r} with different {changed} than it was started with; "
                    "results may differ in the last bits between chunks",
                    stacklevel=2,
                )
        else:
            try:
                d.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise ValueError(f"cannot create out directory {str(d)!r}: {err.strerror}") from err
            _write_json(pfile, {"params": p, "provenance": provenance()})
        store = cls(directory=d, params=p)
        store._remove_stale_tmp()
        return store

    # -- chunks -------------------------------------------------------------------------------
    @property
    def ranges(self) -> list[tuple[int, int]]:
        """Realisation range ``(start, stop)`` of every chunk index."""
        return chunk_ranges(self.params["n_items"], self.params["chunk_size"])

    def chunk_path(self, index: int) -> Path:
        return self.directory / f"chunk_{index:05d}.npz"

    def _remove_stale_tmp(self) -> None:
        for f in self.directory.iterdir():
            if _TMP_MARK in f.name:
                f.unlink(missing_ok=True)

    def completed_chunks(self) -> list[int]:
        """Indices of chunk files that read back in full with the expected range.

        A file that does not (truncated, corrupted: zip checksum errors) is named in a warning and
        left to be recomputed; each file is verified once per size and modification time."""
        done = []
        for f in sorted(self.directory.iterdir()):
            m = _CHUNK_RE.match(f.name)
            if not m:
                continue
            i = int(m.group(1))
            if i >= len(self.ranges):
                raise ValueError(f"{f} lies beyond the {len(self.ranges)} chunks of this run")
            if self._chunk_ok(i, f):
                done.append(i)
        return done

    def _chunk_ok(self, index: int, path: Path) -> bool:
        st = path.stat()
        stamp = (st.st_size, st.st_mtime_ns)
        cache = self._verified
        if cache.get(path) == stamp:
            return True
        try:
            d = _read_npz(path)
            ok = (int(d["_start"]), int(d["_stop"])) == self.ranges[index]
            reason = f"it holds realisations {int(d['_start'])}..{int(d['_stop'])}" if not ok else ""
        except (ValueError, KeyError) as err:  # unreadable (disk full at write time, a flipped byte)
            ok, reason = False, str(err)
        if ok:
            cache[path] = stamp
        else:
            warnings.warn(f"chunk file {path} will be recomputed: {reason}", stacklevel=3)
        return ok

    @property
    def n_done(self) -> int:
        """Realisations in the chunks already on disk."""
        done = set(self.completed_chunks())
        return sum(b - a for i, (a, b) in enumerate(self.ranges) if i in done)

    def missing_chunks(self) -> list[int]:
        """Indices still to compute, in order."""
        done = set(self.completed_chunks())
        return [i for i in range(len(self.ranges)) if i not in done]

    def write_chunk(self, index: int, arrays: Mapping[str, Any]) -> Path:
        """Atomically write chunk ``index``; every array's leading axis must be its realisations."""
        start, stop = self.ranges[index]
        for k in arrays:
            if k.startswith("_"):
                raise ValueError(f"array names starting with '_' are reserved; got {k!r}")
        data = dict(arrays)
        data["_start"], data["_stop"] = start, stop
        path = self.chunk_path(index)
        _write_npz(path, data)
        return path

    def read_chunk(self, index: int) -> dict[str, np.ndarray]:
        d = _read_npz(self.chunk_path(index))
        d.pop("_start"), d.pop("_stop")
        return d

    def read_chunks(self) -> dict[str, np.ndarray]:
        """All chunks concatenated along the leading (realisation) axis; every chunk must exist."""
        missing = self.missing_chunks()
        if missing:
            raise ValueError(f"run {str(self.directory)!r} is incomplete: chunks {missing} missing")
        parts = [self.read_chunk(i) for i in range(len(self.ranges))]
        for i, part in enumerate(parts):
            if set(part) != set(parts[0]):
                raise ValueError(
                    f"{self.chunk_path(i)} holds arrays {sorted(part)}, chunk 0 holds "
                    f"{sorted(parts[0])}: the chunks come from different versions; delete it to "
                    "recompute it"
                )
        return {k: np.concatenate([p[k] for p in parts], axis=0) for k in parts[0]}

    def run(
        self,
        compute_chunk: Callable[[int, int], Mapping[str, Any]],
        *,
        progress: Callable[[int], None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Compute every missing chunk with ``compute_chunk(start, stop)`` and return all chunks.

        ``progress(n)`` (e.g. a tqdm ``update``) is called with the number of realisations of
        every new chunk; those already on disk are ``n_done`` (a bar's ``initial``, so that its
        rate and ETA count only the work of this session).
        """
        for i in self.missing_chunks():
            start, stop = self.ranges[i]
            self.write_chunk(i, compute_chunk(start, stop))
            if progress is not None:
                progress(stop - start)
        return self.read_chunks()

    # -- final outputs ------------------------------------------------------------------------
    def write_results(self, arrays: Mapping[str, Any]) -> Path:
        path = self.directory / RESULTS_FILE
        _write_npz(path, arrays)
        return path

    def write_summary(self, summary: Mapping[str, Any]) -> Path:
        path = self.directory / SUMMARY_FILE
        _write_json(path, summary)
        return path
