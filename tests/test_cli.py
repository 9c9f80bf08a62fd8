"""The ``crjax`` command line: help of every subcommand, argument → preset mapping, clear errors."""

import json

import pytest

from crjax import cli
from crjax.presets import tiny
from crjax.results import RunStore


@pytest.mark.parametrize("command", ["reproduce", "simulate", "plot"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: crjax {command}")
    assert "--out" in out or "--run" in out


def test_top_level_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for command in ("simulate", "reproduce", "fit", "plot"):
        assert command in out


def test_fit_help_is_delegated(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["fit", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: crjax fit") and "spectrum" in out  # inference.cli's parser


def test_simulate_arguments_override_the_preset():
    args = cli.build_parser().parse_args(
        ["simulate", "--preset", "tiny", "--nside", "4", "--modes", "16", "--rL", "0.2",
         "--b0-direction", "1", "0", "0", "--t-omega", "1", "10", "5", "--dtype", "float32"]
    )
    p = cli._preset_from_args(args)
    assert (p.nside, p.n_modes, p.rL, p.b0_direction, p.dtype) == (4, 16, 0.2, (1.0, 0.0, 0.0),
                                                                    "float32")
    assert p.t_omega[0] == pytest.approx(1.0) and p.t_omega[-1] == pytest.approx(10.0)
    assert len(p.t_omega) == 5 and set(p.fig3_t_omega) <= set(p.t_omega)
    assert p.name == "custom" and p.n_realisations == tiny().n_realisations


def test_bad_value_is_one_clear_error(tmp_path, capsys):
    rc = cli.main(["simulate", "--preset", "tiny", "--nside", "3", "--out", str(tmp_path / "r")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "nside must be a power of two" in err and "Traceback" not in err


def test_resume_with_changed_parameters_names_them(tmp_path, capsys):
    from crjax.reproduce import _run_params

    RunStore.open(tmp_path, _run_params(tiny()))
    rc = cli.main(["simulate", "--preset", "tiny", "--seed", "7", "--modes", "4",
                   "--out", str(tmp_path)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "['n_modes', 'name', 'seed']" in err
    # The stored run is untouched.
    stored = json.loads((tmp_path / "params.json").read_text())["params"]
    assert stored["seed"] == tiny().seed
