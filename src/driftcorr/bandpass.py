"""Mask-aware band-pass filtering (pure NumPy/SciPy kernel).

A difference of Gaussians computed by normalized convolution (Knutsson & Westin 1993): each Gaussian smoothing
is divided by the same smoothing of the mask, so masked pixels neither pull the result towards zero nor leave a
step at the mask's edge. The low-pass scale averages shot noise over neighbouring pixels; the high-pass scale
removes a slowly varying background.

It is optional (``bandpass`` in the configuration): the masked NCC already weighs the pattern as a matched filter.
On the synthetic runs of ``benchmarks/bandpass.py`` a (1, 12) px band-pass lowered the error by ~15 % at 0.01x
counts and did nothing or harm at 0.1x counts.

References
----------
.. [1] H. Knutsson and C.-F. Westin, "Normalized and differential convolution", Proc. IEEE CVPR, 515-523 (1993).
       :DOI:`10.1109/CVPR.1993.341081`
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError

#: Normalizer values below this are treated as "no valid pixel nearby".
_MIN_WEIGHT = 1e-3


@dataclass(frozen=True)
class BandPass:
    """Scales of a difference-of-Gaussians band-pass, px (``high`` None: low-pass only)."""

    low: float
    high: float | None = None

    def __post_init__(self):
        if not self.low > 0 or (self.high is not None and not self.high > self.low):
            raise InputError(f"bandpass needs 0 < low < high (got low={self.low!r}, high={self.high!r}); "
                             "e.g. bandpass = [1, 12]")


def bandpass_frames(frames, mask, band: BandPass, *, keep=None, dtype=np.float32) -> np.ndarray:
    """Band-pass frames by normalized convolution.

    Parameters
    ----------
    frames : array_like, shape (n, *frame_shape)
    mask : array_like of bool, frame shape or (n, *frame_shape)
        Valid pixels (one mask for all frames, or one per frame).
    band : BandPass
    keep : array_like of bool, optional
        Pixels whose filtered value is returned (default ``mask``): pass a larger mask to keep the values the
        normalized convolution gives isolated holes, which it fills from their neighbours.
    dtype : dtype
        Floating output dtype.

    Returns
    -------
    ndarray, shape (n, *frame_shape)
        The filtered frames; 0 where ``keep`` is False.
    """
    frames = np.asarray(frames, dtype=dtype)
    mask = np.asarray(mask, dtype=bool)
    ndim = frames.ndim - 1
    weights = mask.astype(dtype)
    clean = np.where(mask, frames, 0).astype(dtype)
    out = _normalized(clean, weights, band.low, ndim)
    if band.high is not None:
        out -= _normalized(clean, weights, band.high, ndim)
    out *= mask if keep is None else np.asarray(keep, dtype=bool)
    return out


def _normalized(values: np.ndarray, weights: np.ndarray, sigma: float, ndim: int) -> np.ndarray:
    """Gaussian smoothing of ``values`` over the pixels where ``weights`` is 1, divided by that of the weights."""
    sigmas = (0,) * (values.ndim - ndim) + (sigma,) * ndim
    numerator = ndi.gaussian_filter(values * weights, sigmas, mode="mirror")
    weight_sigmas = (0,) * (weights.ndim - ndim) + (sigma,) * ndim
    denominator = ndi.gaussian_filter(weights, weight_sigmas, mode="mirror")
    return numerator / np.maximum(denominator, _MIN_WEIGHT)
