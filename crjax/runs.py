"""The simulation stage of the main job: an ensemble run into a resumable ``RunStore``.

Realisations r = 0..n−1 (key ``fold_in(PRNGKey(seed), r)``) are backtracked chunk by chunk
(``crjax.ensemble.run_ensemble``); each chunk is reduced on the device to small per-realisation
summaries and written atomically (``crjax.results.RunStore``): C_ℓ(T) for g ∥ B0 and g ⊥ B0
(2.2), each realisation's unbiased estimate Ĉ_ℓ^(r) (``crjax.estimators.spectrum_estimate``: the
pixel diagonal removed and the self-consistent offset added), the direction-averaged moments ⟨r_i r_j⟩ (for K_ij), relative diffusion K̃ (2.4), the
chunk's summed δI maps (for the standard-diffusion dipole) and one sky map.

This stage needs no fitting, so it lives in ``crjax``; the analysis, fit and figures that follow
it (``inference.pipeline``) build on it. Physics conventions: ``docs/physics.md``.
"""

from __future__ import annotations

import functools
import os
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Float

from . import distributed, estimators, spectra, transport
from .presets import Preset
from .results import RunStore

__all__ = ["CHUNK_DELAY_ENV", "gradient_directions", "run_params", "simulate"]

CHUNK_DELAY_ENV = "CRJAX_TEST_CHUNK_DELAY"  # test hook: seconds to sleep before every chunk but the first


def gradient_directions(preset: Preset) -> tuple[Float[np.ndarray, " 3"], Float[np.ndarray, " 3"]]:
    """g ∥ B0 and g ⊥ B0, each of magnitude ``preset.grad`` (1/Lc), shape (3,).

    The perpendicular one is x̂ made orthogonal to b̂0 (ŷ if b̂0 ∥ x̂)."""
    b = np.asarray(preset.b0_direction, dtype=float)
    b = b / np.linalg.norm(b)
    e = np.array([1.0, 0.0, 0.0]) if abs(b[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    e = e - (e @ b) * b
    return preset.grad * b, preset.grad * e / np.linalg.norm(e)


@functools.cache
def _reducer(g_par: tuple, g_perp: tuple, ell_max: int):
    """Per-chunk reducer (runs inside the ensemble jit). Cached: one function object per setup,
    because ``run_ensemble`` treats it as a static argument (a new object would recompile)."""
    gp, gq = jnp.asarray(g_par), jnp.asarray(g_perp)

    def samples(maps):  # per-realisation Ĉ_ℓ^(r): each depends on its own map only
        if maps.shape[0] == 1:  # the estimator wants R >= 2; a copy changes no sample
            return estimators.spectrum_estimate(jnp.concatenate([maps, maps]), lmax=ell_max).samples[:1]
        return estimators.spectrum_estimate(maps, lmax=ell_max).samples

    def reduce(traj):
        pos, times = traj.positions, traj.times[0]  # (c, nt, npix, 3), (nt,)
        maps_par = spectra.relative_intensity(pos, gp)  # (c, nt, npix)
        maps_perp = spectra.relative_intensity(pos, gq)
        return {
            "cl_par": spectra.power_spectrum(maps_par, lmax=ell_max),  # (c, nt, L+1)
            "cl_perp": spectra.power_spectrum(maps_perp, lmax=ell_max),
            "est_par": samples(maps_par),  # (c, nt, L+1) unbiased per-realisation Ĉ_ℓ
            "est_perp": samples(maps_perp),
            "rr": transport.second_moments(pos),  # (c, nt, 3, 3) direction-averaged ⟨r_i r_j⟩
            "Ktilde": jax.vmap(lambda x: transport.relative_diffusion_tensor(x, times)[0])(pos),
            "maps_par": maps_par,
            "maps_perp": maps_perp,
        }

    return reduce


def run_params(preset: Preset) -> dict[str, Any]:
    """What ``params.json`` stores for ``preset`` (and what a resumed run must match)."""
    p = preset.to_dict()
    p["n_items"] = preset.n_realisations  # the store's names for the ensemble size / chunking
    return p


def _upgrade_params(stored: dict[str, Any]) -> dict[str, Any]:
    """A stored ``params.json`` in today's names (older runs wrote ``lmin``/``lmax``)."""
    return run_params(Preset.from_dict(stored))


def simulate(
    preset: Preset, out: str | Path, *, resume: bool = True, progress: bool = True
) -> tuple[RunStore, dict[str, np.ndarray] | None]:
    """Run (or resume) the ensemble of ``preset`` into ``out``; returns the store and all chunks.

    Chunk arrays: ``cl_par``, ``cl_perp`` and the unbiased per-realisation estimates ``est_par``,
    ``est_perp`` (n, nt, ℓmax+1); ``rr`` (⟨r_i r_j⟩ over directions)
    and ``Ktilde`` (n, nt, 3, 3) per realisation; ``sky_par``, ``sky_perp`` (n, npix) δI at the
    last save time; ``sum_maps_par``, ``sum_maps_perp`` (nchunks, nt, npix) chunk sums of δI (for
    the standard-diffusion dipole). ``n`` counts realisations, in order. ``preset`` is validated
    in full (it is a ``Preset``) before anything is written.

    Run in several processes (``crjax.distributed.initialize``), each writes its share of the
    chunks into the shared ``out``; process 0 returns all chunks, the others ``(store, None)``.
    """
    from .ensemble import run_ensemble
    from .sky import healpix_directions

    if not isinstance(preset, Preset):
        raise ValueError(  # noqa: TRY004  (bad input is a ValueError throughout crjax)
            f"preset must be a crjax.presets.Preset; got {type(preset).__name__}")
    # All processes of a distributed run (crjax.distributed): process 0 writes params.json first.
    store = distributed.open_store(out, run_params(preset), resume=resume, upgrade=_upgrade_params)
    g_par, g_perp = gradient_directions(preset)
    reducer = _reducer(tuple(g_par), tuple(g_perp), preset.ell_max)
    fparams = preset.field_params()
    key = jax.random.PRNGKey(preset.seed)
    dirs = healpix_directions(preset.nside, dtype=preset.dtype)
    times = jnp.asarray(preset.times)

    delay = float(os.environ.get(CHUNK_DELAY_ENV, "0"))

    def compute(start: int, stop: int) -> dict[str, np.ndarray]:
        if delay and start > 0:  # test hook: a window to kill -9 between chunks (tests only)
            time.sleep(delay)
        # Always a full chunk (the short last one is padded with realisations beyond n and cut):
        # one compiled shape for the whole run, and every chunk identical to an uninterrupted run.
        size = preset.chunk_size
        red = run_ensemble(
            fparams, key, start + size, dirs, times, rL=preset.rL, chunk_size=size, start=start,
            reducer=reducer, solver=preset.solver, dt=preset.dt, dtype=jnp.dtype(preset.dtype),
        )
        red = {k: np.asarray(v)[: stop - start] for k, v in red.items()}
        mp, mq = red.pop("maps_par"), red.pop("maps_perp")
        red["sky_par"], red["sky_perp"] = mp[:, -1], mq[:, -1]
        red["sum_maps_par"], red["sum_maps_perp"] = mp.sum(0)[None], mq.sum(0)[None]
        return red

    bar = None
    if progress and distributed.is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=preset.n_realisations, initial=store.n_done, unit="real",
                   desc=f"crjax {preset.name}", dynamic_ncols=True)
    try:
        # this process's share of the missing chunks; process 0 then gets all (others: None)
        chunks = distributed.run_chunks(store, compute, progress=None if bar is None else bar.update)
    finally:
        if bar is not None:
            bar.close()
    return store, chunks
