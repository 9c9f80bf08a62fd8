"""Turbulent magnetic field: regular B0 plus N harmonic modes (seed §3, Giacalone & Jokipii 1999).

    B(x) = B0 b̂0 + Σ_n A_n ξ̂_n cos(k_n κ̂_n·x + β_n)                        (seed §3)

with k_n log-spaced from 2π/λmax to 2π/λmin, random unit κ̂_n (isotropic, or ∥ b̂0 for "slab"),
polarisation ξ̂_n ⊥ κ̂_n (so ∇·B = 0 exactly), random phases β_n and amplitudes
A_n² = 2σ²B0² G_n / Σ_m G_m, so that Σ A_n² = 2σ²B0² and the spatial mean of |δB|² is σ²B0².
Units: Lc = 1, |B0| = 1 unless set otherwise (``shared/physics.md`` §1–2).

``FieldParams`` (what to draw) --``realise_field(key, params)``--> ``TurbulentField`` (one
realisation, a pytree of arrays). Every float is a pytree leaf: gradients flow from the amplitudes
and directions back to σ², Lc, γ (or s, q), λmin, λmax, B0 and the B0 direction; the random draws
depend only on the key. ``TurbulentField.__call__`` is the hot loop of crjax; by default it uses a
range-reduced polynomial cosine of phase/π (``_fast_cospi``, ≲ 2 ulp of 1 in fp64 and fp32), ~8x
(fp64) faster than XLA:CPU's ``jnp.cos``; ``exact_cos=True`` selects ``jnp.cos``.
"""

from __future__ import annotations

import abc
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Float, PRNGKeyArray

from ._checks import check_finite, check_int_at_least, check_positive, is_concrete

__all__ = [
    "AMPLITUDE_LAWS",
    "AbstractSpectrum",
    "BendOverSpectrum",
    "FieldParams",
    "KolmogorovSpectrum",
    "TurbulentField",
    "gaussian_amplitudes",
    "paper_2015_field",
    "realise_field",
    "uniform_field",
]

_GEOMETRIES = ("isotropic", "slab")
#: FieldParams.amplitude_law values: the seed's fixed amplitudes, or Gaussian random ones.
AMPLITUDE_LAWS = ("fixed", "gaussian")


# --------------------------------------------------------------------------------------------
# Spectra
# --------------------------------------------------------------------------------------------
class AbstractSpectrum(eqx.Module):
    """Shape of the turbulence spectrum: per-mode weights G_n for *log-spaced* k_n.

    Subclasses implement ``log_weights(k, Lc)`` = log G_n up to an additive constant; the
    amplitudes are A_n² = 2σ²B0² G_n / Σ G_m (seed §3). Log spacing means Δk_n ∝ k_n, so a
    one-dimensional energy spectrum E(k) gives G_n = k_n E(k_n) (physics.md §2).
    """

    @abc.abstractmethod
    def log_weights(self, k: Float[Array, " n"], Lc) -> Float[Array, " n"]:
        """log G_n (up to a constant) at wavenumbers k (units 1/Lc), shape (n,)."""

    def check(self) -> None:
        """Raise ValueError for out-of-range (concrete) parameters."""


class KolmogorovSpectrum(AbstractSpectrum):
    """The seed's spectrum (§3): G_n = k_n³ / (1 + (k_n Lc)^γ); γ = 11/3 is Kolmogorov.

    The 3-D spectral density ∝ k^(−γ) times the shell area 4πk² gives E(k) ∝ k²/(1+(kLc)^γ)
    (→ k^(−5/3) for γ = 11/3), and the log spacing of k_n adds Δk ∝ k: hence k³.
    """

    gamma: Float[Array, ""] | float = 11.0 / 3.0

    def __check_init__(self):
        self.check()

    def check(self) -> None:
        check_positive("gamma", self.gamma)

    def log_weights(self, k, Lc):
        logk = jnp.log(k)
        gamma = jnp.asarray(self.gamma, k.dtype)
        # softplus(log u) = log(1 + u): stable for (k Lc)^γ ≫ 1 and differentiable in γ, Lc.
        return 3.0 * logk - jax.nn.softplus(gamma * (logk + jnp.log(jnp.asarray(Lc, k.dtype))))


class BendOverSpectrum(AbstractSpectrum):
    """Generic bend-over spectrum E(k) ∝ (kL)^q / (1 + (kL)²)^((s+q)/2), L = Lc.

    E ∝ k^q for kLc ≪ 1 and ∝ k^(−s) for kLc ≫ 1. With log-spaced k_n (Δk ∝ k) the per-mode
    weight is G_n = k_n E(k_n). s = 5/3, q = 2 has the seed's asymptotic slopes (not its exact
    bend shape, which is ``KolmogorovSpectrum``).
    """

    s: Float[Array, ""] | float = 5.0 / 3.0
    q: Float[Array, ""] | float = 2.0

    def __check_init__(self):
        self.check()

    def check(self) -> None:
        check_positive("s", self.s)
        check_finite("q", self.q)

    def log_weights(self, k, Lc):
        logk = jnp.log(k)
        s = jnp.asarray(self.s, k.dtype)
        q = jnp.asarray(self.q, k.dtype)
        logkl = logk + jnp.log(jnp.asarray(Lc, k.dtype))
        # log(1 + (kL)²) = softplus(2 log kL), stable at large kL.
        return logk + q * logkl - 0.5 * (s + q) * jax.nn.softplus(2.0 * logkl)


# --------------------------------------------------------------------------------------------
# Parameters
# --------------------------------------------------------------------------------------------
def _as_vector(v):
    return v if isinstance(v, jax.Array) else jnp.asarray(v, dtype=float)


class FieldParams(eqx.Module):
    """What to draw: turbulence level, scales, regular field, spectrum and geometry (seed §3).

    sigma2: σ² = ⟨δB²⟩/B0² (> 0). Lc: bend-over scale (> 0). lmin, lmax: shortest and longest
    wavelength, 0 < lmin < lmax; k_n = geomspace(2π/lmax, 2π/lmin, n_modes). b0: |B0| (> 0).
    b0_direction: direction of B0, shape (3,), normalised internally (not the zero vector).
    spectrum: an ``AbstractSpectrum``. geometry: "isotropic" (κ̂ uniform on the sphere) or
    "slab" (κ̂ ∥ b̂0). n_modes: N ≥ 1 (static: it fixes array shapes). amplitude_law: "fixed"
    (the seed's |δB_n| = A_n, the default) or "gaussian" (each mode's amplitude vector a 2-D
    Gaussian ⊥ κ̂_n with E|a_n|² = A_n², :func:`gaussian_amplitudes`: the same spectrum on average,
    and θ then enters a density, which the score-function gradients of ``crjax.gradients`` need).
    """

    sigma2: Float[Array, ""] | float = 1.0
    Lc: Float[Array, ""] | float = 1.0
    lmin: Float[Array, ""] | float = 0.01
    lmax: Float[Array, ""] | float = 100.0
    b0: Float[Array, ""] | float = 1.0
    b0_direction: Float[Array, " 3"] = eqx.field(default=(0.0, 0.0, 1.0), converter=_as_vector)
    spectrum: AbstractSpectrum = KolmogorovSpectrum()
    geometry: str = eqx.field(default="isotropic", static=True)
    # loosely annotated: __check_init__ answers a non-integer with a ValueError
    n_modes: int | float = eqx.field(default=256, static=True)
    amplitude_law: str = eqx.field(default="fixed", static=True)

    def __check_init__(self):
        _validate(self)


def _validate(p: FieldParams) -> None:
    check_positive("sigma2", p.sigma2)
    check_positive("Lc", p.Lc)
    check_positive("lmin", p.lmin)
    check_positive("lmax", p.lmax)
    check_positive("b0", p.b0)
    if is_concrete(p.lmin) and is_concrete(p.lmax) and not float(p.lmin) < float(p.lmax):
        raise ValueError(
            f"lmin must be < lmax (allowed range: 0 < lmin < lmax); got lmin={p.lmin!r}, "
            f"lmax={p.lmax!r}"
        )
    check_int_at_least("n_modes", p.n_modes, 1)
    if p.geometry not in _GEOMETRIES:
        raise ValueError(f"geometry must be one of {_GEOMETRIES}; got {p.geometry!r}")
    if p.amplitude_law not in AMPLITUDE_LAWS:
        raise ValueError(f"amplitude_law must be one of {AMPLITUDE_LAWS}; got {p.amplitude_law!r}")
    if not isinstance(p.spectrum, AbstractSpectrum):
        raise ValueError(  # noqa: TRY004  (bad input: ValueError, project rule)
            f"spectrum must be an AbstractSpectrum; got {type(p.spectrum).__name__}"
        )
    p.spectrum.check()
    d = p.b0_direction
    if jnp.shape(d) != (3,):
        raise ValueError(f"b0_direction must have shape (3,); got shape {jnp.shape(d)}")
    if is_concrete(d):
        dn = np.asarray(d, dtype=float)
        if not np.all(np.isfinite(dn)) or not np.linalg.norm(dn) > 0:
            raise ValueError(
                f"b0_direction must be a finite non-zero 3-vector (any length > 0); got {d!r}"
            )


def paper_2015_field(n_modes: int = 256) -> FieldParams:
    """The seed's field (Ahlers & Mertsch 2015, §3): σ² = 1, λ from 0.01 to 100 Lc, γ = 11/3,
    isotropic modes, B0 ∥ ẑ. The seed does not state N; 256 is our default (physics.md §2)."""
    return FieldParams(
        sigma2=1.0,
        Lc=1.0,
        lmin=0.01,
        lmax=100.0,
        b0=1.0,
        spectrum=KolmogorovSpectrum(gamma=11.0 / 3.0),
        geometry="isotropic",
        n_modes=n_modes,
    )


# --------------------------------------------------------------------------------------------
# Fast cosine: cos(πu) by exact reduction to |f| ≤ 1/2 and one even polynomial
# --------------------------------------------------------------------------------------------
# The fast cosine works on u = phase/π (the field pre-scales k and β by 1/π): u = j + f with
# j = round(u) and f = u − j exact (no Cody–Waite constants), cos(πu) = (−1)^j cos(πf) with one
# polynomial in f² on |f| ≤ 1/2, and (−1)^j applied by moving j's parity bit into the sign bit
# (t = j + 1.5·2^52 holds j in its low mantissa bits). Scaling by 1/π rounds the argument once,
# which is the same order as the rounding of k·x itself (|phase|·eps), so B(x) is as accurate as
# with cos(k·x + β); the polynomial is ≲ 2 ulp of 1. Measured ~1.2x faster per Boris push (fp64)
# than Cody–Waite reduction by π with a float sign, and ~8x faster than jnp.cos on XLA:CPU
# (benchmarks/field.py, benchmarks/engine.py).
_PI = 3.141592653589793
_ONE_OVER_PI = 0.318309886183790671537767526745028724

# Polynomials in z = f² on [0, 1/4], highest power first: cos(πf) ≈ C(z), sin(πf) ≈ f·S(z).
# mpmath.chebyfit (50 digits) of cos(π√z) and sin(π√z)/√z, rounded to the dtype; fewer terms
# exceed 2 ulp. Max error of _fast_cospi/_fast_sinpi through XLA:CPU (400k points, long-double
# reference): fp64 1.17 (cos, 9 terms) and 1.00 (sin, 9) ulp of 1; fp32 0.89 (cos, 6) and
# 1.30 (sin, 5) ulp.
_COS_C = {
    np.dtype(np.float64): (
        4.149564353942586e-06,
        -0.00010456655338748738,
        0.0019295562724817132,
        -0.025806888737002202,
        0.23533063012953284,
        -1.335262768843447,
        4.058712126416497,
        -4.934802200544676,
        1.0,
    ),
    np.dtype(np.float32): (
        -0.024395931512117386,
        0.23493707180023193,
        -1.335211992263794,
        4.058709144592285,
        -4.934802055358887,
        1.0,
    ),
}
_SIN_C = {
    np.dtype(np.float64): (
        7.697826768224191e-07,
        -2.1903497074626018e-05,
        0.0004662998161898394,
        -0.007370430505916944,
        0.0821458865731029,
        -0.5992645293189447,
        2.5501640398773007,
        -5.167712780049969,
        3.141592653589793,
    ),
    np.dtype(np.float32): (
        0.07765591144561768,
        -0.5982903838157654,
        2.550077438354492,
        -5.167710304260254,
        3.1415927410125732,
    ),
}
# t = j + 1.5·2^(mantissa bits): for |j| < 2^(mantissa bits − 1) the ulp of t is 1, so t's lowest
# mantissa bit is j's parity. Limits: |u| < 2^51 (fp64), 2^22 (fp32) — far beyond |k·x|/π of any
# run (k ≤ 2π/λmin, |x| ≲ 1e4 Lc).
_PARITY = {
    np.dtype(np.float64): (1.5 * 2.0**52, jnp.int64, 63),
    np.dtype(np.float32): (1.5 * 2.0**23, jnp.int32, 31),
}


def _horner(z, coeffs):
    acc = jnp.asarray(coeffs[0], z.dtype)
    for c in coeffs[1:]:
        acc = acc * z + jnp.asarray(c, z.dtype)
    return acc


def _estrin(z, coeffs):
    """The polynomial of ``coeffs`` (highest power first) at z, in chunks of 4 terms.

    Each chunk is (c0 + c1 z) + z² (c2 + c3 z); the chunks are combined by Horner in z⁴. Same
    multiply-adds as Horner plus two products (z², z⁴), but the dependency chain is ~half as
    long: the polynomial is latency-bound on XLA:CPU, and this measured ~1.15x faster for the
    fp64 cosine (docs/engine_profile.md) at equal accuracy (≤ 1.0 ulp measured).
    """
    c = [jnp.asarray(v, z.dtype) for v in coeffs[::-1]]  # lowest power first
    z2 = z * z
    chunks = []
    for i in range(0, len(c), 4):
        part = c[i : i + 4]
        lo = part[0] if len(part) == 1 else part[0] + part[1] * z
        if len(part) > 2:
            hi = part[2] if len(part) == 3 else part[2] + part[3] * z
            lo = lo + z2 * hi
        chunks.append(lo)
    if len(chunks) == 1:
        return chunks[0]
    z4 = z2 * z2
    acc = chunks[-1]
    for ch in chunks[-2::-1]:
        acc = ch + z4 * acc
    return acc


def _reduce(u):
    """u = j + f, j = round(u), |f| ≤ 1/2 (exact); returns f and the sign-bit mask of (−1)^j."""
    dt = np.dtype(u.dtype)
    if dt not in _PARITY:
        raise ValueError(f"fast cosine supports float32 and float64; got dtype {dt}")
    magic, itype, shift = _PARITY[dt]
    j = jnp.round(u)
    # (j + magic) is not simplified away (unlike (u + magic) − magic, which XLA folds to u)
    bits = jax.lax.bitcast_convert_type(j + jnp.asarray(magic, u.dtype), itype)
    return u - j, jax.lax.shift_left(bits, jnp.asarray(shift, itype))


def _apply_sign(y, mask):
    """y · (−1)^j: xor the parity bit (moved to the sign position) into y's sign bit."""
    itype = mask.dtype
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(y, itype) ^ mask, y.dtype)


def _cospi_poly(u):
    f, mask = _reduce(u)
    return _apply_sign(_estrin(f * f, _COS_C[np.dtype(u.dtype)]), mask)


def _sinpi_poly(u):
    f, mask = _reduce(u)
    return _apply_sign(f * _estrin(f * f, _SIN_C[np.dtype(u.dtype)]), mask)


@jax.custom_jvp
def _fast_cospi(u):
    """cos(πu) to ≲ 2 ulp of 1 for |u| < 2^51 (fp64) / 2^22 (fp32); d/du = −π sin(πu)."""
    return _cospi_poly(u)


@jax.custom_jvp
def _fast_sinpi(u):
    """sin(πu) to ≲ 2 ulp of 1 for |u| < 2^51 (fp64) / 2^22 (fp32); d/du = π cos(πu)."""
    return _sinpi_poly(u)


@_fast_cospi.defjvp
def _fast_cospi_jvp(primals, tangents):
    (u,), (t,) = primals, tangents
    # Tangents through the custom functions, so higher derivatives also use exact rules.
    return _fast_cospi(u), -_fast_sinpi(u) * (jnp.asarray(_PI, u.dtype) * t)


@_fast_sinpi.defjvp
def _fast_sinpi_jvp(primals, tangents):
    (u,), (t,) = primals, tangents
    return _fast_sinpi(u), _fast_cospi(u) * (jnp.asarray(_PI, u.dtype) * t)


# --------------------------------------------------------------------------------------------
# The field
# --------------------------------------------------------------------------------------------
class TurbulentField(eqx.Module):
    """One field realisation: B(x) = b0 + Σ_n amplitudes_n cos(wavevectors_n·x + phases_n), seed §3.

    b0: regular field vector B0 b̂0, shape (3,). wavevectors: k_n κ̂_n, shape (n, 3).
    amplitudes: A_n ξ̂_n, shape (n, 3). phases: β_n, shape (n,). exact_cos (static): use
    ``jnp.cos`` instead of the faster polynomial in phase/π (per mode they agree to ≲ 2 ulp of 1
    plus ~|k·x + β| ulp, the rounding of the argument that either path carries). block_size
    (static): positions per block in ``__call__`` (None: automatic).
    """

    b0: Float[Array, " 3"]
    wavevectors: Float[Array, "n 3"]
    amplitudes: Float[Array, "n 3"]
    phases: Float[Array, " n"]
    exact_cos: bool = eqx.field(default=False, static=True)
    block_size: int | None = eqx.field(default=None, static=True)

    def __check_init__(self):
        if self.block_size is not None:
            check_int_at_least("block_size", self.block_size, 1)

    @property
    def n_modes(self) -> int:
        return self.phases.shape[0]

    def __call__(self, x: ArrayLike) -> Float[Array, "... 3"]:
        """B(x) at positions x of shape (..., 3) (units of Lc); returns shape (..., 3).

        Positions are processed in blocks of ``block_size`` (default: ~1 MiB of fp64
        phases per block, 512 positions for 256 modes): the (positions × modes) intermediates
        then stay in cache, ~2x faster than one big product for 12288 positions on CPU.
        Same as ``self.prepare()(x)``.
        """
        return self.prepare()(x)

    def prepare(self) -> _PreparedField:
        """The field as its evaluation uses it (the same B(x); a differentiable map).

        Loops that evaluate B many times (the Boris push) call this once outside the loop, so
        the rescaling by 1/π and the padding are not redone per evaluation.
        """
        n = self.phases.shape[0]
        dt = self.phases.dtype
        scale = jnp.asarray(1.0 if self.exact_cos else _ONE_OVER_PI, dt)
        # (n, 3) -> (n, 4) with a zero column: YNNPACK's dot is ~1.2x faster (fp64) with 4 output
        # columns than with 3 (docs/engine_profile.md); the zero column is sliced off.
        amplitudes = jnp.concatenate([self.amplitudes, jnp.zeros((n, 1), dt)], axis=1)
        return _PreparedField(
            b0=self.b0,
            wavevectors=self.wavevectors * scale,
            phases=self.phases * scale,
            amplitudes=amplitudes,
            exact_cos=self.exact_cos,
            block_size=self.block_size or _default_block(n),
        )


class _PreparedField(eqx.Module):
    """``TurbulentField`` in evaluation layout: k (n, 3) and β, both divided by π for the fast
    cosine (which takes phase/π), amplitudes padded to (n, 4); see ``TurbulentField.prepare``.
    k stays (n, 3): the dot contracts its second axis directly (a stored kᵀ cost a transpose
    copy per diffrax step in the compiled loop)."""

    b0: Float[Array, " 3"]
    wavevectors: Float[Array, "n 3"]
    phases: Float[Array, " n"]
    amplitudes: Float[Array, "n 4"]
    exact_cos: bool = eqx.field(static=True)
    block_size: int = eqx.field(static=True)

    def __call__(self, x: ArrayLike) -> Float[Array, "... 3"]:
        """B(x) at positions x of shape (..., 3); see ``TurbulentField.__call__``."""
        x = jnp.asarray(x)
        if x.shape[-1:] != (3,):
            raise ValueError(f"x must have shape (..., 3); got shape {x.shape}")
        flat = x.reshape(-1, 3)
        m = flat.shape[0]
        block = self.block_size
        if m <= block:
            b = self._modesum(flat)
        else:
            nb = -(-m // block)
            padded = jnp.pad(flat, ((0, nb * block - m), (0, 0)))  # zeros: harmless positions
            b = jax.lax.map(self._modesum, padded.reshape(nb, block, 3)).reshape(-1, 3)[:m]
        return b.reshape(x.shape[:-1] + (3,))

    def _modesum(self, x: Float[Array, "m 3"]) -> Float[Array, "m 3"]:
        # Matmul form: measured fastest on XLA:CPU (YNNPACK dots) among broadcast/reduce and
        # fused elementwise-phase variants (benchmarks/field.py, docs/engine_profile.md).
        phase = x @ self.wavevectors.T + self.phases[None, :]
        c = jnp.cos(phase) if self.exact_cos else _fast_cospi(phase)
        return (c @ self.amplitudes)[:, :3] + self.b0[None, :]


def _default_block(n_modes: int) -> int:
    """Positions per block so that a block's fp64 phases take ~1 MiB (a CPU L2), in [64, 8192]."""
    return int(min(8192, max(64, 2 ** round(np.log2(2**17 / max(n_modes, 1))))))


def _dtype(dtype):
    dt = jnp.dtype(dtype) if dtype is not None else jnp.dtype(jnp.result_type(float))
    if dt not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.float64)):
        raise ValueError(f"dtype must be float32 or float64; got {dt}")
    return dt


def _unit(v):
    return v / jnp.linalg.norm(v)


def _perp_basis(u: Float[Array, " 3"]):
    """Two unit vectors e1, e2 with (e1, e2, u) right-handed orthonormal; differentiable in u.

    Gram–Schmidt from the Cartesian axis least aligned with u (never parallel to it)."""
    i = jnp.argmin(jnp.abs(u))
    h = jnp.zeros_like(u).at[i].set(1.0)
    e1 = _unit(h - jnp.dot(h, u) * u)
    e2 = jnp.cross(u, e1)
    return e1, e2


def realise_field(
    key: PRNGKeyArray, params: FieldParams, *, dtype=None, exact_cos: bool = False
) -> TurbulentField:
    """Draw one field realisation from ``key`` (seed §3; physics.md §2).

    k_n = geomspace(2π/lmax, 2π/lmin, N); isotropic: cos θ_n ~ U(−1, 1), φ_n ~ U(−π, π); slab:
    κ̂_n = ±b̂0 with a random sign (a mode with −κ̂ is the same family of plane waves, so the sign
    only varies the realisation); β_n ~ U(0, 2π); ξ̂_n = cos α_n ê1 + sin α_n ê2 with
    α_n ~ U(0, 2π) and ê1, ê2 ⊥ κ̂_n; A_n² = 2σ²B0² G_n/Σ G_m. Returns a ``TurbulentField``
    with arrays of ``dtype`` (float64 default, or float32). vmappable over keys:
    ``jax.vmap(realise_field, in_axes=(0, None))(keys, params)``.

    ``params.amplitude_law == "gaussian"``: the modes are drawn from ``fold_in(key, 0)`` as above
    and the amplitudes then replaced by :func:`gaussian_amplitudes` with ``fold_in(key, 1)``.
    """
    _validate(params)
    dt = _dtype(dtype)
    if params.amplitude_law == "gaussian":
        field = _realise(jax.random.fold_in(key, 0), params, dt, exact_cos)
        return gaussian_amplitudes(field, jax.random.fold_in(key, 1))
    return _realise(key, params, dt, exact_cos)


def gaussian_amplitudes(field: TurbulentField, key: PRNGKeyArray) -> TurbulentField:
    """Replace the fixed amplitudes A_n ξ̂_n by Gaussian ones (docs/physics.md §2, §8).

    a_n = (A_n/√2)(z₁ ξ̂_n + z₂ κ̂_n × ξ̂_n), z ~ N(0, 1) from ``key``: a 2-D isotropic Gaussian in
    the plane ⊥ κ̂_n (so ∇·B = 0 still), E|a_n|² = A_n², the same spectrum on average. Returns a new
    ``TurbulentField`` (``eqx.tree_at`` on ``amplitudes``); differentiable in the field's leaves.
    """
    amp = field.amplitudes
    a = jnp.linalg.norm(amp, axis=-1)
    safe = jnp.where(a > 0, a, 1.0)
    xi = amp / safe[:, None]
    kappa = field.wavevectors / jnp.linalg.norm(field.wavevectors, axis=-1, keepdims=True)
    eta = jnp.cross(kappa, xi)
    z = jax.random.normal(key, (amp.shape[0], 2), amp.dtype)
    new = (a / jnp.sqrt(jnp.asarray(2.0, amp.dtype)))[:, None] * (z[:, :1] * xi + z[:, 1:] * eta)
    return eqx.tree_at(lambda f: f.amplitudes, field, new)


@functools.partial(jax.jit, static_argnums=(2, 3))
def _realise(key, params: FieldParams, dt, exact_cos: bool) -> TurbulentField:
    # jit: one compiled kernel instead of ~50 eagerly dispatched ops; retraces only for new
    # static fields (n_modes, geometry, spectrum type), dtype or exact_cos.
    n = params.n_modes
    # All draws from one uniform block: a single threefry call keeps the compiled graph (and its
    # jvp/vjp) small. Rows: cos θ, φ, β, α, slab sign.
    u = jax.random.uniform(key, (5, n), dt)

    def f(v):
        return jnp.asarray(v, dt)

    # Wavenumbers: log-uniform grid, differentiable in lmin, lmax.
    two_pi = f(2.0 * np.pi)
    logk_lo = jnp.log(two_pi / f(params.lmax))
    logk_hi = jnp.log(two_pi / f(params.lmin))
    k = jnp.exp(logk_lo + (logk_hi - logk_lo) * jnp.linspace(0.0, 1.0, n, dtype=dt))

    # Amplitudes: softmax of log G_n is G_n/ΣG_m without overflow.
    w = jax.nn.softmax(params.spectrum.log_weights(k, f(params.Lc)))
    amp = jnp.sqrt(2.0 * f(params.sigma2) * w) * f(params.b0)

    b0_hat = _unit(f(params.b0_direction))
    if params.geometry == "isotropic":
        cos_t = 2.0 * u[0] - 1.0
        phi = np.pi * (2.0 * u[1] - 1.0)
        sin_t = jnp.sqrt(jnp.maximum(1.0 - cos_t * cos_t, 0.0))
        cp, sp = jnp.cos(phi), jnp.sin(phi)
        kappa = jnp.stack([sin_t * cp, sin_t * sp, cos_t], axis=-1)
        # Spherical unit vectors θ̂, φ̂ are ⊥ κ̂ and smooth in (θ, φ).
        e1 = jnp.stack([cos_t * cp, cos_t * sp, -sin_t], axis=-1)
        e2 = jnp.stack([-sp, cp, jnp.zeros_like(cp)], axis=-1)
    else:  # slab
        sign = jnp.where(u[4] < 0.5, f(1.0), f(-1.0))
        kappa = sign[:, None] * b0_hat[None, :]
        u1, u2 = _perp_basis(b0_hat)
        e1 = jnp.broadcast_to(u1, (n, 3))
        e2 = sign[:, None] * u2[None, :]  # keeps (e1, e2, κ̂) right-handed; any basis would do
    alpha = 2.0 * np.pi * u[3]
    xi = jnp.cos(alpha)[:, None] * e1 + jnp.sin(alpha)[:, None] * e2
    beta = 2.0 * np.pi * u[2]

    return TurbulentField(
        b0=f(params.b0) * b0_hat,
        wavevectors=k[:, None] * kappa,
        amplitudes=amp[:, None] * xi,
        phases=beta,
        exact_cos=exact_cos,
    )


def uniform_field(
    b0: float = 1.0, direction=(0.0, 0.0, 1.0), *, dtype=None, exact_cos: bool = False
) -> TurbulentField:
    """A field with no turbulent modes: B(x) = b0 · direction/|direction| everywhere (σ = 0)."""
    check_positive("b0", b0)
    dt = _dtype(dtype)
    d = jnp.asarray(direction, dt)
    if d.shape != (3,):
        raise ValueError(f"direction must have shape (3,); got shape {d.shape}")
    if is_concrete(d) and not (np.all(np.isfinite(np.asarray(d))) and np.linalg.norm(d) > 0):
        raise ValueError(f"direction must be a finite non-zero 3-vector; got {direction!r}")
    return TurbulentField(
        b0=jnp.asarray(b0, dt) * _unit(d),
        wavevectors=jnp.zeros((0, 3), dt),
        amplitudes=jnp.zeros((0, 3), dt),
        phases=jnp.zeros((0,), dt),
        exact_cos=exact_cos,
    )
