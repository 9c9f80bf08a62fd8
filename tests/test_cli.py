"""The ``crjax`` command (``inference.cli``): help of every subcommand, argument → preset mapping,
and one clear line on stderr for every class of bad input, before anything is written."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crjax.presets import tiny
from crjax.results import RunStore
from crjax.runs import run_params
from inference import cli

ROOT = Path(__file__).resolve().parent.parent
SPECTRUM = ROOT / "inference" / "data" / "synthetic_bgk_p0.5_icecube_like.txt"


def _one_line_error(capsys, rc, *words, status=2):
    """The answer to bad input: exit status ``status``, one stderr line naming ``words``."""
    err = capsys.readouterr().err
    assert rc == status, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])
    return lines[0]


# ----------------------------------------------------------------------------------------------
# help and argument mapping


@pytest.mark.parametrize("command", ["reproduce", "simulate", "plot", "fit"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: crjax {command}")
    assert any(w in out for w in ("--out", "--run", "spectrum")) and "--debug" in out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("simulate", "reproduce", "fit", "plot"):
        assert command in out


def test_simulate_arguments_override_the_preset():
    args = cli.build_parser().parse_args(
        ["simulate", "--preset", "tiny", "--nside", "4", "--modes", "16", "--rL", "0.2",
         "--b0-direction", "1", "0", "0", "--t-omega", "1", "10", "5", "--dtype", "float32",
         "--lambda-min", "0.05", "--lambda-max", "20"]
    )
    p = cli._preset_from_args(args)
    assert (p.nside, p.n_modes, p.rL, p.b0_direction, p.dtype) == (4, 16, 0.2, (1.0, 0.0, 0.0),
                                                                    "float32")
    assert (p.lambda_min, p.lambda_max) == (0.05, 20.0)
    assert p.t_omega[0] == pytest.approx(1.0) and p.t_omega[-1] == pytest.approx(10.0)
    assert len(p.t_omega) == 5 and set(p.fig3_t_omega) <= set(p.t_omega)
    assert p.name == "custom" and p.n_realisations == tiny().n_realisations


def test_fit_lmax_is_a_multipole_with_an_ell_max_alias():
    a = cli.build_parser().parse_args(["fit", "f.txt", "--ell-max", "7", "--ell-min", "2"])
    b = cli.build_parser().parse_args(["fit", "f.txt", "--lmax", "7", "--lmin", "2"])
    assert (a.lmin, a.lmax) == (b.lmin, b.lmax) == (2, 7)


def test_solver_names_come_from_the_one_registry(capsys):
    from crjax.presets import SOLVER_NAMES

    with pytest.raises(SystemExit):
        cli.main(["simulate", "--help"])
    out = capsys.readouterr().out
    assert "{" + ",".join(SOLVER_NAMES) + "}" in out


# ----------------------------------------------------------------------------------------------
# bad input: simulate / reproduce


def test_non_numeric_option_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["simulate", "--preset", "tiny", "--nside", "x", "--out", str(tmp_path / "r")])
    rc = exc.value.code
    _one_line_error(capsys, rc, "--nside", "invalid int value")


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--nside", "3"], ["nside must be a power of two"]),
        (["--realisations", "0"], ["n_realisations", ">= 2"]),
        (["--realisations", "-3"], ["n_realisations"]),
        (["--chunk-size", "0"], ["chunk_size"]),
        (["--modes", "0"], ["n_modes"]),
        (["--sigma2", "0"], ["sigma2", "> 0"]),
        (["--sigma2", "nan"], ["sigma2"]),
        (["--rL", "-1"], ["rL"]),
        (["--dt", "1"], ["dt"]),
        (["--lambda-min", "200"], ["lambda_min must be < lambda_max"]),
        (["--b0-direction", "0", "0", "0"], ["b0_direction"]),
        (["--t-omega", "1", "10", "2.5"], ["--t-omega N"]),
        (["--t-omega", "10", "1", "5"], ["--t-omega MIN MAX"]),
        (["--ell-max", "40"], ["ell_max", "3*nside-1"]),
        (["--seed", "-1"], ["seed"]),
        (["--lmax", "10"], ["--lambda-max"]),  # the old wavelength option points to the new one
    ],
)
def test_bad_simulate_value_is_one_line_and_writes_nothing(extra, words, tmp_path, capsys):
    out = tmp_path / "r"
    rc = cli.main(["simulate", "--preset", "tiny", "--out", str(out), *extra])
    _one_line_error(capsys, rc, "crjax simulate: error:", *words)
    assert not out.exists()


def test_refused_command_leaves_nothing_so_the_corrected_one_resumes(tmp_path, capsys):
    """``--sigma2 0`` is refused before params.json exists; the corrected command is not then
    refused as "parameters differ"."""
    out = tmp_path / "r"
    assert cli.main(["simulate", "--preset", "tiny", "--sigma2", "0", "--out", str(out)]) == 2
    assert not out.exists()
    capsys.readouterr()
    args = cli.build_parser().parse_args(["simulate", "--preset", "tiny", "--sigma2", "0.5",
                                          "--out", str(out)])
    RunStore.open(out, run_params(cli._preset_from_args(args)))  # what the run opens first
    assert json.loads((out / "params.json").read_text())["params"]["sigma2"] == 0.5


@pytest.mark.parametrize("case", ["existing file", "under a file", "foreign directory",
                                  "unwritable"])
def test_unusable_out_path_is_one_line(case, tmp_path, capsys, monkeypatch):
    f = tmp_path / "afile"
    f.write_text("x")
    out = {"existing file": f, "under a file": f / "sub", "foreign directory": tmp_path,
           "unwritable": tmp_path / "new"}[case]
    if case == "unwritable":  # the tests run as root, for whom every directory is writable
        import crjax.results

        monkeypatch.setattr(crjax.results.os, "access", lambda *a, **k: False)
    rc = cli.main(["reproduce", "--preset", "tiny", "--out", str(out)])
    word = {"existing file": "is an existing file", "under a file": "lies under the file",
            "foreign directory": "holds no crjax run", "unwritable": "no permission"}[case]
    _one_line_error(capsys, rc, str(out), word)
    assert f.read_text() == "x" and not (tmp_path / "new").exists()
    assert not (tmp_path / "params.json").exists()


def test_resume_with_changed_parameters_names_them(tmp_path, capsys):
    RunStore.open(tmp_path, run_params(tiny()))
    rc = cli.main(["simulate", "--preset", "tiny", "--seed", "7", "--modes", "4",
                   "--out", str(tmp_path)])
    _one_line_error(capsys, rc, "['n_modes', 'name', 'seed']")
    stored = json.loads((tmp_path / "params.json").read_text())["params"]
    assert stored["seed"] == tiny().seed  # the stored run is untouched


def test_corrupt_params_json_is_one_line(tmp_path, capsys):
    RunStore.open(tmp_path, run_params(tiny()))
    (tmp_path / "params.json").write_text('{"params": {"nside": ')
    rc = cli.main(["reproduce", "--preset", "tiny", "--out", str(tmp_path)])
    _one_line_error(capsys, rc, "params.json", "not valid JSON")
    rc = cli.main(["plot", "--run", str(tmp_path)])
    _one_line_error(capsys, rc, "params.json", "not valid JSON")
    # valid JSON, but not a preset's parameters (a key missing, a value out of range)
    for params in ({"nside": 2, "n_items": 3, "chunk_size": 2},
                   {**run_params(tiny()), "nside": 3}):
        (tmp_path / "params.json").write_text(json.dumps({"params": params}))
        rc = cli.main(["reproduce", "--preset", "tiny", "--out", str(tmp_path)])
        _one_line_error(capsys, rc, "params.json", "stored parameters are not valid")
        rc = cli.main(["plot", "--run", str(tmp_path)])
        _one_line_error(capsys, rc, "params.json", "not valid run parameters")


# ----------------------------------------------------------------------------------------------
# bad input: plot


def test_plot_of_missing_empty_or_unfinished_run_is_one_line(tmp_path, capsys):
    rc = cli.main(["plot", "--run", str(tmp_path / "nothing")])
    _one_line_error(capsys, rc, "nothing", "does not exist")
    (tmp_path / "empty").mkdir()
    rc = cli.main(["plot", "--run", str(tmp_path / "empty")])
    _one_line_error(capsys, rc, "empty", "holds no run")
    RunStore.open(tmp_path / "unfinished", run_params(tiny()))
    rc = cli.main(["plot", "--run", str(tmp_path / "unfinished")])
    _one_line_error(capsys, rc, "results.npz", "has not finished")


def test_plot_of_corrupt_or_foreign_results_is_one_line(tmp_path, capsys):
    RunStore.open(tmp_path, run_params(tiny()))
    (tmp_path / "results.npz").write_bytes(b"PK\x03\x04 not really a zip")
    rc = cli.main(["plot", "--run", str(tmp_path)])
    _one_line_error(capsys, rc, "results.npz", "not a readable npz file")
    np.savez(tmp_path / "results.npz", a=np.zeros(3))
    rc = cli.main(["plot", "--run", str(tmp_path)])
    _one_line_error(capsys, rc, "results.npz", "lacks the arrays")


# ----------------------------------------------------------------------------------------------
# bad input: fit


def _spectrum_files(tmp_path):
    good = SPECTRUM.read_text().splitlines()
    header = [line for line in good if line.startswith("#")]
    rows = [line for line in good if line.strip() and not line.startswith("#")]
    files = {
        "missing": (tmp_path / "nope.txt", ["nope.txt", "does not exist"]),
        "directory": (tmp_path, ["not a regular file"]),
        "empty": (tmp_path / "empty.txt", ["empty.txt", "the file is empty"]),
        "binary": (tmp_path / "bin.dat", ["bin.dat", "binary content"]),
        "latin-1": (tmp_path / "latin.txt", ["latin.txt"]),
        "columns": (tmp_path / "cols.txt", ["cols.txt:", "expected 4 columns"]),
        "nan": (tmp_path / "nan.txt", ["nan.txt:", "must be finite"]),
        "text": (tmp_path / "text.txt", ["text.txt:", "not a number"]),
    }
    files["empty"][0].write_text("")
    files["binary"][0].write_bytes(bytes(range(256)) * 4)
    files["latin-1"][0].write_bytes(("# experiment: Málaga\n" + rows[0] + "\n").encode("latin-1"))
    files["columns"][0].write_text("\n".join(header + [" ".join(rows[0].split()[:3])]) + "\n")
    r = rows[0].split()
    files["nan"][0].write_text("\n".join(header + [" ".join([r[0], "nan", *r[2:]])]) + "\n")
    files["text"][0].write_text("\n".join(header + [" ".join([r[0], r[1], "abc", r[3]])]) + "\n")
    return files


@pytest.mark.parametrize("case", ["missing", "directory", "empty", "binary", "latin-1", "columns",
                                  "nan", "text"])
def test_bad_spectrum_file_is_one_line(case, tmp_path, capsys):
    path, words = _spectrum_files(tmp_path)[case]
    rc = cli.main(["fit", str(path), "--quiet"])
    _one_line_error(capsys, rc, "crjax fit: error:", *words)


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--num-samples", "1"], ["--num-samples", ">= 2"]),
        (["--num-warmup", "-5"], ["--num-warmup"]),
        (["--num-chains", "0"], ["--num-chains"]),
        (["--lmin", "-1"], ["--lmin"]),
        (["--lmax", "0"], ["--lmax"]),
        (["--noise-level", "nan"], ["--noise-level"]),
        (["--noise", "free", "--noise-level", "1e-10"], ["--noise-level", "--noise fixed"]),
        (["--seed", "-2"], ["--seed"]),
        (["--num-samples", "ten"], ["--num-samples", "invalid int value"]),
        (["--likelihood", "cauchy"], ["--likelihood", "invalid choice"]),
        (["--output", "no/such/dir/r.json"], ["--output", "does not exist"]),
        (["--plot", "fit.xyz"], ["--plot", "must end in one of"]),
        (["--lmin", "5", "--lmax", "3"], ["--lmax", "--lmin"]),
    ],
)
def test_bad_fit_option_is_one_line_and_writes_nothing(extra, words, tmp_path, capsys,
                                                       monkeypatch):
    monkeypatch.chdir(tmp_path)
    try:
        rc = cli.main(["fit", str(SPECTRUM), "--quiet", *extra])
    except SystemExit as exc:  # argparse's own errors
        rc = exc.code
    _one_line_error(capsys, rc, *words)
    assert list(tmp_path.iterdir()) == []


def test_fit_of_a_good_file_writes_its_report(tmp_path, capsys):
    rc = cli.main(["fit", str(SPECTRUM), "--output", str(tmp_path / "r.json"),
                   "--ell-max", "12"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads((tmp_path / "r.json").read_text())
    # The shipped synthetic file was drawn with p = 0.5 (inference/make_synthetic.py): its fit
    # must contain it within 3σ (a 3σ band fails with probability 0.3% for a correct fit).
    ml = report["ml"]
    assert abs(ml["p"] - 0.5) < 3 * ml["p_err"] and ml["lmax"] == 12
    assert "ML:" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# --debug, internal errors, Ctrl-C, the module invocation


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="nside must be a power of two"):
        cli.main(["simulate", "--preset", "tiny", "--nside", "3", "--out", str(tmp_path / "r"),
                  "--debug"])


def test_internal_error_is_one_line_with_status_1(tmp_path, capsys, monkeypatch):
    import inference.pipeline

    def broken(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(inference.pipeline, "plot_run", broken)
    rc = cli.main(["plot", "--run", str(tmp_path)])
    line = _one_line_error(capsys, rc, "internal error: RuntimeError: boom second line",
                           "--debug", status=1)
    assert line.startswith("crjax plot:")


def test_ctrl_c_in_library_use_says_how_to_resume(tmp_path, capsys, monkeypatch):
    import inference.pipeline

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(inference.pipeline, "reproduce", interrupted)
    rc = cli.main(["reproduce", "--preset", "tiny", "--out", str(tmp_path / "r")])
    assert rc == 130 and "run the same command again to resume" in capsys.readouterr().err


def test_module_invocation_answers_bad_input_in_one_line(tmp_path):
    """``python -m inference.cli``: a fresh process, the console script's code path."""
    env_path = str(ROOT)
    proc = subprocess.run(
        [sys.executable, "-m", "inference.cli", "fit", str(tmp_path / "missing.txt")],
        capture_output=True, text=True, timeout=120, check=False,
        env={**__import__("os").environ, "PYTHONPATH": env_path},
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"crjax fit: error: spectrum file '{tmp_path / 'missing.txt'}' does not exist"]
