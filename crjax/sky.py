"""HEALPix directions and map helpers (RING ordering throughout, as in the seed §3)."""

from __future__ import annotations

import healpy as hp
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._checks import check_nside

__all__ = ["healpix_directions", "npix_to_nside"]


def healpix_directions(nside: int | float, *, dtype=None) -> Float[Array, "npix 3"]:
    """Unit vectors of the HEALPix pixel centres, RING order, Npix = 12 nside².

    These are the initial *momentum* directions p̂ of the particles observed at Earth (seed §3):
    pixel i of every crjax map means the momentum direction p̂_i. The arrival direction on the sky
    is −p̂_i; see ``docs/design.md``.
    """
    check_nside(nside)
    vec = np.stack(hp.pix2vec(nside, np.arange(hp.nside2npix(nside)), nest=False), axis=-1)
    return jnp.asarray(vec, dtype=dtype)


def npix_to_nside(npix: int) -> int:
    """nside of a HEALPix map with ``npix`` pixels; ValueError if npix is not 12·nside²."""
    nside = int(round(np.sqrt(npix / 12)))
    if npix < 12 or 12 * nside * nside != npix or (nside & (nside - 1)) != 0:
        raise ValueError(
            f"map length must be 12*nside**2 with nside a power of two (12, 48, 192, ...); got {npix}"
        )
    return nside
