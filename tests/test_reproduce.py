"""The main job (``inference.pipeline`` over ``crjax.runs``): presets, statistics helpers, figures,
and the pipeline end to end at tiny size (checked against an independent recomputation with
crjax.backtrack + healpy + numpy; resumption after a lost chunk and after a real ``kill -9``)."""

import json
import os
import signal
import subprocess
import sys
import time

import healpy as hp
import numpy as np
import pytest

from crjax import plot, presets, runs
from crjax.results import RunStore, read_params, read_results, read_summary
from inference import pipeline as rp

# ----------------------------------------------------------------------------------------------
# presets


def test_paper_preset_is_the_seed_setup():
    p = presets.paper()
    # Seed §3: nside 32 (12288 trajectories), 120 realisations, σ² = 1, λ 0.01–100 Lc,
    # γ = 11/3, rL = 0.1 Lc; Fig. 2 runs to tΩ = 1000. 256 modes: docs/physics.md §2 default.
    assert (p.nside, p.npix, p.n_realisations) == (32, 12288, 120)
    assert (p.sigma2, p.lambda_min, p.lambda_max, p.rL, p.n_modes) == (1.0, 0.01, 100.0, 0.1, 256)
    assert p.gamma == pytest.approx(11 / 3, rel=1e-15)
    assert max(p.t_omega) == pytest.approx(1000.0)
    np.testing.assert_allclose(p.times, np.asarray(p.t_omega) * 0.1)
    # float32 engine: validated against float64 on the same realisations (benchmarks/precision.py)
    assert p.dtype == "float32"
    q = presets.quick()
    assert (q.sigma2, q.lambda_min, q.lambda_max, q.rL, q.gamma) == (
        p.sigma2, p.lambda_min, p.lambda_max, p.rL, p.gamma)
    assert q.t_omega[0] == pytest.approx(1.0) and q.t_omega[-1] == pytest.approx(200.0)


def test_preset_roundtrips_through_params_json():
    p = presets.quick()
    q = presets.Preset.from_dict(json.loads(json.dumps(p.to_dict())))
    assert q == p
    fp = p.field_params()
    assert fp.n_modes == p.n_modes and float(fp.sigma2) == p.sigma2
    assert (float(fp.lmin), float(fp.lmax)) == (p.lambda_min, p.lambda_max)


def test_params_json_of_earlier_versions_stays_readable(tmp_path):
    """Runs written before the rename (wavelengths as lmin/lmax) are read and resumed."""
    p = presets.tiny()
    old = runs.run_params(p)
    old["lmin"], old["lmax"] = old.pop("lambda_min"), old.pop("lambda_max")
    assert presets.Preset.from_dict(old) == p
    RunStore.open(tmp_path, old)  # an old run directory
    RunStore.open(tmp_path, runs.run_params(p), upgrade=runs._upgrade_params)  # resumes it
    with pytest.raises(ValueError, match="lambda_max"):
        RunStore.open(tmp_path, runs.run_params(p.replace(lambda_max=50.0)),
                      upgrade=runs._upgrade_params)


@pytest.mark.parametrize(
    "change, match",
    [
        ({"nside": 6}, "nside"),
        ({"n_realisations": 1}, "n_realisations"),
        ({"rL": -0.1}, "rL"),
        ({"lambda_min": 200.0}, "lambda_min"),
        ({"sigma2": 0.0}, "sigma2"),
        ({"b0_direction": (0.0, 0.0, 0.0)}, "b0_direction"),
        ({"seed": -1}, "seed"),
        ({"ell_max": 40}, "ell_max"),
        ({"fig3_t_omega": (1.0, 2.0, 3.0)}, "fig3_t_omega"),
        ({"t_omega": (2.0, 1.0, 4.0, 8.0)}, "t_omega"),
        ({"solver": "euler"}, "solver"),
        ({"dtype": "float16"}, "dtype"),
        ({"sigma2": float("nan")}, "sigma2"),
    ],
)
def test_preset_rejects_bad_values(change, match):
    with pytest.raises(ValueError, match=match):
        presets.tiny().replace(**change)
    with pytest.raises(ValueError, match="preset must be one of"):
        presets.get_preset("huge")


def test_gradient_directions_parallel_and_perpendicular():
    p = presets.tiny().replace(b0_direction=(1.0, 2.0, 2.0), grad=0.5)
    g_par, g_perp = runs.gradient_directions(p)
    b = np.array([1.0, 2.0, 2.0]) / 3.0
    np.testing.assert_allclose(g_par, 0.5 * b, rtol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(g_perp), 0.5, rtol=1e-15)
    assert abs(g_perp @ b) < 1e-15


# ----------------------------------------------------------------------------------------------
# statistics helpers


def test_ratio_error_agrees_with_bootstrap():
    """Delta-method error of Ĉ_ℓ/Ĉ_1 vs an independent bootstrap over realisations."""
    rng = np.random.default_rng(1)
    n = 400
    common = rng.gamma(4.0, 1.0, size=(n, 1, 1))  # correlates all ℓ within a realisation
    cls = common * np.array([2.0, 10.0, 3.0, 1.0]) * rng.gamma(8.0, 1 / 8, size=(n, 1, 4))
    noise = np.array([0.5])
    r, err = rp._ratio_and_error(cls, noise)
    boot = []
    for _ in range(2000):
        c = cls[rng.integers(0, n, n)]
        chat = c.mean(0) - noise[:, None]
        boot.append(chat / chat[:, 1:2])
    boot_err = np.std(boot, axis=0)
    # Bootstrap std from 2000 resamples has ~1.6% statistical error; the delta method is exact
    # to O(1/n) = 0.25%: 8% covers both with margin.
    np.testing.assert_allclose(err[0, [0, 2, 3]], boot_err[0, [0, 2, 3]], rtol=0.08)
    assert err[0, 1] == 0.0 and r[0, 1] == 1.0  # Ĉ_1/Ĉ_1 has no error


def test_full_covariance_fit_recovers_p_of_correlated_samples():
    """Per-realisation estimates drawn around A·BGK(ℓ, p = 1/2) with errors correlated across ℓ
    (a common per-realisation factor, as the dipole's scatter makes them): the pipeline's fit on
    their covariance recovers p within 3σ and reports χ², the p-value and the ℓ-range table."""
    from crjax.theory import bgk_spectrum

    rng = np.random.default_rng(3)
    n, ell_hi = 60, 9
    shape = np.concatenate([[1.0], np.asarray(bgk_spectrum(np.arange(1, ell_hi + 1), 0.5))])
    common = 1 + 0.2 * rng.standard_normal((n, 1))
    samples = 2.0 * shape * common * (1 + 0.1 * rng.standard_normal((n, ell_hi + 1)))
    out = rp._fit_covariance(samples, ell_hi)
    b = out["bgk"]
    lo, hi = b["p_interval_68"]
    assert lo <= b["p"] <= hi
    # 3σ: a 0.3% event for a correct fit (the draw is fixed: this never flickers)
    assert abs(b["p"] - 0.5) < 3 * max(b["p"] - lo, hi - b["p"])
    assert 0 <= b["pvalue"] <= 1 and b["dof"] == ell_hi - 2
    assert [row["lmax"] for row in out["by_lmax"]] == list(range(4, ell_hi + 1))
    assert "skipped" in rp._fit_covariance(samples[:5], ell_hi)  # too few for Hartlap


def test_convergence_criterion_detects_drift():
    t = np.array([1.0, 10.0, 50.0, 100.0])
    err = np.full((4, 10), 0.01)
    flat = np.tile(1.0 / np.arange(1, 11) ** 2, (4, 1))
    rng = np.random.default_rng(0)
    noisy = flat + 0.01 * rng.standard_normal(flat.shape)
    c = rp._convergence(t, noisy, err, 9)
    assert c["converged"] and c["t_omega_compared"] == [50.0, 100.0] and c["dof"] == 8
    drift = noisy.copy()
    drift[-1, 2:] += 0.05  # 5σ per multipole
    assert not rp._convergence(t, drift, err, 9)["converged"]
    assert not rp._convergence(np.array([1.0]), flat[:1], err[:1], 9)["converged"]


# ----------------------------------------------------------------------------------------------
# figures (drawing only)


def test_arrival_map_is_the_antipodal_map():
    nside = 4
    n = np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside))), axis=-1)
    a = np.array([0.3, -0.5, 0.8])
    dipole = n @ a  # δI(p̂) = p̂·a  →  at arrival direction n̂ = −p̂:  −n̂·a
    np.testing.assert_allclose(plot.arrival_map(dipole), -dipole, atol=1e-15)
    m = np.random.default_rng(0).standard_normal(n.shape[0])
    np.testing.assert_array_equal(plot.arrival_map(plot.arrival_map(m)), m)


def test_figures_draw_from_synthetic_arrays(tmp_path):
    t = np.geomspace(1, 100, 6)
    cl = np.outer(t, np.arange(1.0, 11.0))
    cl[2, 3] = -1.0  # negative Ĉ_ℓ after noise subtraction must not break log axes
    figs = {
        "f2": plot.fig2(t, cl, cl / 2, t, t / 2, t / 3, t / 4),
        "f3": plot.fig3(np.arange(1, 10), [1, 10, 100], np.ones((3, 9)), np.ones((3, 9)) / 10,
                        np.ones((3, 9)), np.ones((3, 9)) / 10,
                        {"x": (np.arange(1, 10), np.ones(9))},
                        noise_par=[0.1, 0.2, 0.3], noise_perp=[0.1, 0.2, 0.3]),
        "sky": plot.skymap(np.arange(48.0), title="test"),
    }
    for name, f in figs.items():
        f.savefig(tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 5000
    assert "arrival direction" in figs["sky"].axes[0].get_title()


# ----------------------------------------------------------------------------------------------
# end to end at tiny size (shares one in-process run: one compilation)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_run")
    summary = rp.reproduce("tiny", out, progress=False)
    return out, summary


def test_tiny_run_writes_everything(tiny_run):
    out, _ = tiny_run
    for f in ("params.json", "results.npz", "summary.json", "fig2.png", "fig3.png", "skymap.png",
              "chunk_00000.npz", "chunk_00001.npz"):
        assert (out / f).stat().st_size > 0, f
    s = read_summary(out)
    for k in ("K_par", "K_perp", "p_best", "p_interval", "converged", "nside", "realizations",
              "wall_s"):
        assert k in s, k
    assert s["nside"] == 2 and s["realizations"] == 3 and isinstance(s["converged"], bool)
    for side in ("par", "perp"):  # χ², its p-value and the ℓ-range table, per direction
        assert s[f"chi2_{side}"] >= 0 and 0 <= s[f"pvalue_{side}"] <= 1
        assert isinstance(s[f"p_by_lmax_{side}"], list)
        # 3 realisations cannot carry a 5-multipole covariance: skipped, with the reason
        assert "Hartlap" in s[f"fit_covariance_{side}"]["skipped"]
    lo, hi = s["p_interval"]
    assert 0 <= lo <= s["p_best"] <= hi <= 1  # tiny data: p may sit at a bound, still ordered
    from inference.data import load_spectrum

    spec = load_spectrum(out / "simulated_spectrum_par.txt")  # what `crjax fit` reads
    r = read_results(out)
    np.testing.assert_array_equal(spec.cl, r["chat_par"][-1, 1 : presets.tiny().fit_ell_max + 1])
    assert spec.synthetic and spec.noise_subtracted
    prov = read_params(out)["provenance"]
    assert prov["backend"] and prov["versions"]["jax"] and read_params(out)["params"]["dtype"]


@pytest.fixture(scope="module")
def independent_positions():
    """r(−T; p̂) of every realisation of the tiny preset, computed without the pipeline: one
    ``crjax.backtrack`` per realisation with the documented key fold_in(PRNGKey(seed), r)."""
    import jax

    from crjax import backtrack, healpix_directions, realise_field

    p = presets.tiny()
    key = jax.random.PRNGKey(p.seed)
    dirs = healpix_directions(p.nside)
    pos = [np.asarray(backtrack(realise_field(jax.random.fold_in(key, r), p.field_params()),
                                dirs, p.times, rL=p.rL).positions)
           for r in range(p.n_realisations)]
    return np.stack(pos)  # (n, nt, npix, 3)


def test_tiny_run_matches_an_independent_recomputation(tiny_run, independent_positions):
    """Every array of results.npz against numpy/healpy on positions from crjax.backtrack (not
    run_ensemble, not the pipeline's reducer or estimators). Tolerance: the two engines' paths
    (vmap over realisations and devices vs one call) differ by round-off in the positions, which
    the short horizon (tΩ ≤ 8, λ_L·T ≲ 1) does not amplify: 1e-9 relative leaves 10⁶ of margin
    over fp64 round-off and still catches any wrong factor, index or average."""
    out, _ = tiny_run
    r = read_results(out)
    p = presets.tiny()
    x = independent_positions
    n, nt, npix, _ = x.shape
    T = p.times
    g_par, g_perp = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])  # B0 ∥ ẑ, |g| = 1
    rtol = 1e-9
    # K_ij(T) = ⟨r_i r_j⟩/(2T) over directions and realisations (docs/physics.md §1).
    K = np.einsum("rtpi,rtpj->tij", x, x) / (n * npix) / (2 * T[:, None, None])
    np.testing.assert_allclose(r["K"], K, rtol=rtol)
    np.testing.assert_allclose(r["K_par"], K[:, 2, 2], rtol=rtol)
    np.testing.assert_allclose(r["K_perp"], (K[:, 0, 0] + K[:, 1, 1]) / 2, rtol=rtol)
    # K̃ (2.4): all N² ordered direction pairs, written out as a pair sum.
    d = x[:, :, :, None, :] - x[:, :, None, :, :]  # (n, nt, npix, npix, 3)
    Kt = np.einsum("rtabi,rtabj->tij", d, d) / (n * npix**2) / (4 * T[:, None, None])
    np.testing.assert_allclose(r["Ktilde"], Kt, rtol=rtol)
    for side, g in (("par", g_par), ("perp", g_perp)):
        maps = x @ g  # δI = r·g (2.1), (n, nt, npix)
        cl = np.array([[hp.anafast(maps[i, t], lmax=p.ell_max, iter=0) for t in range(nt)]
                       for i in range(n)])  # (2.2) by healpy
        np.testing.assert_allclose(r[f"cl_{side}_realisations"], cl, rtol=rtol, atol=1e-14)
        np.testing.assert_allclose(r[f"cl_{side}"], cl.mean(0), rtol=rtol, atol=1e-14)
        noise = 4 * np.pi / npix * 2 * T * np.einsum("i,tij,j->t", g, K, g)  # (3.1)
        np.testing.assert_allclose(r[f"noise_{side}"], noise, rtol=rtol)
        np.testing.assert_allclose(r[f"chat_{side}"], cl.mean(0) - noise[:, None], rtol=rtol,
                                   atol=1e-14)
        # "standard diffusion": C_1 of the ensemble-averaged map (seed Fig. 2, magenta)
        dip = [hp.anafast(maps[:, t].mean(0), lmax=1, iter=0)[1] for t in range(nt)]
        np.testing.assert_allclose(r[f"dipole_standard_diffusion_{side}"], dip, rtol=rtol)
        assert np.all(r[f"dipole_standard_diffusion_{side}"] <= r[f"cl_{side}"][:, 1])
    np.testing.assert_allclose(r["sky_par"], (x @ g_par)[0, -1], rtol=rtol, atol=1e-14)
    # the unbiased estimate is crjax.spectrum_estimate of the right maps (its own tests check it)
    from crjax.estimators import spectrum_estimate

    ref = spectrum_estimate(x @ g_perp, lmax=p.ell_max)
    np.testing.assert_allclose(r["chat_unbiased_perp"], ref.estimate, rtol=rtol, atol=1e-14)


def test_lost_chunk_is_recomputed_bit_identically(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in ("params.json", "chunk_00000.npz"):  # chunk 1 and the final files "lost"
        (copy / f).write_bytes((out / f).read_bytes())
    (copy / "chunk_00001.npz.tmp-123").write_bytes(b"partial")
    _, b = runs.simulate(presets.tiny(), copy, progress=False)  # the analysis is a pure function
    a = _chunks(out)
    assert set(a) == set(b) and not list(copy.glob("*.tmp-*"))
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def _chunks(directory):
    return RunStore.open(directory, read_params(directory)["params"]).read_chunks()


def test_changed_parameters_refuse_to_resume(tiny_run):
    out, _ = tiny_run
    with pytest.raises(ValueError, match=r"\['n_modes'\]"):
        rp.reproduce(presets.tiny().replace(n_modes=4), out, progress=False)


def test_kill_9_of_the_cli_then_resume_is_bit_identical(tiny_run, tmp_path):
    """A real ``kill -9`` of ``crjax simulate`` after its first chunk, then resume."""
    out, _ = tiny_run
    run = tmp_path / "killed"
    cmd = [sys.executable, "-m", "inference.cli", "simulate", "--preset", "tiny", "--out", str(run),
           "--no-progress"]
    # Slow the child's second chunk down so the kill lands between chunk 0 and chunk 1.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, CRJAX_TEST_CHUNK_DELAY="60",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.time() + 240
        while not (run / "chunk_00000.npz").exists():
            assert proc.poll() is None and time.time() < deadline, "child died before chunk 0"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "chunk_00001.npz").exists() and not (run / "results.npz").exists()
    store = RunStore.open(run, read_params(run)["params"])
    assert store.missing_chunks() == [1]
    _, b = runs.simulate(presets.tiny(), run, progress=False)  # resume in-process (warm jit)
    a = _chunks(out)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_plot_command_redraws_the_figures(tiny_run, capsys):
    from inference import cli

    out, _ = tiny_run
    for f in ("fig2.png", "fig3.png", "skymap.png"):
        (out / f).unlink()
    assert cli.main(["plot", "--run", str(out)]) == 0
    for f in ("fig2.png", "fig3.png", "skymap.png"):
        assert (out / f).stat().st_size > 5000
    assert "fig3" in capsys.readouterr().out
