"""Choosing and building the reference (pure NumPy kernels).

A reference is written as

- a frame index (``0``, ``-1``);
- ``mean:A:B`` or ``median:A:B``: the mean or median of frames A to B-1 (Python slice semantics), as they are;
- ``iterative`` or ``iterative:A:B`` (the default): a sample of frames spread over the run (or over frames A to
  B-1) is registered onto its first good frame, the aligned frames are averaged, and the sample is registered
  again onto that average, :data:`ITERATIONS` times. The result lies in the coordinates of that first good frame
  (the *anchor*), is far less noisy than one frame, and does not depend on frame 0 being good.
- ``pairs`` or ``pairs:A:B``: the same sample, but each frame is registered onto its next
  :data:`PAIR_NEIGHBOURS` frames; the positions that best explain all those redundant pair shifts are solved by
  weighted least squares (:func:`solve_positions`, pairs that disagree with the rest are dropped), and the frames
  aligned by them are averaged. No frame's noise is privileged, and a pair spoilt by one bad frame is outvoted.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from .defects import find_outliers, intensity_levels, lit_frames
from .errors import InputError
from .registration import RegistrationResult, make_plan, register_frames
from .residual import shifted_mask
from .threads import map_in_threads
from .trajectory import flag_frames
from .warp import shift_frame

KINDS = ("frame", "mean", "median", "iterative", "pairs")
#: Kinds built from a sample spread over the range rather than from every frame of it.
SAMPLED = ("iterative", "pairs")
FORMS = ("a frame index such as 0, iterative, pairs, or mean:A:B / median:A:B / iterative:A:B / pairs:A:B "
          "for frames A..B-1")
#: Pixels registered at once (a batch of frames): the batch's spectra, not the sample's, are held in memory.
BATCH_PIXELS = 4 * 2**20
#: Rounds of register-and-average of the iterative reference.
ITERATIONS = 2
#: Each sample frame of the pairs reference is registered onto this many following frames.
PAIR_NEIGHBOURS = 3
#: A pair shift this many of its sigmas from the solved positions is dropped as an outlier.
PAIR_OUTLIER_SIGMAS = 5.0


@dataclass(frozen=True)
class ReferenceSpec:
    """Which frames make the reference and how they are combined."""

    kind: str
    start: int
    stop: int

    @property
    def frames(self) -> range:
        """Frame indices the reference is built from."""
        return range(self.start, self.stop)

    def __str__(self) -> str:
        return str(self.start) if self.kind == "frame" else f"{self.kind}:{self.start}:{self.stop}"


def parse_reference(value, n_frames: int) -> ReferenceSpec:
    """Parse a reference specification against a stack of ``n_frames`` frames.

    Parameters
    ----------
    value : int or str
        ``5``, ``"-1"``, ``"mean:0:20"``, ``"median:10:30"``, ``"iterative"`` or ``"iterative:0:500"``.
    n_frames : int
        Number of frames in the stack.

    Returns
    -------
    ReferenceSpec
        With non-negative, in-range indices.
    """
    text = str(value).strip()
    if isinstance(value, bool):
        raise InputError(f"reference must be {FORMS} (got {value!r})")
    if text in SAMPLED:
        return ReferenceSpec(text, 0, n_frames)
    if ":" not in text:
        try:
            index = int(text)
        except ValueError:
            raise InputError(f"reference must be {FORMS} (got {value!r})") from None
        if not -n_frames <= index < n_frames:
            raise InputError(f"reference frame {index} is out of range for a stack of {n_frames} frames; "
                             f"use an index from 0 to {n_frames - 1}")
        index %= n_frames
        return ReferenceSpec("frame", index, index + 1)
    parts = text.split(":")
    if len(parts) != 3 or parts[0] not in KINDS[1:]:
        raise InputError(f"reference must be {FORMS} (got {value!r})")
    try:
        start, stop = int(parts[1]), int(parts[2])
    except ValueError:
        raise InputError(f"reference must be {FORMS} (got {value!r})") from None
    start_, stop_, _ = slice(start, stop).indices(n_frames)
    if stop_ <= start_ or start < -n_frames or start >= n_frames:
        raise InputError(f"reference range {value!r} selects no frame of a stack of {n_frames} frames")
    return ReferenceSpec(parts[0], start_, stop_)


def combine_frames(frames, kind: str) -> np.ndarray:
    """Combine frames into one reference image.

    Parameters
    ----------
    frames : array_like, shape (n, *frame_shape)
    kind : {"frame", "mean", "median"}
        ``"frame"`` requires exactly one frame (the iterative reference is built by :func:`iterative_reference`).

    Returns
    -------
    ndarray, float64, shape frame_shape
    """
    frames = np.asarray(frames, dtype=np.float64)
    if kind == "frame":
        if frames.shape[0] != 1:
            raise InputError(f"a frame reference needs exactly one frame (got {frames.shape[0]})")
        return frames[0]
    if kind == "mean":
        return np.mean(frames, axis=0)
    if kind == "median":
        return np.median(frames, axis=0)
    raise InputError(f"reference kind must be one of {KINDS[:3]} (got {kind!r})")


@dataclass(frozen=True, eq=False)
class BuiltReference:
    """A reference image made from several frames.

    Attributes
    ----------
    image : ndarray, float64, frame shape
        The reference (0 where ``mask`` is False).
    mask : ndarray of bool, frame shape
        Where enough aligned frames contributed.
    anchor : int
        Index, in the sample, of the frame whose coordinates the reference lies in.
    n_frames : int
        Frames averaged in the last round.
    """

    image: np.ndarray
    mask: np.ndarray
    anchor: int
    n_frames: int


def _nearest_valid(mask: np.ndarray):
    """Index arrays of each pixel's nearest valid pixel (None when every pixel is valid)."""
    if mask.all():
        return None
    return tuple(ndi.distance_transform_edt(~mask, return_distances=False, return_indices=True))


def _fill_from_nearest(frame: np.ndarray, nearest) -> np.ndarray:
    """Give masked pixels the value of their nearest valid pixel, so interpolation does not ring at the mask."""
    return frame if nearest is None else frame[nearest]


def align_and_average(frames, shifts, mask, template, template_mask, *, min_coverage: float = 0.5,
                      order: int = 3, workers: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Shift frames onto a template, match their intensity to it and average them where they are valid.

    Frame-local outliers (pixels far brighter than the template's pattern, :func:`driftcorr.defects.find_outliers`)
    are left out of their frame's contribution.

    Parameters
    ----------
    frames : ndarray, shape (n, *frame_shape)
    shifts : ndarray, shape (n, ndim)
        Shifts registering each frame onto the template.
    mask : ndarray of bool, frame shape
        Valid pixels of the frames (static: it moves with each frame when shifted).
    template, template_mask : ndarray
        Image the gain and offset of each aligned frame are fitted to (``aligned = a * template + b``).
    min_coverage : float
        A pixel of the average is valid where at least this fraction of the frames were valid there.
    order : int
        Spline order of the shift.
    workers : int
        Threads aligning frames at once (the result does not depend on it).

    Returns
    -------
    image : ndarray, float64
        The average (0 where invalid).
    valid : ndarray of bool
    """
    frames = np.asarray(frames, dtype=np.float64)
    # A cosmic-ray streak in one of the frames must not be averaged into the reference.
    masks = mask & ~find_outliers(frames, mask, intensity_levels(template, template_mask))
    static_nearest = _nearest_valid(mask)

    def aligned(t: int):
        """Frame ``t`` aligned and matched to the template (0 where it is not valid) and where it is valid (or
        None)."""
        frame_mask, shift = masks[t], shifts[t]
        nearest = static_nearest if np.array_equal(frame_mask, mask) else _nearest_valid(frame_mask)
        frame = shift_frame(_fill_from_nearest(frames[t], nearest), shift, order=order, cval=np.nan,
                            dtype=np.float64)
        ok = (_coverage(frame_mask, shift) > 0.999) & np.isfinite(frame)
        common = ok & template_mask
        if common.sum() < 2:
            return None
        gain, offset = _gain_and_offset(template[common], frame[common])
        if not np.isfinite(gain) or gain <= 0:
            return None
        matched = np.zeros(frame.shape)
        matched[ok] = (frame[ok] - offset) / gain
        return matched, ok

    total = np.zeros(frames.shape[1:])
    count = np.zeros(frames.shape[1:])
    # Summed one frame at a time, in order: only the running sums are kept, whatever the sample's size.
    for result in map_in_threads(aligned, range(len(frames)), workers):
        if result is None:
            continue
        matched, ok = result
        total += matched  # adding 0 where the frame is not valid leaves the sum as it was
        count += ok
    used = int(count.max()) if count.size else 0
    image_mask = count >= max(1, min_coverage * used)
    image = np.where(image_mask, total / np.maximum(count, 1), 0.0)
    return image, image_mask


def _coverage(mask: np.ndarray, shift) -> np.ndarray:
    """The mask moved by ``shift`` with linear interpolation: the weight of valid pixels at each output pixel."""
    shift = np.asarray(shift, dtype=np.float64)
    low = np.floor(shift).astype(int)
    fraction = shift - low
    coverage = np.zeros(mask.shape)
    for corner in itertools.product((0, 1), repeat=mask.ndim):
        weight = float(np.prod([f if c else 1.0 - f for c, f in zip(corner, fraction, strict=True)]))
        if weight > 0:
            coverage += weight * shifted_mask(mask, low + np.asarray(corner))
    return coverage


def _gain_and_offset(template: np.ndarray, frame: np.ndarray) -> tuple[float, float]:
    """Least-squares ``frame ≈ gain * template + offset``."""
    t_mean, f_mean = template.mean(), frame.mean()
    centred = template - t_mean
    norm = float(centred @ centred)
    if not norm > 0:
        return float("nan"), float("nan")
    gain = float(centred @ (frame - f_mean)) / norm
    return gain, float(f_mean - gain * t_mean)


def _register_in_batches(plan, frames: np.ndarray, upsample_factor: float, workers: int = 1) -> RegistrationResult:
    """:func:`register_frames` over ``frames`` a few at a time, ``workers`` batches at once (about
    :data:`BATCH_PIXELS` in all; a frame's result does not depend on its batch)."""
    batch = max(1, BATCH_PIXELS // (int(np.prod(frames.shape[1:])) * max(1, workers)))
    parts = list(map_in_threads(lambda start: register_frames(plan, frames[start:start + batch],
                                                              upsample_factor=upsample_factor),
                                range(0, len(frames), batch), workers))
    return RegistrationResult(**{name: np.concatenate([getattr(part, name) for part in parts])
                                 for name in RegistrationResult.__dataclass_fields__})


def _lit_sample(sample) -> tuple[np.ndarray, int]:
    """The lit frames of a sample (float64) and the index in the sample of the first, the anchor.

    Only the lit frames are converted to float64 (one copy: at 1024² a sample of 36 frames is 300 MB a copy).
    """
    sample = np.asarray(sample)
    lit, _, _ = lit_frames(sample)
    if not lit.any():
        raise InputError("no frame of the reference sample saw the beam (all dark, blank or NaN); "
                         "choose the reference frames with --reference")
    return np.asarray(sample[lit], dtype=np.float64), int(np.flatnonzero(lit)[0])


def iterative_reference(sample, mask, *, iterations: int = ITERATIONS, max_shift=None,
                        upsample_factor: float = 20, min_ncc: float = 0.1, bright_pixels=None,
                        workers: int = 1) -> BuiltReference:
    """Build a low-noise reference by registering a sample of frames and averaging the aligned frames.

    The first lit frame of the sample is the anchor: the sample is registered onto it, the trusted frames are
    aligned, matched in intensity and averaged (:func:`align_and_average`), and the sample is registered again
    onto the average, ``iterations`` times in all.

    Parameters
    ----------
    sample : array_like, shape (n, *frame_shape)
        Frames spread over the run (a few tens).
    mask : ndarray of bool, frame shape
        Valid pixels of every frame (beam-block and defects False).
    iterations : int
        Rounds of register-and-average.
    max_shift : int or sequence of int, optional
        Largest shift searched.
    upsample_factor : float
        Subpixel precision of the sample's registration.
    min_ncc : float
        Frames correlating worse are left out of the average.
    bright_pixels : ndarray of bool, optional
        Known static bright pixels (see :func:`driftcorr.registration.make_plan`).
    workers : int
        Threads registering and aligning frames at once (the result does not depend on it).

    Returns
    -------
    BuiltReference
    """
    good, anchor = _lit_sample(sample)
    mask = np.asarray(mask, dtype=bool)
    image, image_mask, used = good[0], mask, 1
    for _ in range(max(int(iterations), 1)):
        plan = make_plan(image, reference_mask=image_mask, moving_mask=mask, max_shift=max_shift,
                         bright_pixels=bright_pixels)
        result = _register_in_batches(plan, good, upsample_factor, workers)
        trusted = flag_frames(result.shift, result.ncc, min_ncc=min_ncc)
        if not trusted.any():
            break
        kept = good if trusted.all() else good[trusted]  # no copy of the sample when every frame is trusted
        image, image_mask = align_and_average(kept, result.shift[trusted], mask, image, image_mask, workers=workers)
        used = int(trusted.sum())
    return BuiltReference(image=image, mask=image_mask, anchor=anchor, n_frames=used)


def solve_positions(first, second, shifts, sigmas, n_frames: int, anchor: int = 0,
                    outlier_sigmas: float = PAIR_OUTLIER_SIGMAS) -> tuple[np.ndarray, np.ndarray]:
    """Frame positions that best explain redundant pair shifts (weighted least squares).

    Pair ``k`` measured ``positions[second[k]] - positions[first[k]] = shifts[k]`` with uncertainty
    ``sigmas[k]`` (per axis); ``positions[anchor]`` is 0. After each solve the pair furthest from the solution, if
    more than ``outlier_sigmas`` of its sigmas, is dropped and the rest solved again.

    Parameters
    ----------
    first, second : array_like of int, shape (m,)
        The two frames of each pair.
    shifts, sigmas : array_like, shape (m, ndim)
        Measured differences and their 1-sigma uncertainties (positive).
    n_frames : int
        Number of frames.
    anchor : int
        The frame whose position is 0.
    outlier_sigmas : float
        Drop threshold, in sigmas.

    Returns
    -------
    positions : ndarray, shape (n_frames, ndim)
        NaN for frames no kept pair connects to the anchor.
    kept : ndarray of bool, shape (m,)
        Pairs used in the final solution.
    """
    first, second = np.asarray(first, dtype=np.intp), np.asarray(second, dtype=np.intp)
    shifts, sigmas = np.asarray(shifts, dtype=np.float64), np.asarray(sigmas, dtype=np.float64)
    kept = np.all(np.isfinite(shifts), axis=1) & np.all(np.isfinite(sigmas) & (sigmas > 0), axis=1)
    while True:
        positions = _solve_kept(first[kept], second[kept], shifts[kept], sigmas[kept], n_frames, anchor)
        with np.errstate(invalid="ignore"):
            misfit = np.max(np.abs(positions[second] - positions[first] - shifts) / sigmas, axis=1)
        misfit = np.where(kept, np.nan_to_num(misfit, nan=0.0), 0.0)
        worst = int(np.argmax(misfit)) if misfit.size else 0
        if not misfit.size or misfit[worst] <= outlier_sigmas:
            return positions, kept
        kept[worst] = False


def _solve_kept(first, second, shifts, sigmas, n_frames, anchor) -> np.ndarray:
    """Weighted least squares of :func:`solve_positions` over the frames the pairs connect to the anchor."""
    ndim = shifts.shape[1] if shifts.ndim == 2 else 1
    positions = np.full((n_frames, ndim), np.nan)
    positions[anchor] = 0.0
    graph = coo_matrix((np.ones(first.size), (first, second)), shape=(n_frames, n_frames))
    _, component = connected_components(graph, directed=False)
    linked = np.flatnonzero((component == component[anchor]) & (np.arange(n_frames) != anchor))
    if linked.size == 0:
        return positions
    column = np.full(n_frames, -1)
    column[linked] = np.arange(linked.size)
    rows = np.flatnonzero(component[first] == component[anchor])
    for axis in range(ndim):
        design = np.zeros((rows.size, linked.size))
        weight = 1.0 / sigmas[rows, axis]
        for sign, frames in ((1.0, second[rows]), (-1.0, first[rows])):
            inside = column[frames] >= 0
            design[np.flatnonzero(inside), column[frames[inside]]] += sign
        solution, *_ = np.linalg.lstsq(design * weight[:, None], shifts[rows, axis] * weight, rcond=None)
        positions[linked, axis] = solution
    return positions


def pairs_reference(sample, mask, *, neighbours: int = PAIR_NEIGHBOURS, max_shift=None,
                    upsample_factor: float = 20, min_ncc: float = 0.1, bright_pixels=None,
                    workers: int = 1) -> BuiltReference:
    """Build a low-noise reference from redundant pair registrations of a sample, solved by least squares.

    Each lit frame of the sample is registered onto its next ``neighbours`` lit frames; the positions are solved
    from all those pairs (:func:`solve_positions`, in the coordinates of the first lit frame, the anchor) and the
    frames they connect are aligned by them and averaged (:func:`align_and_average`).

    Parameters
    ----------
    sample : array_like, shape (n, *frame_shape)
        Frames spread over the run (a few tens).
    mask : ndarray of bool, frame shape
        Valid pixels of every frame.
    neighbours : int
        Following frames each frame is registered onto.
    max_shift, upsample_factor, min_ncc, bright_pixels, workers
        As for :func:`iterative_reference`; pairs correlating worse than ``min_ncc`` are not used.

    Returns
    -------
    BuiltReference
    """
    good, anchor = _lit_sample(sample)
    mask = np.asarray(mask, dtype=bool)

    def registered_onto(i: int):
        """The next ``neighbours`` frames registered onto frame ``i``."""
        others = np.arange(i + 1, min(i + 1 + int(neighbours), good.shape[0]))
        plan = make_plan(good[i], reference_mask=mask, moving_mask=mask, max_shift=max_shift,
                         bright_pixels=bright_pixels)
        return others, register_frames(plan, good[others], upsample_factor=upsample_factor)

    first, second, shifts, sigmas = [], [], [], []
    for i, (others, result) in enumerate(map_in_threads(registered_onto, range(good.shape[0] - 1), workers)):
        trusted = result.ncc >= min_ncc
        # result.shift registers frame j onto frame i: it is position[j] - position[i].
        first.append(np.full(int(trusted.sum()), i))
        second.append(others[trusted])
        shifts.append(result.shift[trusted])
        sigmas.append(result.sigma[trusted])
    ndim = good.ndim - 1
    positions, _ = solve_positions(np.concatenate([np.zeros(0, np.intp), *first]),
                                   np.concatenate([np.zeros(0, np.intp), *second]),
                                   np.concatenate([np.zeros((0, ndim)), *shifts]),
                                   np.concatenate([np.zeros((0, ndim)), *sigmas]), good.shape[0], anchor=0)
    placed = np.all(np.isfinite(positions), axis=1)
    image, image_mask = align_and_average(good[placed], positions[placed], mask, good[0], mask, workers=workers)
    return BuiltReference(image=image, mask=image_mask, anchor=anchor, n_frames=int(placed.sum()))
