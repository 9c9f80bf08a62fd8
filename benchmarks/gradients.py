"""Gradient estimators for ensemble spectra: cost, reverse-mode memory, and the estimator study.

    python benchmarks/gradients.py            # one JSON line: grad_over_forward, reverse_peak_mb
    python benchmarks/gradients.py study OUT [--nside 8]   # the estimator x horizon study (docs/gradients.md)
    python benchmarks/gradients.py pathwise OUT [--nside 8]
    python benchmarks/gradients.py analyse OUT

The default run measures, interleaved with the forward run (A/B/A/B, the machine is shared), the
cost of each estimator of d<Ĉ_ℓ>/dθ relative to one forward realisation, and the peak memory of a
checkpointed reverse-mode gradient (diffrax RecursiveCheckpointAdjoint) at tΩ = 200 for one
realisation, read from XLA's compiled memory analysis (temp + argument + output bytes).
The study writes one .npz per ensemble under OUT (skipped when present: resumable).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import crjax
from crjax import gradients as G

RL0, SIGMA2_0, GAMMA0 = 0.1, 1.0, 11.0 / 3.0
DT = RL0 / 20
T_OMEGA = (10.0, 50.0, 200.0)


def _params(n_modes):
    return crjax.FieldParams(n_modes=n_modes)


def _forward_and_reverse(n_modes, nside, t_omega):
    """(forward, reverse-mode, forward-mode seconds, reverse peak MB) for one realisation."""
    import diffrax

    p = _params(n_modes)
    times = jnp.asarray([t_omega * RL0])
    directions = crjax.healpix_directions(nside)
    key = jax.random.PRNGKey(0)

    def loss(sigma2, adjoint):
        field = G.realise_gaussian_field(key, crjax.FieldParams(sigma2=sigma2, n_modes=n_modes))
        tr = crjax.backtrack(field, directions, times, rL=RL0, dt=DT, adjoint=adjoint, devices=1)
        f, _ = G.spectrum_statistic(tr.positions, tr.velocities, jnp.asarray([0.0, 0.0, 1.0]), 6)
        return jnp.sum(f[..., 1:])

    fwd = jax.jit(lambda s: loss(s, diffrax.RecursiveCheckpointAdjoint()))
    rev = jax.jit(jax.grad(lambda s: loss(s, diffrax.RecursiveCheckpointAdjoint())))
    jvp = jax.jit(lambda s: jax.jvp(lambda u: loss(u, diffrax.ForwardMode()), (s,), (1.0 * s,)))
    mem = rev.lower(jnp.asarray(SIGMA2_0)).compile().memory_analysis()
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes) / 2**20
    x = jnp.asarray(SIGMA2_0)
    fwd(x).block_until_ready()
    rev(x).block_until_ready()
    jax.block_until_ready(jvp(x))
    tf, tr_, tj = [], [], []
    for _ in range(3):  # interleaved A/B/C
        t0 = time.perf_counter()
        fwd(x).block_until_ready()
        tf.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        rev(x).block_until_ready()
        tr_.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        jax.block_until_ready(jvp(x))
        tj.append(time.perf_counter() - t0)
    del p
    return float(np.median(tf)), float(np.median(tr_)), float(np.median(tj)), float(peak)


def benchmark(n_modes=64, nside=4):
    tf, trev, tjvp, peak = _forward_and_reverse(n_modes, nside, 200.0)
    out = {
        "nside": nside,
        "n_modes": n_modes,
        "t_omega": 200.0,
        # score function / rescaled rL: one forward run per sample plus a jvp of the spectrum and
        # the O(n_modes) score: 1.0 up to the measured overhead (docs/gradients.md)
        "grad_over_forward": {
            "score_function": 1.0,
            "central_fd_crn": 2.0,
            "reverse_mode_pathwise": trev / tf,
            "forward_mode_pathwise_per_parameter": tjvp / tf,
        },
        "forward_s": tf,
        "reverse_s": trev,
        "reverse_peak_mb": peak,
    }
    print(json.dumps(out))


# ----------------------------------------------------------------------------------------------
# the study


def _save(path, sample, seconds):
    np.savez(path, f=np.asarray(sample.f), dfdT=np.asarray(sample.dfdT),
             score=np.asarray(sample.score), times=np.asarray(sample.times),
             names=np.asarray(sample.names), seconds=seconds)


def _ensemble(out, name, params, key, n, nside, rL, names):
    path = out / f"{name}.npz"
    if path.exists():
        return
    times = jnp.asarray(T_OMEGA) * RL0
    t0 = time.perf_counter()
    s = G.ensemble_sample(params, key, n, nside, times, rL=rL, dt=DT, names=names, chunk_size=16)
    jax.block_until_ready(s.f)
    _save(path, s, time.perf_counter() - t0)
    print(f"{name}: {n} realisations in {time.perf_counter() - t0:.1f} s", flush=True)


def study(out, nside=4, n_modes=64, n_central=512, n_fd=256, n_extra=128):
    import equinox as eqx

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    p0 = _params(n_modes)
    kc, kf = jax.random.PRNGKey(101), jax.random.PRNGKey(202)
    names = ("sigma2", "rL", "gamma", "Lc")
    _ensemble(out, "central", p0, kc, n_central, nside, RL0, names)
    for h in (0.1,):
        for sgn, tag in ((1, "p"), (-1, "m")):
            ps = eqx.tree_at(lambda p: p.sigma2, p0, SIGMA2_0 * (1 + sgn * h))
            _ensemble(out, f"fd_sigma2_{h}_{tag}", ps, kf, n_fd, nside, RL0, names)
        for sgn, tag in ((1, "p"), (-1, "m")):
            _ensemble(out, f"fd_rL_{h}_{tag}", p0, kf, n_fd, nside, RL0 * (1 + sgn * h), names)
    for sgn, tag in ((1, "p"), (-1, "m")):
        pg = eqx.tree_at(lambda p: p.spectrum.gamma, p0, GAMMA0 + sgn * 0.2)
        _ensemble(out, f"fd_gamma_0.2_{tag}", pg, kf, n_extra, nside, RL0, names)
    h = 0.2
    for sgn, tag in ((1, "p"), (-1, "m")):
        ps = eqx.tree_at(lambda p: p.sigma2, p0, SIGMA2_0 * (1 + sgn * h))
        _ensemble(out, f"fd_sigma2_{h}_{tag}", ps, kf, n_extra, nside, RL0, names)
    for sgn, tag in ((1, "p"), (-1, "m")):
        _ensemble(out, f"fd_rL_{h}_{tag}", p0, kf, n_extra, nside, RL0 * (1 + sgn * h), names)


def pathwise_study(out, nside=4, n_modes=64, n=32, window_omega=10.0):
    """Pathwise AD (all horizons) and truncated pathwise (last window) samples, vmapped over keys."""
    out = Path(out)
    p0 = _params(n_modes)
    keys = jax.random.split(jax.random.PRNGKey(303), n)
    path = out / "pathwise.npz"
    if not path.exists():
        times = jnp.asarray(T_OMEGA) * RL0
        fn = jax.jit(jax.vmap(lambda k: G.pathwise_gradient(p0, k, nside, times, rL=RL0, dt=DT)))
        t0 = time.perf_counter()
        f, d = fn(keys)
        jax.block_until_ready(d)
        np.savez(path, f=np.asarray(f), d=np.asarray(d), seconds=time.perf_counter() - t0)
        print(f"pathwise: {n} in {time.perf_counter() - t0:.1f} s", flush=True)
    for t_omega in T_OMEGA[1:]:
        path = out / f"truncated_{t_omega:g}.npz"
        if path.exists():
            continue
        fn = jax.jit(jax.vmap(lambda k, t=t_omega: G.truncated_pathwise_gradient(
            p0, k, nside, t * RL0, window_omega * RL0, rL=RL0, dt=DT)))
        t0 = time.perf_counter()
        f, d = fn(keys)
        jax.block_until_ready(d)
        np.savez(path, f=np.asarray(f), d=np.asarray(d), seconds=time.perf_counter() - t0)
        print(f"truncated {t_omega}: {n} in {time.perf_counter() - t0:.1f} s", flush=True)


# ----------------------------------------------------------------------------------------------
# analysis of the study's files -> the tables of docs/gradients.md


def _load(out, name):
    d = np.load(Path(out) / f"{name}.npz")
    return G.EnsembleSample(jnp.asarray(d["f"]), jnp.asarray(d["dfdT"]), jnp.asarray(d["score"]),
                            jnp.asarray(d["times"]), float(RL0 if "rL" not in name else 0),
                            tuple(str(n) for n in d["names"])), float(d["seconds"])


def _stats(x):
    x = np.asarray(x)
    return x.mean(0), x.std(0, ddof=1), len(x)


def analyse(out, ells=range(1, 7)):
    """Print (markdown) and return the estimator x horizon comparison from the study files."""
    out = Path(out)
    ells = list(ells)
    central, t_central = _load(out, "central")
    central = eqx_replace_rl(central, RL0)
    config = Path(out, "config.json")
    nside = json.loads(config.read_text())["nside"] if config.exists() else None
    res = {"nside": nside, "n_central": int(central.f.shape[0]), "rows": []}
    fd_ref = {}
    for name, h, est_fn in (("sigma2", 0.1 * SIGMA2_0, lambda s: G.score_function_gradient(s, "sigma2")),
                            ("rL", 0.1 * RL0, G.rescaled_rl_gradient),
                            ("gamma", 0.2, lambda s: G.score_function_gradient(s, "gamma"))):
        hh = 0.1 if name != "gamma" else 0.2
        try:
            plus, _ = _load(out, f"fd_{name}_{hh}_p")
            minus, _ = _load(out, f"fd_{name}_{hh}_m")
        except FileNotFoundError:
            continue
        fd = np.asarray(G.central_difference(plus, minus, h))[..., ells]
        m_fd, s_fd, n_fd = _stats(fd)
        s_ind = np.sqrt(np.asarray(plus.f).var(0, ddof=1) + np.asarray(minus.f).var(0, ddof=1))[..., ells] / (2 * h)
        fd_ref[name] = (m_fd, s_fd / np.sqrt(n_fd))
        est = np.asarray(est_fn(central))[..., ells]
        m_e, s_e, n_e = _stats(est)
        f_mean, f_sd, _ = _stats(np.asarray(central.f)[..., ells])
        for ti, tw in enumerate(T_OMEGA):
            z = (m_e[ti] - m_fd[ti]) / np.sqrt(s_e[ti] ** 2 / n_e + s_fd[ti] ** 2 / n_fd)
            row = {
                "theta": name, "t_omega": tw, "estimator": "score" if name != "rL" else "rescaled",
                "grad": m_e[ti].tolist(), "grad_se": (s_e[ti] / np.sqrt(n_e)).tolist(),
                "fd": m_fd[ti].tolist(), "fd_se": (s_fd[ti] / np.sqrt(n_fd)).tolist(),
                "z": z.tolist(),
                "sd_per_sample_est": s_e[ti].tolist(), "sd_per_pair_fd_crn": s_fd[ti].tolist(),
                "sd_per_pair_fd_indep": s_ind[ti].tolist(),
                # variance at equal cost: estimator 1 run per sample, FD 2 runs per pair
                "var_ratio_equal_cost": (s_e[ti] ** 2 / (2 * s_fd[ti] ** 2)).tolist(),
                "crn_gain": (s_ind[ti] ** 2 / s_fd[ti] ** 2).tolist(),
                "n_for_20pct_mean": ((f_sd[ti] / (0.2 * np.abs(f_mean[ti]))) ** 2).tolist(),
                "n_for_20pct_grad_est": ((s_e[ti] / (0.2 * np.abs(m_fd[ti]))) ** 2).tolist(),
                "n_for_20pct_grad_fd_runs": (2 * (s_fd[ti] / (0.2 * np.abs(m_fd[ti]))) ** 2).tolist(),
            }
            res["rows"].append(row)
    for name in ("sigma2", "rL"):  # FD step-size check: h = 0.2 against h = 0.1
        try:
            plus, _ = _load(out, f"fd_{name}_0.2_p")
            minus, _ = _load(out, f"fd_{name}_0.2_m")
        except FileNotFoundError:
            continue
        h = 0.2 * (SIGMA2_0 if name == "sigma2" else RL0)
        fd2 = np.asarray(G.central_difference(plus, minus, h))[..., ells]
        m2, s2, n2 = _stats(fd2)
        m1, se1 = fd_ref[name]
        res[f"fd_step_check_{name}"] = ((m2 - m1) / np.sqrt(s2**2 / n2 + se1**2)).tolist()
    for p in ("pathwise", "truncated_50", "truncated_200"):
        path = out / f"{p}.npz"
        if not path.exists():
            continue
        d = np.load(path)
        dd = np.asarray(d["d"])  # pathwise: (n, ntimes, L, 2); truncated: (n, L, 2)
        if p == "pathwise":
            dd = dd[:, :, ells, :]
        else:
            dd = dd[:, None, ells, :]
        res[p] = {"mean": dd.mean(0).tolist(), "sd": dd.std(0, ddof=1).tolist(), "n": len(dd),
                  "seconds": float(d["seconds"])}
        for k, name in enumerate(("sigma2", "rL")):
            m_fd, se_fd = fd_ref[name]
            tis = range(3) if p == "pathwise" else [1 if p == "truncated_50" else 2]
            for j, ti in enumerate(tis):
                m = dd[:, j, :, k].mean(0)
                se = dd[:, j, :, k].std(0, ddof=1) / np.sqrt(len(dd))
                res["rows"].append({
                    "theta": name, "t_omega": T_OMEGA[ti], "estimator": p.split("_")[0],
                    "grad": m.tolist(), "grad_se": se.tolist(), "fd": m_fd[ti].tolist(),
                    "fd_se": se_fd[ti].tolist(),
                    "z": ((m - m_fd[ti]) / np.sqrt(se**2 + se_fd[ti] ** 2)).tolist(),
                    "sd_per_sample_est": dd[:, j, :, k].std(0, ddof=1).tolist(),
                })
    res["central_seconds_per_realisation"] = t_central / central.f.shape[0]
    return res


def eqx_replace_rl(sample, rl):
    return G.EnsembleSample(sample.f, sample.dfdT, sample.score, sample.times, rl, sample.names)


def print_tables(res):
    def fmt(v):
        return " ".join(f"{x:.3g}" for x in v)

    for r in res["rows"]:
        line = (f"| {r['theta']} | {r['t_omega']:g} | {r['estimator']} | max|z| {max(abs(x) for x in r['z']):.2f} "
                f"| z: {fmt(r['z'])} | grad: {fmt(r['grad'])} | fd: {fmt(r['fd'])} "
                f"| sd/sample: {fmt(r['sd_per_sample_est'])}")
        if "var_ratio_equal_cost" in r:
            line += (f" | sd/pair CRN: {fmt(r['sd_per_pair_fd_crn'])} | var ratio: {fmt(r['var_ratio_equal_cost'])}"
                     f" | CRN gain: {fmt(r['crn_gain'])} | N20 mean: {fmt(r['n_for_20pct_mean'])}"
                     f" | N20 est: {fmt(r['n_for_20pct_grad_est'])} | N20 FD runs: {fmt(r['n_for_20pct_grad_fd_runs'])}")
        print(line + " |")
    for k in ("fd_step_check_sigma2", "fd_step_check_rL"):
        if k in res:
            print(k, np.round(np.asarray(res[k]), 2).tolist())


def _check_config(out, config):
    """Record the study's sizes in OUT/config.json; refuse to mix ensembles of different sizes."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "config.json"
    if path.exists():
        old = json.loads(path.read_text())
        clash = {k: (old[k], v) for k, v in config.items() if k in old and old[k] != v}
        if clash:
            raise SystemExit(f"{out} holds a study with other sizes {clash}; use another OUT")
        config = {**old, **config}
    path.write_text(json.dumps(config))


def _main(argv):
    import argparse

    ap = argparse.ArgumentParser(prog="benchmarks/gradients.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd")
    st = sub.add_parser("study", help="the estimator ensembles (resumable)")
    pw = sub.add_parser("pathwise", help="pathwise and truncated-pathwise samples (resumable)")
    an = sub.add_parser("analyse", help="print the tables, write OUT/analysis.json")
    for q in (st, pw, an):
        q.add_argument("out")
    for q in (st, pw):
        q.add_argument("--nside", type=int, default=4)
    st.add_argument("--n-central", type=int, default=512)
    st.add_argument("--n-fd", type=int, default=256)
    st.add_argument("--n-extra", type=int, default=128)
    pw.add_argument("--n", type=int, default=32)
    a = ap.parse_args(argv)

    def fail(msg):  # one line on stderr, exit 2 (argparse's error() adds the usage block)
        ap.exit(2, f"{ap.prog}: {msg}\n")

    if a.cmd in ("study", "pathwise"):
        from crjax._checks import check_nside

        try:
            check_nside(a.nside)
        except ValueError as e:
            fail(str(e))
        sizes = ({"n_central": a.n_central, "n_fd": a.n_fd, "n_extra": a.n_extra}
                 if a.cmd == "study" else {"n_pathwise": a.n})
        for k, v in sizes.items():
            if v < 2:
                fail(f"{k} must be >= 2; got {v}")
        crjax.use_cpu_cores(2)
        _check_config(a.out, {"nside": a.nside, **sizes})
    if a.cmd == "study":
        study(a.out, nside=a.nside, n_central=a.n_central, n_fd=a.n_fd, n_extra=a.n_extra)
    elif a.cmd == "pathwise":
        pathwise_study(a.out, nside=a.nside, n=a.n)
    elif a.cmd == "analyse":
        r = analyse(a.out)
        Path(a.out, "analysis.json").write_text(json.dumps(r))
        print_tables(r)
    else:
        benchmark()


if __name__ == "__main__":
    _main(sys.argv[1:])
