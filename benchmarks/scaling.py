"""Scale-out benchmark (issue 10): particle-steps/s of one ensemble at 1 and 2 local devices and at
2 processes (jax.distributed over localhost, gloo collectives), with the efficiency vs one device.

Each configuration runs ``crjax.distributed.ensemble_sum`` (realisations sharded over the mesh of
all devices of all processes, per-realisation summaries all-gathered and summed in order) in fresh
processes: ``1dev`` = one process with one JAX CPU device, ``2dev`` = one process with two,
``2proc`` = two processes with one each; by default every device runs one thread
(``--xla_cpu_multi_thread_eigen=false``), so a device is a core (``--no-pin``: XLA's default,
where one device already spreads single operations over the cores). A worker compiles and runs once, then times ``--calls``
calls (best), between barriers; a 2-process time is process 0's (it includes waiting for the other
through the collective). The machine is shared, so the configurations are interleaved (the order
rotates every round) and the best of ``--rounds`` rounds is kept for each.

Workload (default): the seed's field shape with 64 modes, nside 4 (192 particles), 8 realisations,
rL = 0.1 Lc, tΩ = 50 (Boris, dt = rL/20: 1000 pushes), float64. A particle-step is one Boris push of
one particle.

    python benchmarks/scaling.py                # ~3-5 min on 2 busy cores
    python benchmarks/scaling.py --rounds 1 --calls 1 --realisations 4   # smoke run

The last line is one JSON object with steps_per_s_1dev, steps_per_s_2dev, steps_per_s_2proc and
the efficiencies.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(args) -> None:
    import jax
    import numpy as np

    import crjax
    from crjax import distributed

    if args.num_processes > 1:
        distributed.initialize(f"127.0.0.1:{args.port}", args.num_processes, args.process_id)
    from crjax.engine import Engine
    from crjax.field import FieldParams
    from crjax.sky import healpix_directions

    def reducer(traj):  # ⟨r r⟩ over directions: a small per-realisation summary
        pos = traj.positions
        return {"rr": (pos[..., :, None] * pos[..., None, :]).mean(-3)}

    params = FieldParams(sigma2=1.0, lmin=0.01, lmax=100.0, n_modes=args.modes)
    rL = 0.1
    times = rL * np.array([args.t_omega / 4, args.t_omega / 2, args.t_omega])
    dirs = healpix_directions(args.nside)
    key = jax.random.PRNGKey(0)
    ndev = jax.device_count()
    per_device = -(-args.realisations // ndev)

    def call():
        return distributed.ensemble_sum(params, key, args.realisations, dirs, times, rL=rL,
                                        reducer=reducer, chunk_size=per_device)

    t0 = time.perf_counter()
    call()
    first = time.perf_counter() - t0
    best = float("inf")
    for i in range(args.calls):
        distributed.barrier(f"bench-start-{i}")
        t0 = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - t0)
        distributed.barrier(f"bench-end-{i}")
    plan, _ = Engine().plan(times, rL)
    pushes = (plan.stepsize_controller.ts.shape[0] - 1) * plan.solver.substeps
    steps = args.realisations * dirs.shape[0] * pushes
    if jax.process_index() == 0:
        print(json.dumps({"best_s": best, "first_s": first, "particle_steps": steps,
                          "global_devices": ndev, "processes": jax.process_count(),
                          "crjax": crjax.__version__}), flush=True)


def _launch(config: str, args, timeout: float) -> dict:
    """Run one configuration in fresh processes; the parsed JSON line of process 0."""
    ndev_local, nproc = {"1dev": (1, 1), "2dev": (2, 1), "2proc": (1, 2)}[config]
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={ndev_local}"
    if args.pin:  # one thread per device: "1 device" means one core, not XLA's intra-op pool
        env["XLA_FLAGS"] += " --xla_cpu_multi_thread_eigen=false"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = _free_port()
    base = [sys.executable, str(Path(__file__).resolve()), "--worker", "--num-processes",
            str(nproc), "--port", str(port), "--modes", str(args.modes), "--nside",
            str(args.nside), "--realisations", str(args.realisations), "--t-omega",
            str(args.t_omega), "--calls", str(args.calls)]
    procs = [subprocess.Popen([*base, "--process-id", str(i)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for i in range(nproc)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"{config} worker failed (rc {p.returncode}):\n{err[-2000:]}")
            outs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    line = [ln for ln in outs[0].splitlines() if ln.startswith("{")][-1]
    return json.loads(line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (best kept)")
    ap.add_argument("--calls", type=int, default=2, help="timed calls per worker (best kept)")
    ap.add_argument("--nside", type=int, default=4)
    ap.add_argument("--realisations", type=int, default=8)
    ap.add_argument("--modes", type=int, default=64)
    ap.add_argument("--t-omega", type=float, default=50.0)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds per launch")
    ap.add_argument("--no-pin", dest="pin", action="store_false",
                    help="let XLA spread single operations of a device over all cores (default: "
                         "one thread per device, --xla_cpu_multi_thread_eigen=false)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--num-processes", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--process-id", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        _worker(args)
        return
    configs = ["1dev", "2dev", "2proc"]
    best: dict[str, dict] = {}
    print(f"pinned one thread per device: {args.pin}; workload: nside {args.nside}, {args.realisations} realisations, {args.modes} modes, "
          f"tΩ = {args.t_omega:g}, Boris fp64; {args.rounds} interleaved rounds x {args.calls} "
          f"calls; cores: {len(os.sched_getaffinity(0))}", flush=True)
    for r in range(args.rounds):
        order = configs[r % 3:] + configs[: r % 3]  # rotate: no configuration always goes first
        for config in order:
            res = _launch(config, args, args.timeout)
            rate = res["particle_steps"] / res["best_s"]
            print(f"round {r} {config:5s}: {res['best_s']:.3f} s  {rate:.3g} particle-steps/s "
                  f"(first call incl. compile {res['first_s']:.1f} s)", flush=True)
            if config not in best or res["best_s"] < best[config]["best_s"]:
                best[config] = res
    rates = {c: best[c]["particle_steps"] / best[c]["best_s"] for c in configs}
    summary = {
        "steps_per_s_1dev": rates["1dev"],
        "steps_per_s_2dev": rates["2dev"],
        "steps_per_s_2proc": rates["2proc"],
        "efficiency_2dev_vs_1dev": rates["2dev"] / (2 * rates["1dev"]),
        "efficiency_2proc_vs_1dev": rates["2proc"] / (2 * rates["1dev"]),
        "ratio_2proc_vs_2dev": rates["2proc"] / rates["2dev"],
        "rounds": args.rounds,
        "calls": args.calls,
        "particle_steps": best["1dev"]["particle_steps"],
        "one_thread_per_device": args.pin,
    }
    print(f"speed-up 2dev/1dev {rates['2dev'] / rates['1dev']:.2f}x, 2proc/1dev "
          f"{rates['2proc'] / rates['1dev']:.2f}x, 2proc/2dev {summary['ratio_2proc_vs_2dev']:.2f}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
