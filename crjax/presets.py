"""Run presets for the main job: the seed's §3 setup (``paper``), a CPU-sized ``quick`` version and
a ``tiny`` smoke-test size. Each is a frozen dataclass of plain numbers, so it is hashable,
printable and goes into ``params.json`` verbatim; :meth:`Preset.field_params` builds the
:class:`crjax.field.FieldParams`.

Units (``docs/physics.md`` §1): c = v = 1, Lc = 1, |B0| = 1, Ω = 1/rL; save times are given as tΩ = t/rL.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np

from ._checks import (
    check_int_at_least,
    check_nside,
    check_open_interval,
    check_positive,
    check_sorted_times,
)
from .engine import SOLVERS

__all__ = [
    "DTYPES",
    "GEOMETRIES",
    "PRESETS",
    "SOLVER_NAMES",
    "Preset",
    "get_preset",
    "paper",
    "quick",
    "tiny",
]

# The one place presets and the CLI read the solver names from. At the merge with the engine
# refactor this becomes ``tuple(crjax.engine.SOLVERS)`` (its name registry): one line.
SOLVER_NAMES: tuple[str, ...] = tuple(SOLVERS)  # the engine's one registry (crjax.engine.SOLVERS)
GEOMETRIES: tuple[str, ...] = ("isotropic", "slab")  # crjax.field's turbulence geometries
DTYPES: tuple[str, ...] = ("float64", "float32")
# Names used in params.json by earlier versions → today's field names (read, never written).
_RENAMED = {"lmin": "lambda_min", "lmax": "lambda_max"}


def _log_times(lo: float, hi: float, n: int) -> tuple[float, ...]:
    return tuple(float(t) for t in np.geomspace(lo, hi, n))


@dataclass(frozen=True)
class Preset:
    """Everything that fixes a reproduction run (seed §3).

    Field: ``sigma2`` = ⟨δB²⟩/B0², bend-over scale ``Lc``, wavelengths ``lambda_min``..``lambda_max``
    (in Lc),
    spectral index ``gamma`` (G_n = k³/(1+(kLc)^γ)), ``n_modes`` harmonic modes, ``geometry``.
    Particles: HEALPix ``nside`` (Npix = 12 nside² momentum directions), gyroradius ``rL`` (in Lc),
    save times ``t_omega`` (tΩ), ``solver`` and step ``dt`` (None: the backtracker's default rL/20).
    Ensemble: ``n_realisations`` field realisations, ``chunk_size`` at a time; realisation r
    uses ``fold_in(PRNGKey(seed), r)``. Observables: multipoles up to ``ell_max``; gradient
    ``|g| = grad`` along B0 (∥) and ⊥ B0; Fig. 3 at ``fig3_t_omega``; p is fitted to Ĉ_ℓ/Ĉ_1 for
    ``1 <= ℓ <= fit_ell_max`` at the last save time. ``dtype``: "float64" (default) or "float32".
    """

    name: str
    nside: int
    n_realisations: int
    chunk_size: int
    t_omega: tuple[float, ...]
    fig3_t_omega: tuple[float, ...]
    sigma2: float = 1.0
    Lc: float = 1.0
    lambda_min: float = 0.01
    lambda_max: float = 100.0
    gamma: float = 11.0 / 3.0
    n_modes: int = 256
    geometry: str = "isotropic"
    b0_direction: tuple[float, float, float] = (0.0, 0.0, 1.0)
    rL: float = 0.1
    solver: str = "boris"
    dt: float | None = None
    seed: int = 20151102
    ell_max: int = 9
    fit_ell_max: int = 9
    grad: float = 1.0
    dtype: str = "float64"
    note: str = field(default="", compare=False)

    def __post_init__(self):
        check_nside(self.nside)
        check_int_at_least("n_realisations", self.n_realisations, 2)  # an ensemble needs a spread
        check_int_at_least("chunk_size", self.chunk_size, 1)
        check_int_at_least("n_modes", self.n_modes, 1)
        check_int_at_least("ell_max", self.ell_max, 2)
        check_int_at_least("fit_ell_max", self.fit_ell_max, 2)
        if self.fit_ell_max > self.ell_max:
            raise ValueError(
                f"fit_ell_max must be <= ell_max={self.ell_max}; got {self.fit_ell_max}"
            )
        if self.ell_max > 3 * self.nside - 1:
            raise ValueError(
                f"ell_max must be <= 3*nside-1 = {3 * self.nside - 1} (HEALPix band limit); "
                f"got {self.ell_max}"
            )
        for name in ("sigma2", "Lc", "lambda_min", "lambda_max", "gamma", "rL", "grad"):
            check_positive(name, getattr(self, name))
        if self.lambda_min >= self.lambda_max:
            raise ValueError(f"lambda_min must be < lambda_max; got lambda_min={self.lambda_min}, "
                             f"lambda_max={self.lambda_max}")
        if self.dt is not None:
            check_open_interval("dt", self.dt, 0.0, self.rL)
        check_sorted_times("t_omega", np.asarray(self.t_omega))
        if len(self.fig3_t_omega) != 3 or any(t not in self.t_omega for t in self.fig3_t_omega):
            raise ValueError("fig3_t_omega must be three of the save times t_omega")
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {GEOMETRIES}; got {self.geometry!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}; got {self.dtype!r}")
        if self.solver not in SOLVER_NAMES:
            raise ValueError(f"solver must be one of {SOLVER_NAMES}; got {self.solver!r}")
        check_int_at_least("seed", self.seed, 0)
        if self.seed >= 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32); got {self.seed}")
        b = np.asarray(self.b0_direction, dtype=float)
        if b.shape != (3,) or not np.all(np.isfinite(b)) or not np.linalg.norm(b) > 0:
            raise ValueError(f"b0_direction must be a finite non-zero 3-vector; got {self.b0_direction!r}")
        self.field_params()  # the field's own checks too, so that a run never fails after it starts

    @property
    def times(self) -> np.ndarray:
        """Save times t = tΩ · rL (units of Lc/c), shape (ntimes,)."""
        return np.asarray(self.t_omega) * self.rL

    @property
    def npix(self) -> int:
        return 12 * self.nside**2

    def replace(self, **changes) -> Preset:
        """A copy with ``changes`` (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """JSON-able parameters (what ``params.json`` stores and resumption compares)."""
        d = dataclasses.asdict(self)
        d.pop("note")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Preset:
        """Inverse of :meth:`to_dict` (e.g. from a run's ``params.json``); unknown keys ignored,
        the names of earlier versions (``lmin``, ``lmax``) read as today's."""
        names = {f.name for f in dataclasses.fields(cls)}
        d = {_RENAMED.get(k, k): v for k, v in d.items()}
        kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in names}
        missing = sorted(f.name for f in dataclasses.fields(cls)
                         if f.name not in kw and f.default is dataclasses.MISSING)
        if missing:
            raise ValueError(f"preset parameters are missing {missing}")
        return cls(**kw)

    def field_params(self):
        """The :class:`crjax.field.FieldParams` of this preset."""
        from .field import FieldParams

        return FieldParams(
            sigma2=self.sigma2,
            Lc=self.Lc,
            lmin=self.lambda_min,
            lmax=self.lambda_max,
            b0=1.0,
            b0_direction=self.b0_direction,
            spectrum=_spectrum(self.gamma),
            geometry=self.geometry,
            n_modes=self.n_modes,
        )


def _spectrum(gamma: float):
    from .field import KolmogorovSpectrum

    return KolmogorovSpectrum(gamma=gamma)


def paper() -> Preset:
    """The seed's §3 simulation: nside 32 (12288 directions), 120 realisations, σ² = 1,
    rL = 0.1 Lc, λ = 0.01–100 Lc, γ = 11/3, 256 modes (the seed does not state N; ``docs/physics.md`` §2),
    tΩ up to 1000 (its Fig. 2).

    The engine runs in float32 (estimators in float64): on the same 48 realisations at nside 8 up to
    tΩ = 1000, float32 and float64 agree on K_∥, K_⊥ and Ĉ_ℓ (ℓ ≤ 9, both gradients) within the
    statistical errors — paired differences at tΩ ≥ 30 beyond 2σ in 3 of 80 entries, none beyond
    3σ (``benchmarks/precision.py``; ``docs/results.md``) — at ~2.8x the speed. 2 CPU cores:
    33 min measured on an idle machine (``docs/results.md``); resumable."""
    return Preset(
        name="paper",
        nside=32,
        n_realisations=120,
        chunk_size=4,
        t_omega=_log_times(1.0, 1000.0, 25),
        fig3_t_omega=(_log_times(1.0, 1000.0, 25)[16], _log_times(1.0, 1000.0, 25)[20], 1000.0),
        ell_max=20,
        fit_ell_max=9,
        dtype="float32",
        note="seed §3 (Ahlers & Mertsch 2015): Figs. 2-3",
    )


def quick() -> Preset:
    """The seed's physics (σ² = 1, rL = 0.1 Lc, λ 0.01–100 Lc, γ = 11/3) at CPU size: nside 8
    (768 directions), 16 realisations, 256 modes, tΩ from 1 to 200. Under a minute on 2 CPU
    cores (35 s measured); its Ĉ_ℓ at ℓ ≳ 5 are noise-dominated (N ∝ 1/Npix) and its
    errors large (16 vs the seed's 120 realisations): say so when quoting it."""
    t = _log_times(1.0, 200.0, 13)
    return Preset(
        name="quick",
        nside=8,
        n_realisations=16,
        chunk_size=4,
        n_modes=256,
        t_omega=t,
        fig3_t_omega=(t[8], t[10], t[12]),
        ell_max=12,
        fit_ell_max=9,
        note="seed §3 physics at CPU size",
    )


def tiny() -> Preset:
    """Smoke-test size (tests, notebooks with CRJAX_TINY=1): nside 2, 3 realisations, 8 modes,
    tΩ ≤ 8. Exercises every code path; its numbers mean nothing physically."""
    t = (1.0, 2.0, 4.0, 8.0)
    return Preset(
        name="tiny",
        nside=2,
        n_realisations=3,
        chunk_size=2,
        n_modes=8,
        t_omega=t,
        fig3_t_omega=t[1:],
        ell_max=5,
        fit_ell_max=5,
        note="smoke test only",
    )


PRESETS = {"paper": paper, "quick": quick, "tiny": tiny}


def get_preset(name: str) -> Preset:
    """Preset by name: 'quick', 'paper' or 'tiny'."""
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)}; got {name!r}")
    return PRESETS[name]()

