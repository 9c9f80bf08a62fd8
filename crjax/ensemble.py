"""Ensembles: backtracking through many field realisations, chunk by chunk (seed §3, docs/physics.md §3).

Realisation r is drawn from ``jax.random.fold_in(key, r)``: chunking and resumption cannot change
results. Each chunk of realisations is backtracked one realisation after another (``jax.lax.map``)
inside one jit and reduced on the device by a ``reducer`` (per-realisation summaries), so only
small outputs leave it. With several devices the particles are split over them by a program with
no collectives, and the first device joins and reduces (``_run_chunk``).
"""

from __future__ import annotations

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
    _integrate_local,
    integrate,
    reference_field_strength,
)

__all__ = ["run_ensemble"]

_AXIS = "particles"


def _realisation(plan, realise, params, key, index, rL, b_ref):
    """Realisation ``index``'s field (``fold_in(key, index)``) in the plan's dtype, and the
    antiparticle's coupling in it (charge −1: backtracking)."""
    field = cast_floats(realise(jax.random.fold_in(key, index), params), plan.dtype)
    return field, coupling(field, -1.0, rL, b_ref).astype(plan.dtype)


@functools.partial(jax.jit, static_argnames=("static", "reducer", "realise"))
def _ensemble_chunk(
    dynamic, params, key, indices, p, times, rL, b_ref, *, static, reducer, realise
):
    plan = eqx.combine(dynamic, static)

    def one(index):
        field, c = _realisation(plan, realise, params, key, index, rL, b_ref)
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


@functools.partial(jax.jit, static_argnames=("static", "realise"))
def _split_trajectories(dynamic, params, key, indices, p, times, rL, b_ref, *, static, realise):
    """The chunk's backtracks with each realisation's particles split over the plan's devices and
    left there: blocks (c, ntimes, nd, m, 3) of m = ceil(npix/nd) particles (the last padded with
    copies of particle 0). ``jax.shard_map``: each device maps over the realisations on its own
    block and no collective is emitted (vmap over a device axis, as ``integrate`` does, makes
    diffrax's batched error checks all-reduce across the devices in every realisation)."""
    plan = eqx.combine(dynamic, static)
    nd, n = plan.devices, p.shape[0]
    blocks = jnp.concatenate([p, jnp.broadcast_to(p[:1], (-n % nd, 3))]).reshape(nd, -1, 3)
    mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()[:nd]), (_AXIS,))
    P = jax.sharding.PartitionSpec

    def per_device(block, params, key, indices, times, rL, b_ref):
        def one(index):
            field, c = _realisation(plan, realise, params, key, index, rL, b_ref)
            q = block[0]
            xs, vs, nsteps = _integrate_local(plan, field, jnp.zeros_like(q), -q, times, c)
            return xs[:, None], vs[:, None], nsteps[None]

        return jax.lax.map(one, indices)

    split = jax.shard_map(
        per_device,
        mesh=mesh,
        in_specs=(P(_AXIS), P(), P(), P(), P(), P(), P()),
        out_specs=(P(None, None, _AXIS), P(None, None, _AXIS), P(None, _AXIS)),
        check_vma=False,
    )
    return split(blocks, params, key, indices, times, rL, b_ref)


@functools.partial(jax.jit, static_argnames=("n", "reducer"))
def _join_and_reduce(times, blocks, *, n, reducer):
    """One device's program: the devices' blocks joined into a chunk's Trajectory, then reduced."""
    xs, vs, nsteps = (jnp.concatenate(b, axis) for b, axis in zip(zip(*blocks), (2, 2, 1)))
    trajectories = Trajectory(
        times=jnp.broadcast_to(times, xs.shape[:2]),
        positions=_join(xs, n),
        velocities=-_join(vs, n),
        num_steps=nsteps.reshape(nsteps.shape[0], -1)[:, :n],
    )
    return trajectories if reducer is None else reducer(trajectories)


def _run_chunk(args, indices, *, static, reducer, realise, devices: int, concrete: bool):
    """One chunk: a single program, or (several devices, concrete inputs) two programs with no
    collective between the devices.

    One program splitting each realisation's particles over the devices (``integrate``) holds
    cross-device all-reduces in every realisation of the ``lax.map`` (the particle gather, and
    diffrax's error checks batched over the device axis); on a 2-core CPU XLA's in-process
    rendezvous deadlocked in 1 of 2 runs of notebook 04 (and in CI). So the devices backtrack
    their particle blocks of every realisation without talking to each other
    (``_split_trajectories``), the blocks are copied to the first device (device-to-device
    copies, not collectives), and it joins and reduces them: measured as fast as the old single
    program (8.65e6 vs 8.50e6 particle-steps/s, 4 realisations x 1024 directions, 256 modes,
    fp64, 2 cores). Dealing whole realisations over the devices needs no join, but ran 0.63-0.80x
    as fast: two single-device programs oversubscribe the cores one partitioned program shares.
    """
    dynamic, params, key, p, times, rL, b_ref = args
    indices = jnp.asarray(indices)
    if devices == 1 or not concrete:
        return _ensemble_chunk(dynamic, params, key, indices, p, times, rL, b_ref,
                               static=static, reducer=reducer, realise=realise)
    out = _split_trajectories(dynamic, params, key, indices, p, times, rL, b_ref,
                              static=static, realise=realise)
    home = jax.local_devices()[0]
    blocks = [_blocks_to(a, axis, home) for a, axis in zip(out, (2, 2, 1))]
    return _join_and_reduce(jax.device_put(times, home), list(zip(*blocks)), n=p.shape[0],
                            reducer=reducer)


def _join(a, n: int):
    """(c, ntimes, nd, m, 3) device blocks -> the first ``n`` particles (c, ntimes, n, 3)."""
    return a.reshape(*a.shape[:2], -1, 3)[:, :, :n]


def _blocks_to(a, axis: int, device) -> list:
    """The device blocks of ``a`` (split along ``axis``) in order, each copied to ``device``."""
    shards = sorted(a.addressable_shards, key=lambda s: s.index[axis].start or 0)
    return [jax.device_put(s.data, device) for s in shards]


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
    With several local devices (the engine's ``devices``, default all) each realisation's particles
    are split over them, in a program with no collectives; the first device then joins the blocks
    and runs the reducer (``_run_chunk``). Results equal one device's bit for bit.

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
    dynamic, static = eqx.partition(plan, eqx.is_array)
    rL = jnp.asarray(rL, dtype)
    b_ref = None if b_ref is None else jnp.asarray(b_ref, dtype)
    args = (dynamic, params, key, p, times, rL, b_ref)
    concrete = all(is_concrete(leaf) for leaf in jax.tree_util.tree_leaves(args))
    outputs = []
    for first in range(start, n_realisations, chunk_size):
        indices = np.arange(first, min(first + chunk_size, n_realisations), dtype=np.int32)
        out = _run_chunk(args, indices, static=static, reducer=reducer, realise=realise,
                         devices=plan.devices, concrete=concrete)
        if on_chunk is not None:
            on_chunk(first, out)
        outputs.append(out)
    if len(outputs) == 1:
        return outputs[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *outputs)
