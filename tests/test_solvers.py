"""The Boris solver on its own (diffrax.diffeqsolve, no engine): the exact discrete helix in a
uniform field (Ω' = (2/h) arctan(Ωh/2), a closed form we did not write into crjax), for a field
with ``prepare()`` (``TurbulentField``, prepared once per diffrax step) and a plain callable
(no ``prepare``), with and without substeps."""

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crjax.field import FieldParams, realise_field
from crjax.solvers import Boris, LorentzTerm

RL, H, STEPS = 0.1, 0.1 / 20, 48  # tΩ = 2.4


class _Plain(eqx.Module):
    """A field Module without ``prepare``: B(x) = field(x)."""

    field: eqx.Module

    def __call__(self, x):
        return self.field(x)


@pytest.fixture(scope="module")
def uniform_z():
    """B = ẑ as a 16-mode field with zero amplitudes (the full mode-sum code path runs)."""
    f = realise_field(jax.random.PRNGKey(3), FieldParams(n_modes=16))
    return eqx.tree_at(lambda g: g.amplitudes, f, jnp.zeros_like(f.amplitudes))


@jax.jit
def _solve(field, v0, substeps_grid):
    grid, substeps = substeps_grid
    sol = diffrax.diffeqsolve(
        LorentzTerm(field, jnp.asarray(1.0 / RL)),
        Boris(substeps=substeps.shape[0]),
        t0=grid[0],
        t1=grid[-1],
        dt0=None,
        y0=(jnp.zeros_like(v0), v0),
        saveat=diffrax.SaveAt(t1=True),
        stepsize_controller=diffrax.StepTo(ts=grid),
        max_steps=grid.shape[0] - 1,
    )
    return sol.ys[0][0], sol.ys[1][0]


# (plain, substeps): the compiled solves are shared with the bitwise test below (same shapes)
@pytest.mark.parametrize(("plain", "substeps"), [(False, 1), (False, 4), (True, 4)])
def test_boris_discrete_helix(uniform_z, plain, substeps):
    field = _Plain(uniform_z) if plain else uniform_z
    assert hasattr(field, "prepare") == (not plain)
    v0 = jnp.asarray(np.array([[0.6, 0.0, 0.8], [0.0, -1.0, 0.0]]))
    grid = jnp.linspace(0.0, STEPS * H, STEPS // substeps + 1)
    x, v = _solve(field, v0, (grid, jnp.zeros(substeps)))
    # Positive charge in B = ẑ gyrates clockwise (seen from +z) with Ω = 1/rL; the Boris map is
    # exactly a rotation by 2 arctan(Ωh/2) per push: phase φ = STEPS · 2 arctan(h/(2 rL)).
    phi = STEPS * 2.0 * np.arctan(H / (2.0 * RL))
    v0n = np.asarray(v0)
    vx = v0n[:, 0] * np.cos(phi) + v0n[:, 1] * np.sin(phi)
    vy = v0n[:, 1] * np.cos(phi) - v0n[:, 0] * np.sin(phi)
    # Positions: a push moves x by h (v_n + v_n+1)/2 and the Cayley rotation gives exactly
    # v_n+1 − v_n = Ωh ((v_n + v_n+1)/2) × ẑ, so the sum telescopes: Δx = −rL Δv_y, Δy = rL Δv_x.
    xr = -RL * (vy - v0n[:, 1])
    yr = RL * (vx - v0n[:, 0])
    np.testing.assert_allclose(np.asarray(v[:, 0]), vx, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(v[:, 1]), vy, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(v[:, 2]), v0n[:, 2], rtol=0, atol=1e-15)
    # 48 pushes, each rounding at ~eps·|x| (≲ 0.3): 1e-13 is ~10x the round-off.
    np.testing.assert_allclose(np.asarray(x[:, 0]), xr, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(x[:, 1]), yr, rtol=0, atol=1e-13)
    np.testing.assert_allclose(np.asarray(x[:, 2]), v0n[:, 2] * STEPS * H, rtol=0, atol=1e-13)
    # |v| conserved to round-off (the Cayley rotation)
    np.testing.assert_allclose(np.linalg.norm(np.asarray(v), axis=-1), 1.0, rtol=0, atol=1e-14)


def test_prepared_and_plain_field_push_identically():
    """The prepare() hook changes where the layout work happens, not the arithmetic: a turbulent
    field with and without it gives bitwise-identical Boris orbits."""
    f = realise_field(jax.random.PRNGKey(5), FieldParams(n_modes=16))
    v0 = jnp.asarray(np.array([[0.6, 0.0, 0.8], [0.0, -1.0, 0.0]]))
    args = (jnp.linspace(0.0, STEPS * H, STEPS // 4 + 1), jnp.zeros(4))
    xa, va = _solve(f, v0, args)
    xb, vb = _solve(_Plain(f), v0, args)
    np.testing.assert_array_equal(np.asarray(xa), np.asarray(xb))
    np.testing.assert_array_equal(np.asarray(va), np.asarray(vb))
