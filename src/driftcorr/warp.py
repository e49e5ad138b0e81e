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
        if not np.all(np.isfinite(shift)):
            out[i] = cval
            continue
        ndi.shift(np.asarray(frame, dtype=dtype), shift, output=out[i], order=order, mode="constant", cval=cval,
                  prefilter=order > 1)
    return out
