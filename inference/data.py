"""Measured (or simulated) angular power spectra: a plain-text format, its loader and writer.

No machine-readable IceCube/HAWC C_ℓ tables are public (docs/physics.md), so crjax reads user-supplied
spectra in this format (full description: ``docs/spectrum_format.md``)::

    # experiment: IceCube
    # median_energy_TeV: 20
    # f_sky: 0.3
    # noise_level: 2.5e-11
    # noise_subtracted: false
    # synthetic: false
    # provenance: digitised from Fig. 8 of ApJ 826, 220 (2016) by ...
    # ell  C_ell  err_lo  err_hi
    1  1.2e-6  0.4e-6  0.6e-6
    2  ...

* Header lines ``# key: value`` (keys in ``HEADER_KEYS``; an unknown key is an error, so typos cannot
  pass unnoticed). Lines starting ``##`` and a bare ``#`` are free comments; a ``#`` line without a
  colon must be the column line ``# ell C_ell err_lo err_hi``.
* Data rows: exactly four whitespace-separated columns ``ell C_ell err_lo err_hi`` — ℓ an integer ≥ 0,
  C_ℓ finite (negative only in a spectrum marked ``noise_subtracted: true``: a raw power spectrum is a
  mean of squares), err_lo/err_hi the finite, > 0 distances from C_ℓ to the lower/upper end of the 68%
  interval. Blank lines are ignored; a ``#`` after data on a line is an error (no inline comments).
* Every problem raises ``ValueError`` naming the file and line; rows are never dropped silently. The
  loader is linear in the number of rows (numpy's C reader, array checks).

Noise constants (``NOISE_LEVELS``) come from the seed's Fig. 1 caption: N ≈ f_sky 4π/N_CR with
IceCube f_sky ≈ 0.3, N ≈ 2.5e-11 and HAWC f_sky ≈ 0.7, N ≈ 1.8e-10.
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
import warnings
from collections.abc import Mapping
from numbers import Real

import numpy as np

__all__ = [
    "HEADER_KEYS",
    "NOISE_LEVELS",
    "NoiseLevel",
    "Spectrum",
    "load_spectrum",
    "save_spectrum",
    "spectrum_from_estimate",
]

COLUMNS = ("ell", "C_ell", "err_lo", "err_hi")


@dataclasses.dataclass(frozen=True)
class NoiseLevel:
    """Shot-noise level N of an experiment's C_ℓ (seed Fig. 1: N ≈ f_sky 4π/N_CR) and its sky fraction."""

    f_sky: float
    noise: float
    source: str


_SEED_FIG1 = "Ahlers & Mertsch (seed paper), Fig. 1 caption: N ≈ f_sky 4π/N_CR"
NOISE_LEVELS: Mapping[str, NoiseLevel] = {
    "IceCube": NoiseLevel(f_sky=0.3, noise=2.5e-11, source=_SEED_FIG1),
    "HAWC": NoiseLevel(f_sky=0.7, noise=1.8e-10, source=_SEED_FIG1),
}

# key -> (type, description); the type parses the header value
HEADER_KEYS: Mapping[str, tuple[str, str]] = {
    "experiment": ("str", "name of the experiment or simulation"),
    "median_energy_TeV": ("float>0", "median CR energy of the data set [TeV]"),
    "f_sky": ("fraction", "effective observed sky fraction, in (0, 1]"),
    "dec_min_deg": ("dec", "lower declination of the observed band [deg], in [-90, 90]"),
    "dec_max_deg": ("dec", "upper declination of the observed band [deg], in [-90, 90]"),
    "noise_level": ("float>=0", "shot-noise level N of the C_ell (same units as C_ell)"),
    "noise_subtracted": ("bool", "true if N was already subtracted from the C_ell column"),
    "synthetic": ("bool", "true if the data are not a real measurement"),
    "provenance": ("str", "where the numbers come from (paper, figure, digitiser, script)"),
    "reference": ("str", "bibliographic reference"),
    "comment": ("str", "free text"),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Spectrum:
    """An angular power spectrum with asymmetric 68% errors and its metadata.

    Arrays (all shape (n,), sorted by ℓ): ``ell`` (int), ``cl``, ``err_lo``, ``err_hi`` (> 0).
    Metadata mirrors the header keys (``None`` if absent); ``path`` is the file it came from.
    """

    ell: np.ndarray
    cl: np.ndarray
    err_lo: np.ndarray
    err_hi: np.ndarray
    experiment: str | None = None
    median_energy_TeV: float | None = None
    f_sky: float | None = None
    dec_min_deg: float | None = None
    dec_max_deg: float | None = None
    noise_level: float | None = None
    noise_subtracted: bool | None = None
    synthetic: bool | None = None
    provenance: str | None = None
    reference: str | None = None
    comment: str | None = None
    path: str | None = None

    def __post_init__(self):
        where = self.path or "spectrum"
        ell = np.asarray(self.ell)
        arrays = {k: np.asarray(getattr(self, k), dtype=float) for k in ("cl", "err_lo", "err_hi")}
        if ell.ndim != 1 or ell.size == 0:
            raise ValueError(f"{where}: ell must be a non-empty 1-D array; got shape {ell.shape}")
        for k, v in arrays.items():
            if v.shape != ell.shape:
                raise ValueError(
                    f"{where}: {k} must have the shape of ell {ell.shape}; got {v.shape}"
                )
            if not np.all(np.isfinite(v)):
                raise ValueError(f"{where}: {k} contains NaN or inf")
        if not np.all(np.isfinite(ell)) or not np.all(ell == np.round(ell)) or np.any(ell < 0):
            raise ValueError(f"{where}: ell must be integers >= 0; got {ell!r}")
        ell = ell.astype(np.int64)
        values, counts = np.unique(ell, return_counts=True)
        if values.size != ell.size:
            dup = [int(e) for e in values[counts > 1][:10]]
            raise ValueError(f"{where}: duplicate multipole(s) ell = {dup}")
        for k in ("err_lo", "err_hi"):
            if np.any(arrays[k] <= 0):
                raise ValueError(
                    f"{where}: {k} must be > 0 (a 68% error distance); got {arrays[k]!r}"
                )
        if self.noise_subtracted is not True and np.any(arrays["cl"] < 0):
            r = int(np.argmax(arrays["cl"] < 0))
            raise ValueError(
                f"{where}: " + _negative_raw_message(int(ell[r]), float(arrays["cl"][r]))
            )
        order = np.argsort(ell, kind="stable")
        object.__setattr__(self, "ell", ell[order])
        for k, v in arrays.items():
            object.__setattr__(self, k, v[order])
        meta = {k: getattr(self, k) for k in HEADER_KEYS}
        _validate_meta(meta, where)

    @property
    def sigma(self) -> np.ndarray:
        """Symmetrised error (err_lo + err_hi)/2, shape (n,)."""
        return 0.5 * (self.err_lo + self.err_hi)

    def metadata(self) -> dict:
        """Header entries that are set, in HEADER_KEYS order."""
        return {k: getattr(self, k) for k in HEADER_KEYS if getattr(self, k) is not None}

    def select(self, lmin: Real | None = None, lmax: Real | None = None) -> Spectrum:
        """The rows with lmin ≤ ℓ ≤ lmax (inclusive; None = no bound). ValueError if none remain."""
        lo = int(self.ell.min()) if lmin is None else lmin
        hi = int(self.ell.max()) if lmax is None else lmax
        for name, v in (("lmin", lo), ("lmax", hi)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
                raise ValueError(f"{name} must be an integer >= 0; got {v!r}")
        if lo > hi:
            raise ValueError(f"lmin must be <= lmax; got lmin={lo}, lmax={hi}")
        keep = (self.ell >= lo) & (self.ell <= hi)
        if not np.any(keep):
            raise ValueError(
                f"no multipoles in the range lmin={lo}..lmax={hi}; the data cover ell = "
                f"{int(self.ell.min())}..{int(self.ell.max())}"
            )
        return dataclasses.replace(
            self,
            ell=self.ell[keep],
            cl=self.cl[keep],
            err_lo=self.err_lo[keep],
            err_hi=self.err_hi[keep],
        )


def spectrum_from_estimate(ell, cl, variance, **metadata) -> Spectrum:
    """A Spectrum from a simulated estimate Ĉ_ℓ and its (realisation) variance: symmetric errors √var."""
    var = np.asarray(variance, dtype=float)
    if not np.all(np.isfinite(var)) or np.any(var <= 0):
        raise ValueError(f"variance must be finite and > 0; got {variance!r}")
    sig = np.sqrt(var)
    return Spectrum(
        ell=np.asarray(ell), cl=np.asarray(cl, dtype=float), err_lo=sig, err_hi=sig, **metadata
    )


def _parse_value(key: str, text: str, where: str):
    kind = HEADER_KEYS[key][0]
    if kind == "str":
        if not text:
            raise ValueError(f"{where}: header '{key}' has an empty value")
        return text
    if kind == "bool":
        low = text.lower()
        if low not in ("true", "false"):
            raise ValueError(f"{where}: header '{key}' must be true or false; got {text!r}")
        return low == "true"
    try:
        value = float(text)
    except ValueError:
        raise ValueError(
            f"{where}: header '{key}' must be a number ({HEADER_KEYS[key][1]}); got {text!r}"
        ) from None
    _check_number(key, value, where)
    return value


def _check_number(key, value, where):
    kind = HEADER_KEYS[key][0]
    ok = (
        math.isfinite(value)
        and {
            "float>0": value > 0,
            "float>=0": value >= 0,
            "fraction": 0 < value <= 1,
            "dec": -90 <= value <= 90,
        }[kind]
    )
    if not ok:
        raise ValueError(
            f"{where}: header '{key}' out of range: {HEADER_KEYS[key][1]}; got {value!r}"
        )


def _validate_meta(meta: dict, where: str) -> None:
    for key, value in meta.items():
        if value is None:
            continue
        kind = HEADER_KEYS[key][0]
        if kind == "bool" and not isinstance(value, bool):
            raise ValueError(f"{where}: {key} must be a bool; got {value!r}")
        if kind == "str" and not isinstance(value, str):
            raise ValueError(f"{where}: {key} must be a string; got {value!r}")
        if kind not in ("bool", "str"):
            _check_number(key, float(value), where)
    lo, hi = meta.get("dec_min_deg"), meta.get("dec_max_deg")
    if (lo is None) != (hi is None):
        raise ValueError(f"{where}: dec_min_deg and dec_max_deg must be given together")
    if lo is not None and not lo < hi:
        raise ValueError(f"{where}: dec_min_deg must be < dec_max_deg; got {lo} and {hi}")


_MAX_ELL = 2**31 - 1


def _read_text(path: str) -> str:
    """The file as text; ValueError naming the file for a missing, unreadable, empty or binary file."""
    try:
        with open(path, "rb") as fh:
            raw = fh.read()
    except FileNotFoundError:
        raise ValueError(f"{path}: no such spectrum file") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a spectrum file") from None
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from None
    nul = raw.find(b"\x00")
    if nul >= 0:
        line = raw.count(b"\n", 0, nul) + 1
        raise ValueError(
            f"{path}:{line}: binary content (a NUL byte at offset {nul}); a spectrum file is plain text "
            "(docs/spectrum_format.md)"
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ValueError(
            f"{path}:{line}: not UTF-8 text (byte 0x{raw[err.start]:02x} at offset {err.start}); a spectrum "
            "file is plain text (docs/spectrum_format.md)"
        ) from None
    if not text.strip():
        raise ValueError(
            f"{path}: the file is empty; expected header lines and data rows {' '.join(COLUMNS)}"
        )
    return text


def _comment_lines(text: str, path: str):
    """(line number, line) of every line whose first non-blank character is '#', found by jumping from one
    '#' to the next (linear in the file, a handful of Python steps per header line). A '#' after data on
    the same line is refused: the format has no inline comments."""
    out = []
    pos, line, counted = text.find("#"), 1, 0
    while pos >= 0:
        start = text.rfind("\n", 0, pos) + 1
        end = text.find("\n", pos)
        end = len(text) if end < 0 else end
        line += text.count("\n", counted, start)
        counted = start
        if text[start:pos].strip():
            raise ValueError(
                f"{path}:{line}: '#' after data on the same line; comments must be whole lines starting "
                f"with '#' (docs/spectrum_format.md); got {text[start:end].rstrip(chr(13))!r}"
            )
        out.append((line, text[start:end].strip()))
        pos = text.find("#", end)
    return out


def _parse_header(comments, path: str) -> dict:
    meta: dict = {}
    for lineno, line in comments:
        where = f"{path}:{lineno}"
        if line.startswith("##") or line == "#":
            continue
        body = line[1:].strip()
        if ":" not in body:
            if body.split() == list(COLUMNS):
                continue
            raise ValueError(
                f"{where}: header lines must be '# key: value' (or the column line "
                f"'# {' '.join(COLUMNS)}'; '##' starts a free comment); got {line!r}"
            )
        key, value = (s.strip() for s in body.split(":", 1))
        if key not in HEADER_KEYS:
            raise ValueError(
                f"{where}: unknown header key {key!r}; allowed keys: {', '.join(HEADER_KEYS)}"
            )
        if key in meta:
            raise ValueError(f"{where}: header key {key!r} given twice")
        meta[key] = _parse_value(key, value, where)
    return meta


def _data_line_numbers(text: str, rows) -> dict:
    """Line numbers of the data rows with the given indices (0-based, in file order): one linear pass,
    used only to name the line of an error."""
    wanted = sorted({int(r) for r in rows})
    found, k = {}, 0
    for lineno, line in enumerate(text.split("\n"), start=1):
        s = line.strip()
        if not s or s.startswith("#"):
            continue
        if k == wanted[len(found)]:
            found[k] = lineno
            if len(found) == len(wanted):
                break
        k += 1
    return found


def _diagnose_rows(text: str, path: str, reason: str):
    """The first malformed data row of a file the fast parser refused: ValueError naming its line."""
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{lineno}"
        fields = line.split()
        if len(fields) != len(COLUMNS):
            raise ValueError(
                f"{where}: expected {len(COLUMNS)} columns ({' '.join(COLUMNS)}); got {len(fields)}: {line!r}"
            )
        for name, tok in zip(COLUMNS, fields):
            try:
                np.float64(tok)
            except ValueError:
                if name == "ell":
                    raise ValueError(f"{where}: ell must be an integer >= 0; got {tok!r}") from None
                raise ValueError(f"{where}: {name} is not a number: {tok!r}") from None
    raise ValueError(f"{path}: the data rows could not be read ({reason})")


def load_spectrum(path: str | os.PathLike) -> Spectrum:
    """Read a spectrum file (format: module docstring, ``docs/spectrum_format.md``) into a ``Spectrum``.

    Raises ``ValueError`` naming the file (and the line where there is one) for a missing, unreadable,
    empty or binary file, malformed headers, unknown keys, wrong column counts, unparsable numbers,
    NaN/inf, errors ≤ 0, non-integer, negative or duplicate ℓ, and a negative C_ℓ in a spectrum that is
    not marked ``noise_subtracted: true``. Linear in the number of rows: the rows are parsed by numpy's
    C reader (``numpy.loadtxt``) and checked as arrays; Python loops run over header lines only, and over
    the rows only to name the line of an error (2 million rows: a few seconds).
    """
    if not isinstance(path, (str, os.PathLike)):
        raise ValueError(f"path must be a file path; got {path!r}")  # noqa: TRY004  (project convention: every bad input is a ValueError)
    path = os.fspath(path)
    text = _read_text(path)
    meta = _parse_header(_comment_lines(text, path), path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # numpy warns (not raises) on a file without data rows
            table = np.loadtxt(io.StringIO(text), comments="#", ndmin=2, dtype=np.float64)
    except UserWarning:
        table = np.empty((0, len(COLUMNS)))
    except ValueError as err:
        _diagnose_rows(text, path, str(err))
    if table.shape[0] == 0:
        raise ValueError(f"{path}: no data rows (expected columns {' '.join(COLUMNS)})")
    if table.shape[1] != len(COLUMNS):
        _diagnose_rows(text, path, f"{table.shape[1]} columns")

    def fail(row, message):
        line = _data_line_numbers(text, [row])[row]
        raise ValueError(f"{path}:{line}: {message}")

    ell_f = table[:, 0]
    bad = ~(np.isfinite(ell_f) & (ell_f == np.round(ell_f)) & (ell_f >= 0) & (ell_f <= _MAX_ELL))
    if np.any(bad):
        r = int(np.argmax(bad))
        fail(r, f"ell must be an integer >= 0 (at most {_MAX_ELL}); got {float(ell_f[r])!r}")
    for col, name in enumerate(COLUMNS[1:], start=1):
        v = table[:, col]
        nonfinite = ~np.isfinite(v)
        if np.any(nonfinite):
            r = int(np.argmax(nonfinite))
            fail(r, f"{name} must be finite; got {float(v[r])!r}")
        if name != "C_ell" and np.any(v <= 0):
            r = int(np.argmax(v <= 0))
            fail(r, f"{name} must be > 0 (distance to the 68% bound); got {float(v[r])!r}")
    ell = ell_f.astype(np.int64)
    order = np.argsort(ell, kind="stable")
    dup = np.nonzero(np.diff(ell[order]) == 0)[0]
    if dup.size:
        # the duplicate that appears first in the file: report its second occurrence
        pairs = [(max(order[i], order[i + 1]), min(order[i], order[i + 1])) for i in dup]
        second, first = min(pairs)
        lines = _data_line_numbers(text, [first, second])
        fail(second, f"duplicate multipole ell = {ell[second]} (first at line {lines[first]})")
    cl = table[:, 1]
    if meta.get("noise_subtracted") is not True and np.any(cl < 0):
        r = int(np.argmax(cl < 0))
        fail(r, _negative_raw_message(int(ell[r]), float(cl[r])))
    return Spectrum(ell=ell, cl=cl, err_lo=table[:, 2], err_hi=table[:, 3], path=path, **meta)


def _negative_raw_message(ell: int, value: float) -> str:
    return (
        f"C_ell = {value!r} < 0 at ell = {ell}, but the spectrum is not marked 'noise_subtracted: true': "
        "a raw power spectrum is a mean of squared amplitudes and cannot be negative. If the noise level "
        "was subtracted, add the header line '# noise_subtracted: true'; otherwise the column is not C_ell"
    )


def _format_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def save_spectrum(path: str | os.PathLike, spectrum: Spectrum) -> None:
    """Write ``spectrum`` in the text format; ``load_spectrum`` returns identical arrays and metadata."""
    lines = []
    for key, value in spectrum.metadata().items():
        text = _format_value(value)
        if "\n" in text:
            raise ValueError(f"header value of {key!r} must be a single line; got {text!r}")
        lines.append(f"# {key}: {text}")
    lines.append("# " + "  ".join(COLUMNS))
    for e, c, lo, hi in zip(spectrum.ell, spectrum.cl, spectrum.err_lo, spectrum.err_hi):
        # repr() round-trips float64 exactly
        lines.append(f"{int(e)}  {float(c)!r}  {float(lo)!r}  {float(hi)!r}")
    with open(os.fspath(path), "w", encoding="utf-8") as fh:
        fh.write("\n".join(lines) + "\n")
