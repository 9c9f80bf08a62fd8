"""Backtracking engine benchmark (issues 2, 12): particle-steps/s of Boris (fp64, fp32) and adaptive RK.

Setup of the CRPropa comparison: N = 1024 particles, the seed's field with 256 modes (σ² = 1,
λ 0.01–100 Lc), rL = 0.1 Lc, tΩ = 200, Boris step rL/20 (4000 pushes), 4 save times. CRPropa 3
(commit db97df14, SIMD plane waves, PropagationBP) built and measured on this machine kind (AMD
EPYC, AVX2, 2 threads) in issue 12: 5.97e6 particle-steps/s with 2 threads, 3.09e6 with 1.

Every timed case runs in a worker process (this file with ``--worker``) that compiles once and
then times on request. ``--baseline PATH`` starts a second worker with ``PYTHONPATH=PATH`` (a
checkout of another revision, e.g. ``git worktree add --detach ../baseline 8d16f5a``) and times
the same cases there, interleaved A/B/A/B (the machine is shared: load changes hit both alike);
each figure is the minimum over ``--repeats`` and the ratios new/baseline are printed.

A particle-step is one Boris push, or one adaptive step (accepted or rejected, 6 field evaluations
for Tsit5) of one particle. Besides wall time, each call's process CPU time (all threads) is
recorded: on a machine shared with other jobs, steps per core-second (and its inverse, "ns per
mode evaluation" = core-ns per particle-step × mode) is far steadier than wall time, and on an
idle machine it equals the wall-time rate per core (particles split over one device per core,
``crjax.use_cpu_cores``).

Profile (one device, N/devices particles, tΩ = 20, ns per mode evaluation): ``field`` = B(x)
alone in a loop; ``push`` = a loop of Boris pushes (no diffrax) minus ``field``; ``loop`` =
``backtrack`` with one save time on one device minus the push loop (diffrax's loop, step
bookkeeping, setup and output); ``save`` = four save times minus one.

    python benchmarks/engine.py                                  # full (several minutes)
    python benchmarks/engine.py --quick                          # tΩ = 20 smoke run
    python benchmarks/engine.py --baseline ../baseline          # + same-run A/B vs a checkout of another commit
    python benchmarks/engine.py --peer "cd ../peer && CRPROPA_DATA_PATH=data PYTHONPATH=build \\
        OMP_NUM_THREADS=2 python crpropa_speed.py BP"               # + CRPropa 3 timed in the same run

``--peer CMD`` runs a shell command once per repeat round, interleaved with the crjax cases; it must
print a JSON line with ``particle_steps_per_s`` (e.g. the CRPropa 3 speed script of the project's
baselines, built as described there). The best of its runs replaces the stored CRPropa figure (which
came from another machine of the same kind) in the "vs CRPropa" ratios.

``ensemble_f64``/``ensemble_f32``: the production path, ``run_ensemble`` over one chunk of 4
realisations with the same N directions, tΩ and step (particle-steps counted over all four).

The last line is one JSON object with boris_f64_steps_per_s, boris_f32_steps_per_s,
adaptive_f64_steps_per_s, compile_s (Boris fp64), ns_per_mode_eval_f64 and ns_per_mode_eval_f32
(engine, CPU time per core), the per-core-second rates, the profile, and the baseline's figures
and ratios (wall and CPU time) when ``--baseline`` is given.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
import time

CRPROPA = {"boris_2threads": 5.97e6, "boris_1thread": 3.09e6, "cash_karp": 4.7e5}
ROOT = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ("f64", "f32")


# ---------------------------------------------------------------------------------------------
# worker: compiles the cases once, then times one call per request (JSON lines on stdin/stdout)
# ---------------------------------------------------------------------------------------------
def _worker(args):
    import crjax

    crjax.use_cpu_cores()  # one JAX CPU device per core: particles are split over them
    import jax
    import jax.numpy as jnp
    import numpy as np

    from crjax.field import paper_2015_field, realise_field
    from crjax.solvers import boris_push

    ndev = jax.local_device_count()
    rL, dt, n, modes = 0.1, 0.1 / 20, args.n, args.modes
    t_omega = 20.0 if args.quick else 200.0
    T = t_omega * rL
    times = np.linspace(T / 4, T, 4)  # a few save times, as in real runs
    field = realise_field(jax.random.PRNGKey(0), paper_2015_field(n_modes=modes))
    v = jax.random.normal(jax.random.PRNGKey(1), (n, 3))
    dirs = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
    dtypes = {"f64": jnp.float64, "f32": jnp.float32}

    def cast(tree, dtype):
        def one(leaf):
            if isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating):
                return leaf.astype(dtype)
            return leaf

        return jax.tree_util.tree_map(one, tree)

    cases = {}  # name -> (fn, units of work for the ns figure, particle-steps or None)

    def steps_of(tr):
        return int(np.sum(np.asarray(tr.num_steps, dtype=np.int64)))

    for name, dtype in dtypes.items():
        cases[f"boris_{name}"] = (
            lambda dtype=dtype: crjax.backtrack(field, dirs, times, rL=rL, dt=dt, dtype=dtype),
            None,
        )
    # The production path: run_ensemble over a chunk of 4 realisations, N directions each.
    params = paper_2015_field(n_modes=modes)
    for name, dtype in dtypes.items():
        cases[f"ensemble_{name}"] = (
            lambda dtype=dtype: crjax.run_ensemble(
                params, jax.random.PRNGKey(2), 4, dirs, times, rL=rL, chunk_size=4, dt=dt,
                dtype=dtype),
            None,
        )
    if args.profile:
        m = -(-n // ndev)  # particles per device in the engine
        pushes = 400  # tΩ = 20
        tp = pushes * dt
        for name, dtype in dtypes.items():
            f = cast(field, dtype)
            x = (0.3 * dirs[:m]).astype(dtype)
            p = dirs[:m].astype(dtype)
            prepared = f.prepare if hasattr(f, "prepare") else (lambda f=f: f)
            loop_field = jax.jit(
                lambda f, x: jax.lax.fori_loop(0, pushes, lambda i, y: y + 1e-6 * f(y), x)
            )
            coupling = jnp.asarray(-1.0 / rL, dtype)
            h = jnp.asarray(dt, dtype)
            loop_push = jax.jit(
                lambda f, y, c=coupling, h=h: jax.lax.fori_loop(
                    0, pushes, lambda i, y: boris_push(f, c, h, y), y
                )
            )
            work = pushes * m * modes
            cases[f"prof_field_{name}"] = (
                lambda lf=loop_field, pr=prepared, x=x: lf(pr(), x),
                work,
            )
            cases[f"prof_push_{name}"] = (
                lambda lp=loop_push, pr=prepared, x=x, p=p: lp(pr(), (x, -p)),
                work,
            )
            for label, ts in (("bt1", np.array([tp])), ("bt4", np.linspace(tp / 4, tp, 4))):
                cases[f"prof_{label}_{name}"] = (
                    lambda ts=ts, dtype=dtype, p=p: crjax.backtrack(
                        field, p, ts, rL=rL, dt=dt, dtype=dtype, devices=1
                    ),
                    work,
                )

    out = sys.stdout
    sys.stdout = sys.stderr  # nothing else may write to the protocol stream
    info = {
        "crjax": getattr(crjax, "__version__", "?"),
        "jax": jax.__version__,
        "devices": ndev,
        "path": os.path.dirname(os.path.dirname(os.path.abspath(crjax.__file__))),
        "cases": list(cases),
    }
    out.write(json.dumps(info) + "\n")
    out.flush()
    for line in sys.stdin:
        req = json.loads(line)
        name = req["case"]
        fn, work = cases[name]
        c0, t0 = time.process_time(), time.perf_counter()
        res = jax.block_until_ready(fn())
        sec, cpu = time.perf_counter() - t0, time.process_time() - c0
        reply = {"case": name, "s": sec, "cpu": cpu, "work": work}
        if work is None:
            reply["steps"] = steps_of(res)
        out.write(json.dumps(reply) + "\n")
        out.flush()


class _Worker:
    def __init__(self, label, path, args):
        env = dict(os.environ, PYTHONPATH=str(path))
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--worker"]
        cmd += ["--n", str(args.n), "--modes", str(args.modes)]
        cmd += ["--quick"] * args.quick + ["--no-profile"] * (not args.profile)
        self.label = label
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True
        )
        self.info = json.loads(self.proc.stdout.readline())

    def run(self, case):
        self.proc.stdin.write(json.dumps({"case": case}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died while running {case}")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def _run_peer(cmd: str) -> float:
    """particle-steps/s printed (as JSON ``particle_steps_per_s``) by the peer command ``cmd``."""
    proc = subprocess.run(cmd, shell=True, capture_output=True, text=True)
    for line in reversed(proc.stdout.splitlines()):
        try:
            return float(json.loads(line)["particle_steps_per_s"])
        except (ValueError, KeyError, TypeError):
            continue
    tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    raise RuntimeError(
        f"--peer command printed no JSON line with particle_steps_per_s (exit {proc.returncode}): "
        f"{tail}"
    )


def _ab(workers, cases, repeats, peer=None):
    """First call (compile + run) and the best of ``repeats`` per worker and case, interleaved:
    the minimum wall time ("s") and, separately, the minimum process CPU time ("cpu", all
    threads: core-seconds, robust to other processes' load). With ``peer`` (a command, see
    ``--peer``) it also runs once per repeat round; returns (first, best, the peer's best rate or
    None)."""
    first, best, peer_rate = {}, {}, None
    for case in cases:
        for w in workers:
            t0 = time.perf_counter()
            r = w.run(case)
            first[w.label, case] = time.perf_counter() - t0
            best[w.label, case] = dict(r, s=float("inf"), cpu=float("inf"))
    for _ in range(repeats):
        if peer is not None:
            peer_rate = max(peer_rate or 0.0, _run_peer(peer))
        for case in cases:
            for w in workers:
                r, b = w.run(case), best[w.label, case]
                b["s"], b["cpu"] = min(b["s"], r["s"]), min(b["cpu"], r["cpu"])
    return first, best, peer_rate


def _adaptive_and_design(args):
    """The adaptive-solver rate and the particle-split design check (this code only)."""
    import crjax

    crjax.use_cpu_cores()
    import diffrax
    import jax
    import jax.numpy as jnp
    import numpy as np

    from crjax.field import paper_2015_field, realise_field
    from crjax.solvers import Boris, LorentzTerm

    rL, dt, n = 0.1, 0.1 / 20, args.n
    T = (20.0 if args.quick else 200.0) * rL
    times = np.linspace(T / 4, T, 4)
    field = realise_field(jax.random.PRNGKey(0), paper_2015_field(n_modes=args.modes))
    v = jax.random.normal(jax.random.PRNGKey(1), (n, 3))
    dirs = v / jnp.linalg.norm(v, axis=-1, keepdims=True)

    def timed(fn, repeats):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn())
        first = time.perf_counter() - t0
        best = first if repeats == 0 else np.inf
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = jax.block_until_ready(fn())
            best = min(best, time.perf_counter() - t0)
        return first, best, out

    # The adaptive run is long: compile on a 20x shorter horizon with the same shapes and
    # max_steps (times are traced values, so the compiled code is shared), then time it.
    max_steps = 64 * int(np.ceil(T / dt)) + 4096

    def run(scale=1.0):
        return crjax.backtrack(
            field, dirs, times * scale, rL=rL, dt=dt, max_steps=max_steps, solver="tsit5"
        )

    first_short, short, _ = timed(lambda: run(0.05), 1)
    _, best, tr = timed(run, max(0, args.repeats - 3))  # default: one (compiled) run
    steps = int(np.sum(np.asarray(tr.num_steps, dtype=np.int64)))
    adaptive = steps / best
    print(
        f"adaptive_f64 : {best:8.3f} s for {steps / n:8.0f} steps/particle -> {adaptive:.3e} "
        f"particle-steps/s (Cash-Karp in CRPropa {CRPROPA['cash_karp']:.1e}, ratio "
        f"{adaptive / CRPROPA['cash_karp']:.2f}); compile {first_short - short:.2f} s; "
        f"{adaptive * 6:.3e} field evaluations/s (Tsit5: 6 per step)"
    )

    # design check: the same Boris solver, batched and split / one device / vmap (tΩ = 20)
    tb = 20.0 * rL
    grid = jnp.linspace(0.0, tb, round(tb / dt) + 1)
    coupling = jnp.asarray(-1.0 / rL)

    @jax.jit
    def vmapped(field, p):
        def one(pi):
            sol = diffrax.diffeqsolve(
                LorentzTerm(field, coupling),
                Boris(),
                0.0,
                tb,
                None,
                (jnp.zeros(3), -pi),
                saveat=diffrax.SaveAt(ts=jnp.asarray([tb / 4])),
                stepsize_controller=diffrax.StepTo(ts=grid),
                max_steps=grid.size - 1,
            )
            return sol.ys[0]

        return jax.vmap(one)(p)

    def batched(devices=None):
        return crjax.backtrack(field, dirs, np.array([tb]), rL=rL, dt=dt, devices=devices)

    designs = {
        "split": lambda: batched().positions,
        "one_device": lambda: batched(devices=1).positions,
        "vmap": lambda: vmapped(field, dirs),
    }
    best = dict.fromkeys(designs, np.inf)
    for fn in designs.values():
        jax.block_until_ready(fn())
    for _ in range(args.repeats):
        for name, fn in designs.items():
            t0 = time.perf_counter()
            jax.block_until_ready(fn())
            best[name] = min(best[name], time.perf_counter() - t0)
    rate = {k: n * (grid.size - 1) / v for k, v in best.items()}
    print(
        f"design check, Boris fp64, tΩ = 20 (same run, interleaved): batched state split over "
        f"{jax.local_device_count()} devices {rate['split']:.3e} "
        f"(x{rate['split'] / rate['one_device']:.2f}), one device {rate['one_device']:.3e} (x1), "
        f"vmap of per-particle diffeqsolve {rate['vmap']:.3e} "
        f"(x{rate['vmap'] / rate['one_device']:.2f}) particle-steps/s"
    )
    return adaptive


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tΩ = 20 instead of 200 (smoke run)")
    ap.add_argument("--n", type=int, default=1024, help="particles (default 1024)")
    ap.add_argument("--modes", type=int, default=256, help="field modes (default 256)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats (min is reported)")
    ap.add_argument(
        "--baseline", type=pathlib.Path, default=None, help="checkout to compare with (A/B)"
    )
    ap.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profile")
    ap.add_argument(
        "--no-adaptive",
        dest="adaptive",
        action="store_false",
        help="skip the adaptive solver and the design check",
    )
    ap.add_argument(
        "--peer",
        default=None,
        metavar="CMD",
        help="shell command timed in the same run that prints JSON with particle_steps_per_s "
        "(e.g. CRPropa 3, see the module docstring)",
    )
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return _worker(args)

    def fail(msg):  # one line on stderr, exit 2 (argparse's error() adds the usage block)
        ap.exit(2, f"{ap.prog}: {msg}\n")

    for name in ("n", "modes", "repeats"):
        if getattr(args, name) < 1:
            fail(f"--{name} must be an integer >= 1; got {getattr(args, name)}")
    if args.baseline is not None and not (args.baseline / "crjax" / "__init__.py").is_file():
        fail(f"--baseline must be a checkout of crjax (a folder holding crjax/__init__.py); "
             f"got {args.baseline}")
    if args.peer is not None and not args.peer.strip():
        fail("--peer must be a non-empty shell command")

    workers = [_Worker("new", ROOT, args)]
    if args.baseline is not None:
        workers.append(_Worker("baseline", args.baseline.resolve(), args))
    for w in workers:
        print(
            f"{w.label}: crjax {w.info['crjax']} from {w.info['path']}, jax {w.info['jax']}, "
            f"{w.info['devices']} devices"
        )
    t_omega = 20.0 if args.quick else 200.0
    print(
        f"N = {args.n} particles, {args.modes} modes, rL = 0.1, tΩ = {t_omega:g}, dt = rL/20, "
        f"4 save times; min of {args.repeats} interleaved repeats; cpu_count {os.cpu_count()}"
    )
    cases = [f"boris_{d}" for d in DTYPES] + [f"ensemble_{d}" for d in DTYPES]
    if args.profile:
        cases += [f"prof_{p}_{d}" for d in DTYPES for p in ("field", "push", "bt1", "bt4")]
    try:
        first, best, peer = _ab(workers, cases, args.repeats, peer=args.peer)
    except RuntimeError as err:
        fail(str(err))
    finally:
        for w in workers:
            w.close()
    crpropa, crpropa_src = (
        (peer, "same run") if peer else (CRPROPA["boris_2threads"], "issue 12's figure")
    )
    if peer:
        print(f"peer (--peer, best of {args.repeats}, same run): {peer:.3e} particle-steps/s")

    rates, cpu_rates, ns, compile_s = {}, {}, {}, {}
    for w in workers:
        for d in DTYPES:
            r = best[w.label, f"boris_{d}"]
            rates[w.label, d] = r["steps"] / r["s"]
            cpu_rates[w.label, d] = r["steps"] / r["cpu"]  # per core-second
            ns[w.label, d] = r["cpu"] / r["steps"] * 1e9 / args.modes
            compile_s[w.label, d] = first[w.label, f"boris_{d}"] - r["s"]
    for d in DTYPES:
        for w in workers:
            lab = w.label
            print(
                f"boris_{d} {lab:8s}: {rates[lab, d]:.3e} particle-steps/s (wall; vs CRPropa 2 "
                f"threads, {crpropa_src}: {rates[lab, d] / crpropa:.2f}x), "
                f"{cpu_rates[lab, d]:.3e} per core-second (CPU time) = {ns[lab, d]:.3f} ns per "
                f"mode evaluation per core; compile {compile_s[lab, d]:.1f} s"
            )
        if len(workers) > 1:
            print(
                f"boris_{d} new/baseline (same run): x{rates['new', d] / rates['baseline', d]:.3f} "
                f"wall, x{cpu_rates['new', d] / cpu_rates['baseline', d]:.3f} CPU time"
            )

    ens = {}
    for d in DTYPES:
        for w in workers:
            r = best[w.label, f"ensemble_{d}"]
            ens[w.label, d] = r["steps"] / r["s"]
            print(f"ensemble_{d} {w.label:8s}: {ens[w.label, d]:.3e} particle-steps/s (wall; "
                  f"run_ensemble, 4 realisations x {args.n} directions), "
                  f"{r['steps'] / r['cpu']:.3e} per core-second")
        if len(workers) > 1:
            print(f"ensemble_{d} new/baseline (same run): x{ens['new', d] / ens['baseline', d]:.3f}"
                  " wall")

    profile = {}
    if args.profile:
        print(
            "profile, ns per mode evaluation (CPU time), one device, N/devices particles, tΩ = 20:"
        )
        print(
            f"  {'':10s} {'':4s} {'field':>7s} {'push':>7s} {'loop':>7s} {'save':>7s} {'total':>7s}"
        )
        for w in workers:
            for d in DTYPES:
                t = {p: best[w.label, f"prof_{p}_{d}"] for p in ("field", "push", "bt1", "bt4")}
                e = {p: 1e9 * r["cpu"] / r["work"] for p, r in t.items()}
                row = {
                    "field": e["field"],
                    "push": e["push"] - e["field"],
                    "loop": e["bt1"] - e["push"],
                    "save": e["bt4"] - e["bt1"],
                    "total": e["bt4"],
                }
                profile[f"{w.label}_{d}"] = row
                print(f"  {w.label:10s} {d:4s} " + " ".join(f"{v:7.3f}" for v in row.values()))

    adaptive = _adaptive_and_design(args) if args.adaptive else float("nan")
    summary = {
        "boris_f64_steps_per_s": rates["new", "f64"],
        "boris_f32_steps_per_s": rates["new", "f32"],
        "adaptive_f64_steps_per_s": adaptive,
        "compile_s": compile_s["new", "f64"],
        "ns_per_mode_eval_f64": ns["new", "f64"],
        "ns_per_mode_eval_f32": ns["new", "f32"],
    }
    for d in DTYPES:
        summary[f"boris_{d}_steps_per_core_s"] = cpu_rates["new", d]
        summary[f"ensemble_{d}_steps_per_s"] = ens["new", d]
    if peer:
        summary["peer_steps_per_s"] = peer
        for w in workers:
            pre = "" if w.label == "new" else "baseline_"
            for d in DTYPES:
                summary[f"{pre}boris_{d}_vs_peer"] = rates[w.label, d] / peer
    if len(workers) > 1:
        for d in DTYPES:
            summary[f"baseline_boris_{d}_steps_per_s"] = rates["baseline", d]
            summary[f"baseline_boris_{d}_steps_per_core_s"] = cpu_rates["baseline", d]
            summary[f"baseline_ns_per_mode_eval_{d}"] = ns["baseline", d]
            summary[f"ratio_boris_{d}"] = rates["new", d] / rates["baseline", d]
            summary[f"ratio_boris_{d}_cpu"] = cpu_rates["new", d] / cpu_rates["baseline", d]
            summary[f"baseline_ensemble_{d}_steps_per_s"] = ens["baseline", d]
            summary[f"ratio_ensemble_{d}"] = ens["new", d] / ens["baseline", d]
    if profile:
        summary["profile_ns_per_mode_eval"] = {
            k: {kk: round(vv, 4) for kk, vv in v.items()} for k, v in profile.items()
        }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
