"""The inverse problem (inference/inverse.py): tensor spectra, Fisher matrix, recovery.

References: the direct map spectra for random g (crjax.power_spectrum of r·g, separate code path),
finite differences in the angle, and a synthetic target made with seeds the fit never sees.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crjax
from crjax import gradients as G
from inference import inverse

RL, DT = 0.1, 0.005


@pytest.fixture(scope="module")
def tiny():
    p = crjax.FieldParams(n_modes=8)
    return p, inverse.tensor_sample(p, jax.random.PRNGKey(3), 64, 2, [0.5, 1.0], rL=RL, dt=DT)


def test_tensor_spectra_match_direct_maps_for_random_g(tiny):
    # C_ℓ(g) = g_a g_b C_ℓ^{ab} exactly (δI is linear in g): compare with the spectra of the maps
    # r·g for random (non-unit) g, computed directly (round-off only, fp64).
    p, s = tiny
    rng = np.random.default_rng(0)
    for _ in range(3):
        g = rng.normal(size=3)
        direct = G.ensemble_sample(p, jax.random.PRNGKey(3), 64, 2, [0.5, 1.0], rL=RL, dt=DT,
                                   g=tuple(g))
        contracted = jnp.einsum("a,rtabl,b->rtl", jnp.asarray(g), s.f, jnp.asarray(g))
        np.testing.assert_allclose(contracted, direct.f, rtol=1e-9,
                                   atol=1e-12 * float(jnp.max(jnp.abs(direct.f))))
        dT = jnp.einsum("a,rtabl,b->rtl", jnp.asarray(g), s.dfdT, jnp.asarray(g))
        np.testing.assert_allclose(dT, direct.dfdT, rtol=1e-9,
                                   atol=1e-12 * float(jnp.max(jnp.abs(direct.dfdT))))


def test_angle_derivative_matches_finite_difference(tiny):
    _, s = tiny
    a, h = 0.4, 1e-5
    m = inverse.spectrum_model(s, a)
    fd = (inverse.spectrum_model(s, a + h).mean - inverse.spectrum_model(s, a - h).mean) / (2 * h)
    # quadratic in (sin α, cos α): central FD error O(h²) ≈ 1e-10 relative
    np.testing.assert_allclose(m.jac[:, 3], fd, rtol=1e-6, atol=1e-9)


def test_fisher_matrix_properties(tiny):
    _, s = tiny
    m = inverse.spectrum_model(s, 0.5)
    raw = inverse.fisher_matrix(m, 64, debias=False)
    assert np.allclose(raw, raw.T) and np.all(np.linalg.eigvalsh(raw) > 0)
    # scales with the data size; the noise correction only lowers the diagonal
    np.testing.assert_allclose(inverse.fisher_matrix(m, 128, debias=False), 2 * raw, rtol=1e-12)
    deb = inverse.fisher_matrix(m, 64)
    assert np.all(np.diag(deb) <= np.diag(raw))
    # the angle needs no Jacobian noise correction beyond the sample's: exact derivative of the
    # same estimate, so its noise term is small next to its information
    assert deb[3, 3] > 0.5 * raw[3, 3]


def test_bad_inputs_raise(tiny):
    _, s = tiny
    m = inverse.spectrum_model(s, 0.5)
    with pytest.raises(ValueError, match="free"):
        inverse.fisher_matrix(m, 64, free=("sigma2", "B"))
    with pytest.raises(ValueError, match="n_data"):
        inverse.fisher_matrix(m, 0)
    with pytest.raises(ValueError, match="theta"):
        inverse.fit_parameters(m.mean, np.eye(5), [1.0, -0.1, 3.0, 0.5], jax.random.PRNGKey(0),
                               base=crjax.FieldParams(n_modes=8), nside=2, t_end=1.0, dt=DT)


def test_recovers_sigma2_and_angle_on_a_held_out_target():
    """Tiny synthetic target (nside 2, 8 modes, tΩ = 10, 256 held-out realisations): optax with
    stochastic score-function/exact-angle gradients lands within 3σ of the truth (σ from the
    debiased Fisher matrix plus the iterates' scatter)."""
    base = crjax.FieldParams(n_modes=8)
    truth = np.array([1.0, RL, 11 / 3, 0.5])
    held = inverse.tensor_sample(base, jax.random.PRNGKey(999), 256, 2, [1.0], rL=RL, dt=DT)
    target = inverse.spectrum_model(held, truth[3])
    fit = inverse.fit_parameters(target.mean, target.cov / 256, [0.6, RL, 11 / 3, 0.9],
                                 jax.random.PRNGKey(5), base=base, nside=2, t_end=1.0, dt=DT,
                                 n_sim=64, steps=30, learning_rate=0.08,
                                 free=("sigma2", "angle"), n_data=256)
    pull = (fit.theta - truth)[[0, 3]] / fit.sigma[[0, 3]]
    assert np.all(np.isfinite(pull)) and np.all(np.abs(pull) < 3), (fit.theta, fit.sigma)
    # it moved from the start towards the truth in the angle (the better-constrained parameter)
    assert abs(fit.theta[3] - truth[3]) < abs(0.9 - truth[3])


def test_recovery_study_writes_json_and_reuses_its_ensembles(tmp_path, capsys):
    # python -m inference.inverse at a tiny size, in a fresh process (as a user runs it: its input
    # checks must not start JAX before it picks the device count): one strict-JSON line with the
    # issue's aims; a rerun (in this process) loads the target and Fisher ensembles it wrote (the
    # same numbers, nothing resimulated)
    import json
    import subprocess
    import sys

    argv = [str(tmp_path), "--nside", "2", "--modes", "8", "--tomega", "10", "--lmax", "4",
            "--n-data", "16", "--n-fisher", "32", "--n-sim", "8", "--steps", "2"]
    run = subprocess.run([sys.executable, "-m", "inference.inverse", *argv],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    first = json.loads(run.stdout.strip().splitlines()[-1])
    assert set(first["estimate"]) == {"sigma2", "rL", "angle"}
    assert set(first["aims"]) == {"angle_within_3deg", "sigma2_within_10pct", "rL_within_10pct"}
    assert json.loads((tmp_path / "recovery.json").read_text()) == first
    stamp = (tmp_path / "target.npz").stat().st_mtime_ns
    inverse._main(argv)
    second = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (tmp_path / "target.npz").stat().st_mtime_ns == stamp
    assert second["cramer_rao_at_truth_raw"] == first["cramer_rao_at_truth_raw"]
    assert second["estimate"] == first["estimate"]  # the fit's keys are fixed too
