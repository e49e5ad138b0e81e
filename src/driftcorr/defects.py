"""Defective pixels (pure NumPy/SciPy kernels).

Isolated invalid pixels (hot, dead, corrupted) are not left as holes in a moving frame: a static hole that sits at
the same place in every frame puts a spike at zero lag into every masked correlation term, and the band-limited
interpolation of that spike biases the subpixel peak. Instead they are filled from their valid neighbours
(normalized convolution with a small Gaussian), so the filled frame moves with the pattern. Large invalid regions
(the beam-block) stay masked: their correlation terms vary smoothly with the lag.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi

from .threads import map_in_threads

#: Invalid regions of at most this many pixels are filled; larger ones stay masked.
MAX_FILLED_CLUSTER = 25
_FILL_RADIUS = 2
_FILL_SIGMA = 1.0


@dataclass(frozen=True, eq=False)
class FillPlan:
    """Where and how to fill isolated invalid pixels of frames that share one mask.

    Attributes
    ----------
    targets : ndarray of int, shape (k,)
        Flat indices of the pixels to fill.
    sources : ndarray of int, shape (k, w)
        Flat indices of their neighbours.
    weights : ndarray of float64, shape (k, w)
        Normalized weights of the neighbours (zero for invalid ones); each row sums to 1.
    mask : ndarray of bool
        The mask left after filling: False only on the large invalid regions.
    """

    targets: np.ndarray
    sources: np.ndarray
    weights: np.ndarray
    mask: np.ndarray


def plan_fill(mask: np.ndarray, *, max_cluster: int = MAX_FILLED_CLUSTER) -> FillPlan:
    """Plan the filling of the isolated invalid pixels of ``mask`` (True = valid).

    Parameters
    ----------
    mask : ndarray of bool
        Valid pixels of an image or volume.
    max_cluster : int
        Connected invalid regions of at most this many pixels are filled.

    Returns
    -------
    FillPlan
    """
    mask = np.asarray(mask, dtype=bool)
    invalid = ~mask
    labels, _ = ndi.label(invalid)
    sizes = np.bincount(labels.ravel())
    small = invalid & (sizes[labels] <= max_cluster) & (labels > 0)
    targets = np.flatnonzero(small)
    offsets = np.stack(np.meshgrid(*[np.arange(-_FILL_RADIUS, _FILL_RADIUS + 1)] * mask.ndim, indexing="ij"),
                       axis=-1).reshape(-1, mask.ndim)
    coords = np.stack(np.unravel_index(targets, mask.shape), axis=1)  # (k, ndim)
    neighbours = coords[:, None, :] + offsets[None, :, :]  # (k, w, ndim)
    inside = np.all((neighbours >= 0) & (neighbours < np.asarray(mask.shape)), axis=-1)
    clipped = np.clip(neighbours, 0, np.asarray(mask.shape) - 1)
    sources = np.ravel_multi_index(tuple(np.moveaxis(clipped, -1, 0)), mask.shape)
    weights = np.exp(-np.sum(offsets**2, axis=1) / (2 * _FILL_SIGMA**2))[None, :] * inside * mask.ravel()[sources]
    total = weights.sum(axis=1)
    fillable = total > 0
    first_valid = np.flatnonzero(mask.ravel())[:1]
    # Invalid neighbours point at a valid pixel with weight 0, so a NaN in a hole never leaks into a fill.
    sources = np.where(weights > 0, sources, first_valid[0] if first_valid.size else 0)
    result_mask = mask.copy()
    result_mask.ravel()[targets[fillable]] = True
    return FillPlan(targets=targets[fillable], sources=sources[fillable],
                    weights=weights[fillable] / total[fillable, None], mask=result_mask)


def fill_pixels(flat_frames: np.ndarray, fill: FillPlan) -> None:
    """Fill the planned pixels of frames in place.

    Parameters
    ----------
    flat_frames : ndarray, shape (n, pixels)
        Frames flattened over their spatial axes (a writable view).
    fill : FillPlan
    """
    if fill.targets.size == 0:
        return
    # float64 accumulation: a frame's filled values do not depend on how many frames share the call.
    values = np.einsum("nkw,kw->nk", flat_frames[:, fill.sources], fill.weights, dtype=np.float64)
    flat_frames[:, fill.targets] = values


#: Codes of :attr:`DefectMap.codes` (CF ``flag_values``/``flag_meanings``).
DEFECT_CODES = {"good": 0, "masked": 1, "hot": 2, "dead": 3, "stuck": 4, "unlit": 5}
#: A pixel is a defect when it misbehaves in at least this fraction of the lit sample frames.
_PERSISTENT = 0.75
#: Frames whose signal is below this fraction of the sample's median signal are dark (beam off) or blank.
_LIT_FRACTION = 0.5
#: A lit frame's signal (99th minus 1st percentile) exceeds this many times its pixel noise.
_LIT_OVER_NOISE = 7.0
#: Unlit regions smaller than this many pixels are left to the hot/dead rules.
_MIN_UNLIT_REGION = 50


@dataclass(frozen=True, eq=False)
class DefectMap:
    """Static pixel defects found from the temporal statistics of a sample of frames.

    Attributes
    ----------
    codes : ndarray of uint8, frame shape
        Per pixel: 0 good, 1 masked by the user, 2 hot (also where the user masked it), 3 dead, 4 stuck,
        5 unlit (see :data:`DEFECT_CODES`).
    n_frames : int
        Lit frames the statistics were taken over.
    """

    codes: np.ndarray
    n_frames: int

    @classmethod
    def from_mask(cls, mask, frame_shape: tuple[int, ...]) -> DefectMap:
        """The user's mask alone (None: every pixel good), before any detection."""
        valid = np.ones(frame_shape, bool) if mask is None else np.asarray(mask, dtype=bool)
        codes = np.where(valid, DEFECT_CODES["good"], DEFECT_CODES["masked"]).astype(np.uint8)
        return cls(codes=codes, n_frames=0)

    @property
    def mask(self) -> np.ndarray:
        """True where the pixel is used for registration."""
        return self.codes == DEFECT_CODES["good"]

    def counts(self) -> dict[str, int]:
        """Number of pixels of each kind."""
        return {name: int(np.count_nonzero(self.codes == code)) for name, code in DEFECT_CODES.items()}


def _noise_scale(x: np.ndarray) -> np.ndarray:
    """Robust per-frame noise from differences of neighbouring pixels (a smooth pattern hardly contributes).

    ``x`` has frames along its first axis; differences are taken along its last axis.
    """
    diff = np.diff(x, axis=-1).reshape(x.shape[0], -1)
    return 1.4826 * np.median(np.abs(diff), axis=1) / np.sqrt(2.0)


def lit_frames(frames) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which frames saw the beam: finite, with a signal well above their noise and at least half the median frame's.

    A dark frame's 99th and 1st percentiles differ by about 4.7 times its read noise; a lit frame's by far more.

    Parameters
    ----------
    frames : array_like, shape (n, *frame_shape)

    Returns
    -------
    lit : ndarray of bool, shape (n,)
    dark : ndarray, shape (n,)
        Dark level of each frame (1st percentile; NaN for non-finite frames).
    signal : ndarray, shape (n,)
        99th percentile minus the dark level.
    """
    frames = np.asarray(frames)
    # Every 4th row is plenty for percentiles and neighbour differences, at a quarter of the cost.
    flat = np.asarray(frames[:, ::4] if frames.ndim > 2 else frames, dtype=np.float64).reshape(len(frames), -1)
    finite = np.isfinite(frames.reshape(len(frames), -1)).all(axis=1)
    dark = np.full(len(flat), np.nan)
    signal = np.full(len(flat), np.nan)
    if finite.any():
        dark[finite] = np.percentile(flat[finite], 1, axis=1)
        signal[finite] = np.percentile(flat[finite], 99, axis=1) - dark[finite]
    lit = finite.copy()
    if finite.any():
        noise = _noise_scale(flat[finite])
        lit[finite] = ((signal[finite] > _LIT_OVER_NOISE * noise) & (signal[finite] > 0)
                       & (signal[finite] >= _LIT_FRACTION * np.median(signal[finite])))
    return lit, dark, signal


#: Batcher's odd-even merge sort of 8 values: 19 compare-exchanges (i, j), after which value i <= value j.
_SORT_8 = ((0, 1), (2, 3), (4, 5), (6, 7), (0, 2), (1, 3), (4, 6), (5, 7), (1, 2), (5, 6), (0, 4), (1, 5), (2, 6),
           (3, 7), (2, 4), (3, 5), (1, 2), (3, 4), (5, 6))


def neighbour_median(frame: np.ndarray) -> np.ndarray:
    """Upper median of each pixel's neighbours (the pixel itself left out), mirror boundaries, as float64.

    ``scipy.ndimage.rank_filter`` with the 3x3 (3x3x3) footprint without its centre, rank 4 (13). Integer 2-D
    frames go through a sorting network on their 8 shifted copies instead: the same values, 9 times as fast at
    512² (2.5 ms a frame).

    Parameters
    ----------
    frame : array_like, 2-D or 3-D
        One frame (any real dtype).

    Returns
    -------
    ndarray, float64, the frame's shape
    """
    frame = np.asarray(frame)
    if frame.ndim != 2 or frame.dtype.kind not in "biu":
        footprint = np.ones((3,) * frame.ndim, dtype=bool)
        footprint[(1,) * frame.ndim] = False
        return ndi.rank_filter(np.asarray(frame, dtype=np.float64), rank=footprint.sum() // 2, footprint=footprint,
                               mode="mirror")
    padded = np.pad(frame, 1, mode="reflect")  # NumPy's "reflect" is ndimage's "mirror"
    rows, cols = frame.shape
    values = [padded[i:i + rows, j:j + cols].copy() for i in range(3) for j in range(3) if (i, j) != (1, 1)]
    for i, j in _SORT_8:
        low = np.minimum(values[i], values[j])
        np.maximum(values[i], values[j], out=values[j])
        values[i] = low
    return values[4].astype(np.float64)


def detect_defects(sample, mask=None, *, find_unlit: bool | None = None, persistent: float = _PERSISTENT,
                   unlit_level: float = 0.02, workers: int = 1) -> DefectMap:
    """Find hot, dead, stuck and never-lit pixels from a sample of frames spread over a run.

    The pattern drifts and its intensity changes, but detector defects and the beam-block stay where they are.
    With ``x`` a frame minus its dark level (1st percentile) and ``s`` its noise, a pixel is

    - *hot* when ``x > 2 m + 5 s``, with ``m`` the median of its neighbours (a Bragg spot's peak pixel is about
      1.5x the median of its neighbours),
    - *dead* when ``x < m / 2 - 5 s``,
    - *unlit* (the beam-block and other regions that never see the beam) when ``x`` stays within
      ``max(5 s, unlit_level * (99th percentile of x))`` of the dark level, in a connected region of at least
      50 pixels, grown by one pixel for its penumbra,

    in at least a fraction ``persistent`` of the lit frames; and *stuck* when its value never changes while the
    frame does. Dark (beam-off), blank and non-finite frames are left out of the statistics.

    Parameters
    ----------
    sample : array_like, shape (n, *frame_shape)
        Frames from across the run (a few tens are enough).
    mask : array_like of bool, optional
        Pixels the user already marked valid (True); the others are coded 1 and not examined.
    find_unlit : bool, optional
        Look for unlit regions; default: only when no ``mask`` is given (a user's mask is trusted to cover the
        beam-block, and dim parts of the pattern still carry a little information).
    persistent : float
        Fraction of lit frames in which a pixel must misbehave to be a defect.
    unlit_level : float
        Signal level, relative to the frame's 99th percentile, below which a pixel counts as unlit.
    workers : int
        Threads examining frames at once (the result does not depend on it).

    Returns
    -------
    DefectMap
    """
    sample = np.asarray(sample)
    ndim = sample.ndim - 1
    frame_shape = sample.shape[1:]
    codes = DefectMap.from_mask(mask, frame_shape).codes
    user = codes == DEFECT_CODES["good"]
    lit, dark, signal = lit_frames(sample)
    if lit.sum() < 2:
        return DefectMap(codes=codes, n_frames=int(lit.sum()))
    # Next to the user's mask the neighbours include masked pixels (a dark beam-block): no fair comparison there.
    # Inside it they are all masked and the comparison is fair again (a hot pixel under the beam-block is found
    # and coded hot, so the outlier search can leave it out).
    structure = ndi.generate_binary_structure(ndim, ndim)
    testable = ndi.binary_erosion(user, structure, border_value=1) | ndi.binary_erosion(~user, structure,
                                                                                         border_value=1)

    def misbehaving(t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Too bright, too dark and dim pixels of lit frame ``t``."""
        x = np.asarray(sample[t], dtype=np.float64) - dark[t]
        margin = 5.0 * max(float(_noise_scale(x[None])[0]), 1e-12 * max(float(signal[t]), 1.0))
        # The median of the neighbours is not swayed by a neighbouring defect; "mirror" never counts the pixel.
        # Taken on the frame as stored, it is the same pixel's value as on x (x is the frame minus a constant).
        around = neighbour_median(np.asarray(sample[t])) - dark[t]
        return x > 2.0 * around + margin, x < 0.5 * around - margin, x < max(margin, unlit_level * float(signal[t]))

    # Frame by frame, counting: memory does not grow with the sample (a 1024² sample in float64 is 300 MB a copy).
    too_bright, too_dark, dim_count = (np.zeros(frame_shape, np.int32) for _ in range(3))
    for bright, dark_against_neighbours, dim in map_in_threads(misbehaving, np.flatnonzero(lit), workers):
        too_bright += bright
        too_dark += dark_against_neighbours
        dim_count += dim
    n_lit = int(lit.sum())
    # A masked pixel persistently brighter than its neighbours is coded hot even on the mask's inner edge, where
    # the comparison is not fair: it is not used anyway, and coded hot it is left out of the outlier search
    # (else it is a frame-local outlier of every frame, and every frame takes the slow per-frame-mask path).
    hot = (too_bright / n_lit >= persistent) & (testable | ~user)
    dead = (too_dark / n_lit >= persistent) & testable
    spread = np.ptp(sample[lit], axis=0)
    stuck = (spread == 0) & (spread.max() > 0) & ~hot & ~dead
    if find_unlit is None:
        find_unlit = mask is None
    dim = dim_count / n_lit >= max(persistent, 0.9)
    labels, _ = ndi.label(dim)
    sizes = np.bincount(labels.ravel())
    unlit = dim & (sizes[labels] >= _MIN_UNLIT_REGION) & (labels > 0) & find_unlit
    unlit = ndi.binary_dilation(unlit, structure=structure) & ~hot & ~dead & ~stuck
    for name, found in (("unlit", unlit & user), ("stuck", stuck & user), ("dead", dead & user), ("hot", hot)):
        codes[found] = DEFECT_CODES[name]
    return DefectMap(codes=codes, n_frames=int(lit.sum()))


@dataclass(frozen=True)
class IntensityLevels:
    """Intensity levels of a reference over its valid pixels, used to recognize frame-local outliers.

    Attributes
    ----------
    floor : float
        Dark level (1st percentile).
    mean : float
        Mean.
    peak : float
        Brightest valid pixel.
    """

    floor: float
    mean: float
    peak: float


#: Pixels brighter than this multiple of the reference's brightest signal (scaled to the frame) are outliers.
OUTLIER_FACTOR = 3.0
#: Outlier pixels are grown by this many pixels to cover the tails of a streak.
OUTLIER_GROWTH = 3


def intensity_levels(image, mask) -> IntensityLevels:
    """Dark level, mean and peak of ``image`` over the pixels where ``mask`` is True.

    The peak is taken after a 3-px median filter, so an isolated hot pixel that escaped detection does not raise
    it (a Bragg spot keeps about two thirds of its height).
    """
    image = np.asarray(image, dtype=np.float64)
    mask = np.asarray(mask, dtype=bool) & np.isfinite(image)
    if not mask.any():
        return IntensityLevels(np.nan, np.nan, np.nan)
    values = image[mask]
    smooth = ndi.median_filter(np.where(mask, image, np.median(values)), size=3, mode="mirror")[mask]
    return IntensityLevels(float(np.percentile(values, 1)), float(values.mean()), float(smooth.max()))


def outlier_ceiling(levels: IntensityLevels, scale, *, factor: float = OUTLIER_FACTOR):
    """Brightest value the pattern of a frame at ``scale`` times the reference's beam current can reach.

    ``floor + factor * scale * (peak - floor) + 8 sqrt(scale * (peak - floor))`` (see :func:`find_outliers`).
    """
    span = levels.peak - levels.floor
    scale = np.asarray(scale, dtype=np.float64)
    return levels.floor + factor * scale * span + 8.0 * np.sqrt(np.maximum(scale * span, 1.0))


def _masked_means(flat: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of each row of ``flat`` over the pixels ``mask`` holds, float64 (a row's mean does not depend on the
    other rows). Integer frames are summed exactly over the smaller of the two pixel sets (several times faster
    than a masked copy); others as float64 sums of a masked copy."""
    count = max(int(mask.sum()), 1)
    if flat.dtype.kind in "biu" and flat.dtype.itemsize <= 4:
        left_out = np.flatnonzero(~mask)
        if left_out.size <= count:
            total = flat.sum(axis=1, dtype=np.int64) - np.take(flat, left_out, axis=1).sum(axis=1, dtype=np.int64)
        else:
            total = np.take(flat, np.flatnonzero(mask), axis=1).sum(axis=1, dtype=np.int64)
        return total / count
    return np.where(mask, flat, 0).sum(axis=1, dtype=np.float64) / count


def find_outliers(frames, mask, levels: IntensityLevels, *, factor: float = OUTLIER_FACTOR,
                  growth: int = OUTLIER_GROWTH) -> np.ndarray:
    """Frame-local outliers (cosmic-ray streaks, saturated lines): pixels far brighter than the pattern can be.

    A frame ``g`` with valid-pixel mean ``m`` is the reference's pattern scaled by ``a = (m - floor) /
    (mean - floor)`` (beam current), give or take the changes of single rings. Its pixels above
    ``floor + factor * a * (peak - floor) + 8 sqrt(a * (peak - floor))`` cannot come from the pattern; they are
    grown by ``growth`` pixels so the streak's tails go with them.

    Parameters
    ----------
    frames : array_like, shape (n, *frame_shape)
    mask : array_like of bool, frame shape
        Pixels that are examined (True): leave out isolated static defects (hot pixels are always bright) but
        keep large masked regions such as the beam-block, so a streak crossing them is grown from both sides.
        The frame's mean level is taken over these pixels.
    levels : IntensityLevels
        Of the reference (:func:`intensity_levels`).
    factor : float
        Headroom over the brightest pattern pixel.
    growth : int
        Dilation of the outliers, px.

    Returns
    -------
    ndarray of bool, shape (n, *frame_shape)
        True at outlier pixels (grown into masked pixels too).
    """
    frames = np.asarray(frames)
    mask = np.asarray(mask, dtype=bool)
    ndim = mask.ndim
    mean = _masked_means(frames.reshape(len(frames), -1), mask.ravel())
    span = levels.peak - levels.floor
    if not np.isfinite(span) or span <= 0:
        return np.zeros(frames.shape, dtype=bool)
    scale = np.clip((mean - levels.floor) / max(levels.mean - levels.floor, 1e-12), 0.0, None)
    ceiling = outlier_ceiling(levels, scale, factor=factor)
    with np.errstate(invalid="ignore"):
        outliers = (frames > ceiling.reshape((-1,) + (1,) * ndim)) & mask
    if growth > 0:
        hit = np.flatnonzero(outliers.reshape(len(frames), -1).any(axis=1))
        structure = ndi.generate_binary_structure(ndim, ndim)
        for i in hit:
            outliers[i] = ndi.binary_dilation(outliers[i], structure=structure, iterations=growth)
    return outliers
