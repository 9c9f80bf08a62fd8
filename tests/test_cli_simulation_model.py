"""``crjax fit --model simulation``: end to end on a tiny synthetic file with a saved tiny emulator,
and one line on stderr (exit 2, nothing written) for bad input."""

import dataclasses
import json

import jax
import numpy as np
import pytest

from inference import cli
from inference import emulator as E
from inference.data import Spectrum, save_spectrum

TINY = E.Design(sigma2_range=(0.5, 2.0), rL_range=(0.07, 0.14), n_points=6, n_realisations=16,
                nside=2, n_modes=8, t_end=1.0)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("sim")
    E.save_emulator(d / "emu.npz", E.build_emulator(TINY))
    c, _ = E.simulate_components(dataclasses.replace(TINY, n_realisations=64), 1.0, 0.1,
                                 jax.random.PRNGKey(777))
    per = 0.5 * (c[:, 0] + c[:, 1])  # α = π/4
    sig = per.std(0, ddof=1) / 8
    save_spectrum(d / "synthetic_sim.txt", Spectrum(
        ell=np.arange(1, 6), cl=per.mean(0), err_lo=sig, err_hi=sig, noise_subtracted=True,
        synthetic=True, provenance="tests/test_cli_simulation_model.py"))
    return d


def _one_line(capsys, rc, *words):
    err = capsys.readouterr().err
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, lines[0])


def test_end_to_end_with_a_saved_emulator(files, capsys):
    out = files / "r.json"
    rc = cli.main(["fit", "--model", "simulation", str(files / "synthetic_sim.txt"), "--emulator",
                   str(files / "emu.npz"), "--output", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "model simulation" in text and "sigma2=" in text and "chi2 =" in text
    r = json.loads(out.read_text())["simulation"]
    assert r["dof"] == 1 and 0 <= r["pvalue"] <= 1
    for n in ("sigma2", "rL", "angle"):
        lo, hi = r[f"{n}_interval_68"]
        assert lo <= r[n] <= hi


@pytest.mark.parametrize("extra, words", [
    (["--emulator", "missing.npz"], ["--emulator", "no such file"]),
    (["--sigma2-range", "2", "1"], ["--sigma2-range", "0 < low < high"]),
    (["--rL-range", "0.1", "3"], ["--rL-range", "<= 1"]),
    (["--design-points", "2"], ["--design-points", ">= 6"]),
    (["--nuts"], ["--nuts", "--model bgk"]),
    (["--noise", "free"], ["--noise free"]),
])
def test_bad_options_are_one_line_and_write_nothing(files, extra, words, capsys):
    out = files / "never.json"
    rc = cli.main(["fit", "--model", "simulation", str(files / "synthetic_sim.txt"),
                   "--output", str(out), *extra])
    _one_line(capsys, rc, *words)
    assert not out.exists()


def test_missing_file_and_bgk_only_misuse(files, capsys):
    _one_line(capsys, cli.main(["fit", "--model", "simulation", str(files / "nope.txt")]),
              "does not exist")
    _one_line(capsys, cli.main(["fit", str(files / "synthetic_sim.txt"), "--emulator",
                                str(files / "emu.npz")]), "--emulator", "--model simulation")
    # the data's ℓ range must fit the emulator's (nside 2: ℓ ≤ 5)
    _one_line(capsys, cli.main(["fit", "--model", "simulation", str(files / "synthetic_sim.txt"),
                                "--emulator", str(files / "emu.npz"), "--lmax", "3"]),
              ">= 5")
