"""Apply per-frame shifts to frames (pure NumPy/SciPy kernel)."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

from .errors import InputError


def shift_frames(frames, shifts, *, order: int = 3, cval: float = np.nan, dtype=np.float32) -> np.ndarray:
    """Shift each frame by its own (subpixel) shift with spline interpolation.

    Parameters
    ----------
    frames : array_like, shape (n, *frame_shape)
        Frames to shift.
    shifts : array_like, shape (n, ndim)
        Shift of each frame in array axis order, px (driftcorr's ``shift``: applying it registers the frame onto
        the reference). A frame whose shift is not finite comes out filled with ``cval``.
    order : int
        Spline order, 0 to 5 (1: linear, 3: cubic).
    cval : float
        Value of pixels that come from outside the frame.
    dtype : dtype
        Floating output dtype.

    Returns
    -------
    ndarray, shape (n, *frame_shape)
    """
    frames = np.asarray(frames)
    shifts = np.asarray(shifts, dtype=np.float64)
    if shifts.shape != (frames.shape[0], frames.ndim - 1):
        raise InputError(f"shifts must have shape ({frames.shape[0]}, {frames.ndim - 1}) (got {shifts.shape})")
    if not 0 <= order <= 5:
        raise InputError(f"interpolation order must be between 0 and 5 (got {order})")
    out = np.empty(frames.shape, dtype=dtype)
    for i, (frame, shift) in enumerate(zip(frames, shifts, strict=True)):
        out[i] = shift_frame(frame, shift, order=order, cval=cval, dtype=dtype)
    return out


def shift_frame(frame, shift, *, order: int = 3, cval: float = np.nan, dtype=np.float32) -> np.ndarray:
    """Shift one frame by a constant (subpixel) shift: what ``scipy.ndimage.shift`` does, faster.

    The shift is the same for every pixel, so the spline interpolation is a short filter per axis (its taps are
    the interpolation weights at the fractional shift, read from ``scipy.ndimage.shift`` itself) after the spline
    prefilter, followed by a whole-pixel move. Pixels whose source lies outside the frame get ``cval`` (as
    ``mode="constant"``); the others equal ``scipy.ndimage.shift(frame, shift, order, mode="constant")`` to
    rounding (computed in float32 when ``dtype`` is float32, else float64). About 3.5 times as fast at 512².
    """
    dtype = np.dtype(dtype)
    work = np.float32 if dtype == np.float32 else np.float64
    shift = np.asarray(shift, dtype=np.float64)
    out = np.full(frame.shape, cval, dtype=dtype)
    if not np.all(np.isfinite(shift)):
        return out
    frame = np.asarray(frame)
    ndim = frame.ndim
    fractions = shift - np.floor(shift)
    # Each axis is filtered where it is the last, contiguous one (several times faster than along a strided axis):
    # the conversion copy puts axis 0 last, then each pass moves the last axis to the front.
    axes = [*range(1, ndim), 0]  # the frame's axis at each position of coef
    coef = np.empty([frame.shape[a] for a in axes], dtype=work)
    coef[...] = frame.transpose(axes)
    roll = [ndim - 1, *range(ndim - 1)]
    for step in range(ndim):
        if order > 1:
            ndi.spline_filter1d(coef, order=order, axis=-1, mode="mirror", output=coef)
        coef = ndi.correlate1d(coef, _interpolation_taps(float(fractions[axes[-1]]), order), axis=-1, mode="mirror")
        if step < ndim - 1:
            coef = np.ascontiguousarray(coef.transpose(roll))
            axes = [axes[a] for a in roll]
    coef = coef.transpose(np.argsort(axes))
    source, target = [], []
    for size, move in zip(frame.shape, shift, strict=True):
        # Output pixel x comes from x - move, which must lie in [0, size - 1].
        first, last = max(int(np.ceil(move)), 0), min(int(np.floor(move + size - 1)), size - 1)
        if last < first:
            return out
        step = int(np.floor(move))
        target.append(slice(first, last + 1))
        source.append(slice(first - step, last + 1 - step))
    out[tuple(target)] = coef[tuple(source)]
    return out


def _interpolation_taps(fraction: float, order: int) -> np.ndarray:
    """Weights (for ``correlate1d``, centred) that move spline coefficients by ``fraction`` px (0 <= fraction < 1)."""
    length = 2 * (order + 2) + 1
    centre = length // 2
    impulse = np.zeros(length)
    impulse[centre] = 1.0
    response = ndi.shift(impulse, fraction, order=order, prefilter=False, mode="constant", cval=0.0)[::-1]
    used = np.flatnonzero(response)
    half = max(centre - used[0], used[-1] - centre) if used.size else 0
    return response[centre - half:centre + half + 1]
