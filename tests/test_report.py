"""Fit reports of spectrum files (what `crjax fit FILE` runs): report content (χ², p-value, the ℓ-range
table, the diagonal-errors note), JSON and PNG outputs, and every option checked before anything is
written. The CLI wrapper itself is tested with the `crjax` command (tests/test_cli.py)."""

import json

import pytest

from inference.make_synthetic import EXAMPLE_PATH
from inference.report import fit_spectrum_file, format_covariance_summary, format_p_table


def test_fit_file_outputs_and_table(tmp_path, capsys):
    out, fig = tmp_path / "fit.json", tmp_path / "fit.png"
    # lmax=12: the main fit has the shape of the table's fits, so all share one compiled program
    rep = fit_spectrum_file(EXAMPLE_PATH, lmax=12, output=out, plot=fig)
    text = capsys.readouterr().out
    assert "[SYNTHETIC]" in text and "p = " in text and "dof" in text and "p-value" in text
    assert "per-multipole errors only" in text  # says the fit treats multipoles as independent
    saved = json.loads(out.read_text())
    assert saved["ml"]["p"] == pytest.approx(rep["ml"]["p"])
    assert saved["metadata"]["synthetic"] is True
    rows = saved["by_lmax"]
    assert [r["lmax"] for r in rows] == list(range(4, 13))
    for r in rows:
        assert r["dof"] == r["lmax"] - 2 and 0 <= r["pvalue"] <= 1 and 0 < r["p"] < 1
    # the table is printed, one line per row
    assert sum(line.strip().startswith("1..") for line in text.splitlines()) == 9
    assert fig.stat().st_size > 10_000  # a rendered PNG, not an empty file


def test_report_without_table_rows(tmp_path):
    """Data at ℓ = 19..30 only (12 multipoles: the compiled shape of the test above) allow no ℓmax ≤ 12."""
    with open(EXAMPLE_PATH) as fh:
        text = fh.read()
    lines = [ln for ln in text.splitlines() if ln.startswith("#") or int(ln.split()[0]) >= 19]
    path = tmp_path / "high_ell.txt"
    path.write_text("\n".join(lines) + "\n")
    rep = fit_spectrum_file(path, quiet=True, table=True)
    assert rep["ml"]["lmin"] == 19 and rep["by_lmax"] == []
    assert "no l-range table" in rep["by_lmax_note"]


@pytest.mark.parametrize(
    "kw, message",
    [
        ({"noise_level": float("nan")}, "noise_level must be a finite number >= 0"),
        ({"num_warmup": 0}, "num_warmup must be an integer >= 1"),
        ({"num_samples": 1}, "num_samples must be an integer >= 2"),
        ({"num_chains": 2.0}, "num_chains must be an integer >= 1"),
        ({"seed": -3}, "seed must be an integer >= 0"),
        ({"priors": {"p_low": 0.1}}, "priors must be an inference.nuts.Priors"),
        ({"output": "/nonexistent-dir/x.json"}, "output: the folder '/nonexistent-dir' of"),
        ({"plot": "/nonexistent-dir/x.png"}, "plot: the folder '/nonexistent-dir' of"),
        ({"lmin": 0}, "lmin must be an integer >= 1"),
        ({"lmax": 2.5}, "lmax must be an integer >= 0"),
        ({"noise": "sometimes"}, "noise must be one of"),
        ({"likelihood": "poisson"}, "likelihood must be one of"),
    ],
)
def test_bad_options_refused_before_writing(tmp_path, kw, message):
    out = tmp_path / "never.json"
    kw = {"output": out, **kw} if "output" not in kw else kw
    with pytest.raises(ValueError, match=message):
        fit_spectrum_file(EXAMPLE_PATH, quiet=True, **kw)
    assert not out.exists()


def test_output_is_a_directory(tmp_path):
    with pytest.raises(ValueError, match="output: .* is a directory"):
        fit_spectrum_file(EXAMPLE_PATH, output=tmp_path, quiet=True)


def test_bad_file_named(tmp_path):
    with pytest.raises(ValueError, match="no such spectrum file"):
        fit_spectrum_file(tmp_path / "missing.txt", quiet=True)


def test_format_tables():
    rows = [
        {
            "lmin": 1,
            "lmax": 4,
            "p": 0.5,
            "p_interval_68": [0.4, 0.6],
            "chi2": 1.0,
            "dof": 2,
            "pvalue": 0.6,
        }
    ]
    text = format_p_table(rows)
    assert "1..4" in text and "0.500" in text and "[ 0.400,  0.600]" in text
    summary = {
        "bgk": {
            "hartlap_factor": 0.9,
            "n_realisations": 100,
            "p": 0.5,
            "p_interval_68": [0.45, 0.55],
            "interval_method": "profile likelihood",
            "chi2": 3.0,
            "dof": 2,
            "pvalue": 0.22,
        },
        "by_lmax": rows,
        "families": [
            {
                "family": "tilted",
                "params": {"p": 0.5, "b": 1.0},
                "chi2": 1.0,
                "dof": 1,
                "pvalue": 0.3,
                "fits": True,
            }
        ],
        "statement": "BGK fits.",
    }
    text = format_covariance_summary(summary)
    assert "Hartlap factor 0.900" in text and "tilted" in text and "fits" in text
