import healpy as hp
import numpy as np
import pytest

from crjax import healpix_directions, npix_to_nside


@pytest.mark.parametrize("nside", [1, 2, 8])
def test_directions_are_healpix_ring_centres(nside):
    d = np.asarray(healpix_directions(nside))
    assert d.shape == (12 * nside**2, 3)
    # Reference: healpy's own pixel centres, RING order; unit vectors to round-off.
    np.testing.assert_allclose(d, np.stack(hp.pix2vec(nside, np.arange(len(d))), -1), atol=1e-15)
    np.testing.assert_allclose(np.linalg.norm(d, axis=-1), 1.0, atol=1e-15)


@pytest.mark.parametrize("bad", [0, 3, 12, -4, 2.0, True])
def test_bad_nside_is_rejected(bad):
    with pytest.raises(ValueError, match="nside must be a power of two"):
        healpix_directions(bad)


def test_npix_to_nside():
    assert npix_to_nside(768) == 8
    with pytest.raises(ValueError, match="12\\*nside\\*\\*2"):
        npix_to_nside(100)
