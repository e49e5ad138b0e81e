"""Shifting frames (driftcorr.warp): the same result as ``scipy.ndimage.shift`` in constant mode, faster."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from driftcorr.errors import InputError
from driftcorr.warp import shift_frames

SHIFTS = np.array([[2.3, -1.7], [0.0, 0.0], [-3.99, 4.01], [0.5, 0.5], [3.0, -2.0], [np.nan, 1.0]])


def _scipy(frames, shifts, order, dtype):
    return np.stack([ndi.shift(frame.astype(dtype), shift, order=order, mode="constant", cval=np.nan)
                     if np.all(np.isfinite(shift)) else np.full(frame.shape, np.nan)
                     for frame, shift in zip(frames, shifts, strict=True)])


@pytest.mark.parametrize("order", [0, 1, 2, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_scipy_shift(order, dtype):
    rng = np.random.default_rng(order)
    frames = (ndi.gaussian_filter(rng.random((len(SHIFTS), 70, 90)), (0, 2, 2)) * 4000).astype(np.uint16)
    out = shift_frames(frames, SHIFTS, order=order, dtype=dtype)
    expected = _scipy(frames, SHIFTS, order, dtype)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))  # same pixels come from outside
    tolerance = 1e-6 * 4000 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(out, expected, atol=tolerance, rtol=0)


def test_volumes_and_shifts_beyond_the_frame():
    rng = np.random.default_rng(3)
    volumes = ndi.gaussian_filter(rng.random((2, 12, 16, 20)), (0, 1, 1, 1))
    shifts = np.array([[1.25, -0.5, 2.75], [0.0, 30.0, 0.0]])
    out = shift_frames(volumes, shifts, dtype=np.float64)
    np.testing.assert_allclose(out[0], _scipy(volumes[:1], shifts[:1], 3, np.float64)[0], atol=1e-9)
    assert np.isnan(out[1]).all()  # moved out of the frame entirely


def test_bad_shifts_are_refused():
    with pytest.raises(InputError, match="shape"):
        shift_frames(np.zeros((2, 8, 8)), np.zeros((3, 2)))
    with pytest.raises(InputError, match="order"):
        shift_frames(np.zeros((1, 8, 8)), np.zeros((1, 2)), order=6)


@pytest.mark.parametrize("order", [1, 3, 5])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_frames_of_many_tiles_equal_scipy_shift(order, dtype):
    """Frames long enough that each axis operator is assembled from a model line (first, middle, last tiles)."""
    rng = np.random.default_rng(10 + order)
    frames = (ndi.gaussian_filter(rng.random((3, 260, 1100)), (0, 1.5, 1.5)) * 4000
              + rng.poisson(40, (3, 260, 1100))).astype(np.uint16)
    shifts = np.array([[2.3, -1.7], [-7.49, 0.001], [0.0, 40.5]])
    out = shift_frames(frames, shifts, order=order, dtype=dtype)
    expected = _scipy(frames, shifts, order, dtype)
    np.testing.assert_array_equal(np.isnan(out), np.isnan(expected))
    tolerance = 1e-6 * 4000 if dtype == np.float32 else 1e-9
    np.testing.assert_allclose(out, expected, atol=tolerance, rtol=0)
