"""Per-frame quality flags and the drift trajectory (pure NumPy kernels)."""

from __future__ import annotations

import numpy as np


def flag_frames(shift, ncc, *, min_ncc: float = 0.1, relative_ncc: float = 0.5) -> np.ndarray:
    """Decide which registrations can be trusted.

    Parameters
    ----------
    shift : ndarray, shape (n, ndim)
        Estimated shifts (NaN where registration failed).
    ncc : ndarray, shape (n,)
        Peak normalized cross-correlation of each frame.
    min_ncc : float
        Frames whose peak NCC is below this are not trusted.
    relative_ncc : float
        Frames whose peak NCC is below this fraction of the run's median peak NCC are not trusted
        (a beam-off or ruined frame correlates far worse than its neighbours).

    Returns
    -------
    ndarray of bool, shape (n,)
        True where the frame's shift is trusted.
    """
    shift = np.asarray(shift, dtype=np.float64)
    ncc = np.asarray(ncc, dtype=np.float64)
    valid = np.all(np.isfinite(shift), axis=1) & np.isfinite(ncc)
    if valid.any():
        threshold = max(min_ncc, relative_ncc * float(np.median(ncc[valid])))
        valid &= ncc >= threshold
    return valid


def fill_invalid(shift, valid) -> np.ndarray:
    """Replace the shifts of untrusted frames by linear interpolation between trusted neighbours.

    Frames before the first (after the last) trusted frame take its shift. With no trusted frame at all the
    shifts are NaN.

    Parameters
    ----------
    shift : ndarray, shape (n, ndim)
    valid : ndarray of bool, shape (n,)

    Returns
    -------
    ndarray, shape (n, ndim), float64
    """
    shift = np.asarray(shift, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    out = shift.copy()
    if not valid.any():
        out[:] = np.nan
        return out
    frames = np.arange(shift.shape[0])
    for axis in range(shift.shape[1]):
        out[~valid, axis] = np.interp(frames[~valid], frames[valid], shift[valid, axis])
    return out
