"""Tests of the spectrum text format: round trip, the shipped synthetic example, and every rejection."""

import os

import numpy as np
import pytest

from inference.data import (
    HEADER_KEYS,
    NOISE_LEVELS,
    Spectrum,
    load_spectrum,
    save_spectrum,
    spectrum_from_estimate,
)
from inference.make_synthetic import EXAMPLE_PATH
from inference.make_synthetic import main as make_synthetic_main

GOOD = """\
# experiment: TestExp
# median_energy_TeV: 10
# f_sky: 0.3
# dec_min_deg: -90
# dec_max_deg: -20
# noise_level: 2.5e-11
# noise_subtracted: false
# synthetic: true
# provenance: hand-written test file
## a free comment
# ell C_ell err_lo err_hi
1  1.0e-6  2e-7  3e-7
3  2.0e-8  4e-9  5e-9

2  5.0e-8  1e-8  2e-8
"""


def _write(tmp_path, text, name="spec.txt"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_load_good_file_sorted_and_metadata(tmp_path):
    spec = load_spectrum(_write(tmp_path, GOOD))
    np.testing.assert_array_equal(spec.ell, [1, 2, 3])  # sorted, nothing dropped
    np.testing.assert_array_equal(spec.cl, [1.0e-6, 5.0e-8, 2.0e-8])
    np.testing.assert_array_equal(spec.err_hi, [3e-7, 2e-8, 5e-9])
    assert spec.experiment == "TestExp" and spec.f_sky == 0.3 and spec.noise_subtracted is False
    assert spec.dec_min_deg == -90.0 and spec.synthetic is True
    np.testing.assert_array_equal(spec.sigma, 0.5 * (spec.err_lo + spec.err_hi))


def test_round_trip_exact(tmp_path):
    rng = np.random.default_rng(3)
    spec = Spectrum(
        ell=np.arange(2, 12),
        cl=rng.normal(size=10) * 1e-9,  # negative values allowed (noise-subtracted estimator)
        err_lo=rng.uniform(1e-10, 1e-9, 10),
        err_hi=rng.uniform(1e-10, 1e-9, 10),
        experiment="round trip: colons are fine",
        noise_level=1.8e-10,
        noise_subtracted=True,
        synthetic=True,
        provenance="test",
    )
    path = tmp_path / "rt.txt"
    save_spectrum(path, spec)
    back = load_spectrum(path)
    for k in ("ell", "cl", "err_lo", "err_hi"):
        np.testing.assert_array_equal(
            getattr(back, k), getattr(spec, k)
        )  # repr() round-trips float64
    assert back.metadata() == spec.metadata()


def test_shipped_example_is_synthetic_and_reproducible(tmp_path):
    assert "synthetic" in os.path.basename(EXAMPLE_PATH)
    spec = load_spectrum(EXAMPLE_PATH)
    assert spec.synthetic is True and "synthetic" in spec.experiment
    assert "make_synthetic" in spec.provenance
    # the generator is deterministic: re-running it reproduces the shipped file byte for byte
    out = tmp_path / "regen.txt"
    assert make_synthetic_main(["--output", str(out)]) == 0
    with open(EXAMPLE_PATH) as fh:
        assert out.read_text() == fh.read()


def test_noise_constants_from_seed():
    # seed Fig. 1 caption
    assert NOISE_LEVELS["IceCube"].f_sky == 0.3 and NOISE_LEVELS["IceCube"].noise == 2.5e-11
    assert NOISE_LEVELS["HAWC"].f_sky == 0.7 and NOISE_LEVELS["HAWC"].noise == 1.8e-10
    assert all("Fig. 1" in n.source for n in NOISE_LEVELS.values())


HEADER = "# experiment: X\n"


@pytest.mark.parametrize(
    "body, message",
    [
        ("1 1e-6 1e-7\n", r"spec.txt:2: expected 4 columns"),
        ("1 1e-6 1e-7 1e-7 5\n", r"spec.txt:2: expected 4 columns"),
        ("1 nan 1e-7 1e-7\n", r"spec.txt:2: C_ell must be finite"),
        ("1 1e-6 inf 1e-7\n", r"spec.txt:2: err_lo must be finite"),
        ("1 1e-6 -1e-7 1e-7\n", r"spec.txt:2: err_lo must be > 0"),
        ("1 1e-6 1e-7 0\n", r"spec.txt:2: err_hi must be > 0"),
        (
            "1 1e-6 1e-7 1e-7\n1 2e-6 1e-7 1e-7\n",
            r"spec.txt:3: duplicate multipole ell = 1 \(first at line 2\)",
        ),
        ("2.5 1e-6 1e-7 1e-7\n", r"spec.txt:2: ell must be an integer"),
        ("-1 1e-6 1e-7 1e-7\n", r"spec.txt:2: ell must be an integer >= 0"),
        ("1 abc 1e-7 1e-7\n", r"spec.txt:2: C_ell is not a number"),
        ("", r"no data rows"),
    ],
)
def test_bad_rows(tmp_path, body, message):
    with pytest.raises(ValueError, match=message):
        load_spectrum(_write(tmp_path, HEADER + body))


@pytest.mark.parametrize(
    "header, message",
    [
        ("# energy: 10\n", r"spec.txt:1: unknown header key 'energy'; allowed keys"),
        ("# f_sky: abc\n", r"spec.txt:1: header 'f_sky' must be a number"),
        ("# f_sky: 1.5\n", r"spec.txt:1: header 'f_sky' out of range"),
        ("# noise_level: -1\n", r"header 'noise_level' out of range"),
        ("# noise_subtracted: yes\n", r"header 'noise_subtracted' must be true or false"),
        ("# experiment: A\n# experiment: B\n", r"spec.txt:2: header key 'experiment' given twice"),
        ("# this line has no colon\n", r"spec.txt:1: header lines must be '# key: value'"),
        ("# dec_min_deg: -10\n", r"dec_min_deg and dec_max_deg must be given together"),
        ("# dec_min_deg: 10\n# dec_max_deg: -10\n", r"dec_min_deg must be < dec_max_deg"),
        ("# median_energy_TeV: 0\n", r"header 'median_energy_TeV' out of range"),
    ],
)
def test_bad_headers(tmp_path, header, message):
    with pytest.raises(ValueError, match=message):
        load_spectrum(_write(tmp_path, header + "1 1e-6 1e-7 1e-7\n"))


def test_header_keys_documented():
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "spectrum_format.md")) as fh:
        doc = fh.read()
    for key in HEADER_KEYS:
        assert f"`{key}`" in doc


def test_select_and_estimate():
    spec = spectrum_from_estimate(np.arange(1, 8), np.linspace(1, 2, 7), np.full(7, 0.04))
    np.testing.assert_array_equal(spec.err_lo, np.full(7, 0.2))
    np.testing.assert_array_equal(spec.select(2, 4).ell, [2, 3, 4])
    np.testing.assert_array_equal(spec.select(lmin=5).ell, [5, 6, 7])
    with pytest.raises(ValueError, match="no multipoles in the range lmin=10..lmax=12"):
        spec.select(10, 12)
    with pytest.raises(ValueError, match="lmin must be <= lmax"):
        spec.select(5, 2)
    with pytest.raises(ValueError, match="lmax must be an integer >= 0"):
        spec.select(1, 2.5)
    with pytest.raises(ValueError, match="variance must be finite and > 0"):
        spectrum_from_estimate([1, 2], [1.0, 2.0], [0.1, -0.1])
    with pytest.raises(ValueError, match="duplicate multipole"):
        Spectrum(ell=np.array([1, 1]), cl=np.ones(2), err_lo=np.ones(2), err_hi=np.ones(2))
