"""Ensembles: backtracking through many field realisations, chunk by chunk (seed §3, docs/physics.md §3).

Realisation r is drawn from ``jax.random.fold_in(key, r)``: chunking and resumption cannot change
results. Each chunk of realisations is backtracked one realisation after another (``jax.lax.map``)
inside one jit and reduced on the device by a ``reducer`` (per-realisation summaries), so only
small outputs leave it. With several devices a chunk's realisations are dealt over them, each
device backtracking whole realisations with no collectives (``run_ensemble``).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import ArrayLike, PyTree

from ._checks import check_int_at_least, is_concrete
from .backtracking import Trajectory, directions_array, engine_from
from .engine import (
    TimesLike,
    VectorsLike,
    cast_floats,
    coupling,
    integrate,
    reference_field_strength,
)

__all__ = ["run_ensemble"]


@functools.partial(jax.jit, static_argnames=("static", "reducer", "realise"))
def _ensemble_chunk(
    dynamic, params, key, indices, p, times, rL, b_ref, *, static, reducer, realise
):
    plan = eqx.combine(dynamic, static)

    def one(index):
        field = cast_floats(realise(jax.random.fold_in(key, index), params), plan.dtype)
        c = coupling(field, -1.0, rL, b_ref).astype(plan.dtype)
        # the antiparticle forward from 0 with −p̂: backtracking (crjax.backtracking)
        xs, vs, nsteps = integrate(plan, field, jnp.zeros_like(p), -p, times, c)
        return Trajectory(times=times, positions=xs, velocities=-vs, num_steps=nsteps)

    # lax.map, not vmap: under vmap every realisation's field is batched, B(x) becomes a batched
    # (realisations × positions × modes) product that XLA:CPU runs ~3x slower, and the particle
    # split over devices stopped using the second core (measured nside 8, 8 realisations, fp32:
    # 2.0e6 vs 6.6e6 particle-steps/s, CPU/wall 0.64 vs 1.97). One realisation at a time takes the
    # single-field fast path, with its particles split over the devices.
    trajectories = jax.lax.map(one, indices)
    return trajectories if reducer is None else reducer(trajectories)


def _check_reducer(reducer, c, ntimes, p):
    """Trace (not run) ``reducer`` on a chunk-shaped Trajectory: per-realisation leading axis?"""
    npix, dtype = p.shape[0], p.dtype
    shapes = (
        jax.ShapeDtypeStruct((c, ntimes), dtype),
        jax.ShapeDtypeStruct((c, ntimes, npix, 3), dtype),
        jax.ShapeDtypeStruct((c, ntimes, npix, 3), dtype),
        jax.ShapeDtypeStruct((c, npix), jnp.int32),
    )
    out = jax.eval_shape(lambda *leaves: reducer(Trajectory(*leaves)), *shapes)
    for leaf in jax.tree_util.tree_leaves(out):
        if len(leaf.shape) < 1 or leaf.shape[0] != c:
            raise ValueError(
                "reducer must return arrays with a leading realisation axis of the chunk's "
                f"length {c}; got a leaf of shape {leaf.shape}"
            )


def _check_key(key) -> None:
    try:
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    except AttributeError:
        typed = False
    raw = hasattr(key, "dtype") and key.dtype == jnp.uint32 and key.ndim == 1
    if not (typed and key.ndim == 0) and not raw:
        raise ValueError(
            f"key must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); got {key!r}"
        )


def _check_callable(name: str, f, optional: bool = True) -> None:
    if not (callable(f) or (optional and f is None)):
        raise ValueError(f"{name} must be a callable{' or None' if optional else ''}; got {f!r}")


def _default_realise(key, params):
    from .field import realise_field

    return realise_field(key, params)


def run_ensemble(
    params: PyTree,
    key: ArrayLike,
    n_realisations: int,
    directions: VectorsLike | int,
    times: TimesLike,
    *,
    rL: ArrayLike,
    chunk_size: int = 8,
    reducer: Callable | None = None,
    on_chunk: Callable | None = None,
    start: int = 0,
    realise: Callable | None = None,
    b_ref: ArrayLike | None = None,
    engine=None,  # a crjax.Engine; checked by engine_from (ValueError), so not annotated
    **settings,
):
    """Backtrack ``directions`` through realisations ``start .. n_realisations-1`` of ``params``.

    Realisation r is drawn from ``jax.random.fold_in(key, r)``, so results do not depend on
    ``chunk_size`` and a run resumed at ``start`` reproduces the missing realisations exactly.
    Realisations are processed ``chunk_size`` at a time (``jax.lax.map`` inside one jit), so memory is
    bounded by one chunk's trajectories: ~ chunk_size · ntimes · npix · 48 bytes (fp64) in flight.
    With several local devices (the engine's ``devices``, default all) each chunk's realisations
    are dealt in contiguous blocks over them, one program per device running at the same time and
    none talking to another (``_split_chunk``); a chunk smaller than the device count leaves
    devices idle. Called under a JAX transformation (traced inputs), a chunk is one program and
    each realisation's particles are split over the devices instead (``crjax.engine.integrate``).

    Args:
        params: ``FieldParams`` (any pytree accepted by ``realise``).
        key: base PRNG key.
        n_realisations: total number of realisations (>= 1); ``start`` < n_realisations.
        directions, times, rL, b_ref, engine, **settings: as in ``crjax.backtracking.backtrack``
            (``b_ref`` default: |b0| of each realised field).
        chunk_size: realisations per compiled batch (>= 1).
        reducer: pure, jittable function mapping a chunk's ``Trajectory`` batch (leading realisation
            axis of length c) to a pytree of arrays whose leading axis is also c (per-realisation
            summaries, e.g. ``crjax.transport.second_moments``). Runs inside the jit, so the full
            trajectories never leave the device. Pass the same function object each call (it is a
            static argument: a new lambda recompiles).
        on_chunk: called as ``on_chunk(first_index, reduced)`` after each chunk (progress bars,
            resumable result files); ``reduced`` is the chunk's reducer output (or Trajectory).
        realise: ``realise(key, params) -> field`` (default ``crjax.field.realise_field``).

    Returns:
        The reducer outputs (or Trajectories) of realisations start..n_realisations-1, concatenated
        along the leading axis.
    """
    engine = engine_from(engine, settings)
    check_int_at_least("n_realisations", n_realisations, 1)
    check_int_at_least("chunk_size", chunk_size, 1)
    check_int_at_least("start", start, 0)
    if start >= n_realisations:
        raise ValueError(
            f"start must be in [0, n_realisations - 1] = [0, {n_realisations - 1}]; got {start}"
        )
    _check_key(key)
    _check_callable("reducer", reducer)
    _check_callable("on_chunk", on_chunk)
    _check_callable("realise", realise)
    p = directions_array(directions, engine.dtype)
    plan, times = engine.plan(times, rL)
    if b_ref is not None:
        reference_field_strength(None, b_ref)  # checks b_ref; |b0| of each realisation otherwise
    realise = _default_realise if realise is None else realise
    if reducer is not None:
        _check_reducer(reducer, min(chunk_size, n_realisations - start), times.shape[0], p)

    dtype = plan.dtype
    rL = jnp.asarray(rL, dtype)
    b_ref = None if b_ref is None else jnp.asarray(b_ref, dtype)
    devices = _realisation_devices(plan, (params, key, rL, b_ref))
    if len(devices) > 1:
        plan = dataclasses.replace(plan, devices=1)  # whole realisations per device: no collectives
    dynamic, static = eqx.partition(plan, eqx.is_array)
    chunk = functools.partial(_ensemble_chunk, static=static, reducer=reducer, realise=realise)
    args = (dynamic, params, key, p, times, rL, b_ref)  # the chunk's inputs other than the indices
    inputs = [args] if len(devices) == 1 else [_put(args, d) for d in devices]
    outputs = []
    for first in range(start, n_realisations, chunk_size):
        indices = np.arange(first, min(first + chunk_size, n_realisations), dtype=np.int32)
        out = _split_chunk(chunk, inputs, devices, indices)
        if on_chunk is not None:
            on_chunk(first, out)
        outputs.append(out)
    if len(outputs) == 1:
        return outputs[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)


def _realisation_devices(plan, inputs) -> list:
    """The devices a chunk's realisations are dealt over: the plan's first ``devices`` local ones
    when every input holds a value, else the default device alone (under a transformation the
    whole chunk is one traced program, and its particles are split over the devices instead)."""
    concrete = all(is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(inputs))
    return jax.local_devices()[: plan.devices] if concrete else [None]


def _split_chunk(chunk, inputs, devices, indices):
    """Run ``chunk`` on contiguous, equal blocks of ``indices``, one block per device.

    The calls are dispatched asynchronously, so the devices backtrack their blocks at the same time
    (measured 2.0x on two CPU devices for two independent programs). Each program runs on one
    device without collectives: splitting one realisation's particles over the devices instead
    puts a cross-device all-reduce in every realisation's loop iteration, which on a 2-core CPU
    deadlocked XLA's in-process rendezvous about one run in two (notebook 04). A short last block
    is padded with copies of its last index (computed, then dropped), so every block of a chunk
    has the same shape and one compiled program serves all devices.
    """
    if len(devices) == 1:
        return chunk(*_with_indices(inputs[0], jnp.asarray(indices)))
    width = -(-indices.size // len(devices))
    blocks = [indices[i : i + width] for i in range(0, indices.size, width)]
    outs = []
    for block, args, device in zip(blocks, inputs, devices):
        padded = np.concatenate([block, np.full(width - block.size, block[-1])])
        outs.append((block.size, chunk(*_with_indices(args, jax.device_put(padded, device)))))
    home = devices[0]
    parts = [jax.device_put(jax.tree_util.tree_map(lambda a, n=n: a[:n], o), home) for n, o in outs]
    if len(parts) == 1:
        return parts[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *parts)


def _put(tree, device):
    """``tree`` with its arrays on ``device``; Python scalars stay weakly typed, as jit sees them."""
    return jax.tree_util.tree_map(
        lambda a: jax.device_put(a, device) if isinstance(a, (jax.Array, np.ndarray)) else a, tree
    )


def _with_indices(args, indices):
    dynamic, params, key, p, times, rL, b_ref = args
    return dynamic, params, key, indices, p, times, rL, b_ref
