"""Per-frame quality flags and the drift trajectory (pure NumPy kernels)."""

from __future__ import annotations

import numpy as np

#: A trusted frame is an outlier when it is further than this from both its predictions, px ...
OUTLIER_MIN_PX = 0.3
#: ... and further than this many robust standard deviations of all frames' departures.
OUTLIER_SIGMAS = 6.0


def flag_frames(shift, ncc, *, min_ncc: float = 0.1, relative_ncc: float = 0.5, max_shift=None,
                outlier_px: float = OUTLIER_MIN_PX) -> np.ndarray:
    """Decide which registrations can be trusted.

    A frame is not trusted when its shift is not finite (NaN, blank or flat frame), when its peak NCC is low
    (below ``min_ncc``, or below ``relative_ncc`` times the run's median: a beam-off frame correlates far worse
    than its neighbours), when its shift lies on the edge of the search window (the peak may be beyond it), or
    when it is an outlier of the trajectory (:func:`trajectory_outliers`).

    Parameters
    ----------
    shift : ndarray, shape (n, ndim)
        Estimated shifts (NaN where registration failed).
    ncc : ndarray, shape (n,)
        Peak normalized cross-correlation of each frame.
    min_ncc : float
        Frames whose peak NCC is below this are not trusted.
    relative_ncc : float
        Frames whose peak NCC is below this fraction of the run's median peak NCC are not trusted.
    max_shift : sequence of int, optional
        The search window; shifts within half a pixel of its edge are not trusted.
    outlier_px : float
        Smallest departure from the running median that makes a trajectory outlier, px.

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
    if max_shift is not None:
        limit = np.asarray(max_shift, dtype=np.float64) - 0.5
        with np.errstate(invalid="ignore"):
            valid &= np.all(np.abs(shift) < limit, axis=1)
    valid &= ~trajectory_outliers(shift, valid, min_px=outlier_px)
    return valid


def trajectory_outliers(shift, valid, *, min_px: float = OUTLIER_MIN_PX, sigmas: float = OUTLIER_SIGMAS) -> np.ndarray:
    """Trusted frames whose shift agrees with neither side of the trajectory.

    Each trusted frame is predicted by linear extrapolation from its two previous trusted frames and from its two
    next ones. Slow or fast drift is followed from both sides and a sudden jump from one side (the frames after
    it); a frame registered onto a wrong peak disagrees with both. Its departure is the smaller of the two
    distances; it counts when it exceeds both ``min_px`` and ``sigmas`` robust standard deviations of all
    departures.

    Parameters
    ----------
    shift : ndarray, shape (n, ndim)
    valid : ndarray of bool, shape (n,)
        Frames taken into account.
    min_px, sigmas : float
        Thresholds on the departure.

    Returns
    -------
    ndarray of bool, shape (n,)
    """
    shift = np.asarray(shift, dtype=np.float64)
    valid = np.asarray(valid, dtype=bool)
    outliers = np.zeros(len(shift), dtype=bool)
    index = np.flatnonzero(valid)
    if index.size < 5:
        return outliers
    s = shift[index]
    t = index.astype(np.float64)[:, None]
    # Extrapolate along the line through the two neighbours, at the frame's own position (gaps allowed).
    from_left = s[1:-1] + (s[1:-1] - s[:-2]) * (t[2:] - t[1:-1]) / (t[1:-1] - t[:-2])
    from_right = s[1:-1] + (s[1:-1] - s[2:]) * (t[1:-1] - t[:-2]) / (t[2:] - t[1:-1])
    departure = np.full((len(s), 2), np.inf)
    departure[2:, 0] = np.linalg.norm(s[2:] - from_left, axis=1)
    departure[:-2, 1] = np.linalg.norm(s[:-2] - from_right, axis=1)
    closest = departure.min(axis=1)
    spread = 1.4826 * np.median(closest)
    outliers[index] = closest > max(min_px, sigmas * spread)
    return outliers


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
