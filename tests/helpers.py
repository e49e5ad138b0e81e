"""Plain helper functions shared by the tests (the fixtures in conftest.py wrap them)."""

from __future__ import annotations

import dask
import numpy as np
from scipy import fft as sfft
from scipy import ndimage as ndi


def smooth_field(shape: tuple[int, ...], seed: int, sigma: float = 2.0) -> np.ndarray:
    """A smooth random image or volume (Gaussian-filtered uniform noise), float64."""
    rng = np.random.default_rng(seed)
    return ndi.gaussian_filter(rng.random(shape), sigma)


def shifted_crop(big: np.ndarray, shift, size: int) -> np.ndarray:
    """Centre crop (side ``size``) of ``big`` with its content moved by ``shift`` (Fourier shift, exact).

    ``moving(x) = big(x - shift)``, so the registration shift of the result onto the unshifted crop is ``-shift``.
    The crop keeps the circular wrap-around of the Fourier shift away from the borders.
    """
    shift = np.broadcast_to(np.asarray(shift, dtype=np.float64), (big.ndim,))
    moved = sfft.ifftn(ndi.fourier_shift(sfft.fftn(big), shift)).real
    start = [(n - size) // 2 for n in big.shape]
    return moved[tuple(slice(s, s + size) for s in start)]


class ComputeCounter:
    """A Dask scheduler (``get``) that counts how many graphs were computed."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, dsk, keys, **kwargs):
        self.calls += 1
        return dask.get(dsk, keys, **kwargs)


def rms_error(shift: np.ndarray, truth: np.ndarray) -> float:
    """RMS length of the shift error vectors (px)."""
    error = np.asarray(shift, dtype=np.float64) - np.asarray(truth, dtype=np.float64)
    return float(np.sqrt(np.mean(np.sum(error**2, axis=-1))))
