"""The only module that builds Dask graphs: estimate drift block-wise, apply it lazily, correct a stored stack.

Each function is a thin layer around the NumPy kernels: a block of whole frames goes to
:func:`driftcorr.registration.register_frames` or :func:`driftcorr.warp.shift_frames`; the reference plan enters the
graph once, as a single key every block depends on.
"""

from __future__ import annotations

import hashlib
import logging
import os
import string
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC
from importlib.metadata import version

import dask
import dask.array as da
import numpy as np
import xarray as xr
from dask.callbacks import Callback
from threadpoolctl import ThreadpoolController

from . import store
from .config import CorrectionConfig, make_config
from .defects import DEFECT_CODES, DefectMap, detect_defects
from .errors import InputError, OutputMismatchError, RunFailedError
from .reference import combine_frames, iterative_reference, pairs_reference, parse_reference
from .registration import check_mask, make_plan, register_frames
from .trajectory import fill_invalid, flag_frames
from .warp import shift_frames

_log = logging.getLogger("driftcorr")
_QUALITY = ("ncc", "overlap", "second_peak")
#: Variables along ``frame`` that the drift estimate writes (the corrected stack aside).
_PER_FRAME = ("shift", "raw_shift", "sigma", "valid", *_QUALITY)
_CORRECTED_ATTRS = {"long_name": "drift-corrected frames", "units": "counts"}
#: Frames read to find defects and build the iterative reference.
SAMPLE_FRAMES = 32
_FIRST_FRAMES = 4
_THREADPOOLS: ThreadpoolController | None = None
_BLAS_GUARD = threading.Lock()
_BLAS_TASKS = 0
_BLAS_LIMITER = None


def _blas_pools() -> ThreadpoolController:
    """The process's BLAS/OpenMP pools, inspected once (inspection costs milliseconds)."""
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS


@contextmanager
def _single_threaded_blas():
    """Keep BLAS on one thread while any task of this process runs in it.

    Each task owns one thread, so BLAS inside it (the DFT matrix products, the residual's sums) must not start its
    own pool. The limit is set when the first running task enters and restored when the last one leaves: a
    context per task would let one task restore the pool under another, whose sums would then be split over
    threads and round differently from run to run. :func:`estimate_drift` and :func:`correct` hold it for their
    whole run (set-up included): with it held only around each task, runs still differed in the last bits of
    a few sigmas now and then, which a resumed run must not (it must equal an uninterrupted one bit for bit).
    """
    global _BLAS_TASKS, _BLAS_LIMITER
    with _BLAS_GUARD:
        if _BLAS_TASKS == 0:
            _BLAS_LIMITER = _blas_pools().limit(limits=1, user_api="blas")
        _BLAS_TASKS += 1
    try:
        yield
    finally:
        with _BLAS_GUARD:
            _BLAS_TASKS -= 1
            if _BLAS_TASKS == 0:
                _BLAS_LIMITER.restore_original_limits()
                _BLAS_LIMITER = None


def _resolve_config(config: CorrectionConfig | None, **options) -> CorrectionConfig:
    if config is not None:
        return config
    return make_config(**options)


def with_time(frames: xr.DataArray, cfg: CorrectionConfig) -> xr.DataArray:
    """Give the frames a ``time`` coordinate from ``start_time`` and ``frame_interval`` when the options set them."""
    if cfg.start_time is None:
        return frames
    start_time = cfg.start_time
    if start_time.tzinfo is not None:  # times are stored in UTC
        start_time = start_time.astimezone(UTC).replace(tzinfo=None)
    start = np.datetime64(start_time, "us")
    offsets = np.round(np.arange(frames.shape[0]) * cfg.frame_interval * 1e6).astype("timedelta64[us]")
    return frames.assign_coords(time=("frame", start + offsets))


def _storable(values: np.ndarray) -> np.ndarray:
    """Times in nanoseconds (xarray encodes coarser units, such as timedelta64[s], wrongly into microseconds)."""
    if np.issubdtype(values.dtype, np.timedelta64):
        return values.astype("timedelta64[ns]")
    if np.issubdtype(values.dtype, np.datetime64):
        return values.astype("datetime64[ns]")
    return values


def as_stack(stack, *, array: str | None = None, block_frames: int | None = None) -> xr.DataArray:
    """Turn a NumPy array, Dask array, DataArray or path/URL into a lazy DataArray chunked in whole frames.

    Parameters
    ----------
    stack : ndarray, dask.array.Array, xarray.DataArray, str or path-like
        Frames along the first axis.
    array : str, optional
        Array name, when ``stack`` is the location of a group holding several.
    block_frames : int, optional
        Frames per chunk; default from the frame size.

    Returns
    -------
    xarray.DataArray
        Dims ``(frame, y, x)`` or ``(frame, z, y, x)``; one chunk spans whole frames.
    """
    if isinstance(stack, str | os.PathLike):
        return store.open_stack(stack, array=array, block_frames=block_frames)
    coords, attrs = {}, {}
    data = stack
    if isinstance(stack, xr.DataArray):
        data, attrs = stack.data, dict(stack.attrs)
        first = stack.dims[0]
        # Keep coordinates along frames (a time, say) under their names; the first dimension is always "frame".
        coords = {name: ("frame", _storable(np.asarray(coord))) for name, coord in stack.coords.items()
                  if coord.dims == (first,)}
    if not isinstance(data, da.Array):
        data = np.asarray(data)
    store.validate_stack_shape(data.shape, data.dtype, "stack")
    blocks = store.block_frames_for(data.shape[1:], block_frames)
    chunks = (blocks, *data.shape[1:])
    # name=False: no hashing of a large in-memory stack just to name it.
    data = data.rechunk(chunks) if isinstance(data, da.Array) else da.from_array(data, chunks=chunks, name=False)
    dims = ("frame", *store.SPATIAL_DIMS[data.ndim - 1])
    coords.setdefault("frame", ("frame", np.arange(data.shape[0])))
    return xr.DataArray(data, dims=dims, coords=coords, name="frames", attrs=attrs)


def _mask_array(mask, frame_shape: tuple[int, ...]):
    """A mask given as a path is read here; its shape and content are checked by :func:`find_defects`."""
    if isinstance(mask, str | os.PathLike):
        return store.load_mask(mask, frame_shape)
    return mask


def _register_block(block: np.ndarray, plan, upsample_factor: float) -> np.ndarray:
    """Register one block of frames; returns (n, 2 * ndim + 3): shift, sigma, ncc, overlap, second peak."""
    with _single_threaded_blas():
        result = register_frames(plan, block, upsample_factor=upsample_factor, workers=1)
    columns = [result.shift, result.sigma] + [getattr(result, name)[:, None] for name in _QUALITY]
    return np.concatenate(columns, axis=1)


def _local_threads() -> int:
    """Threads for the work done here, outside the blocks (the set-up): Dask's ``num_workers``, else the CPUs."""
    return max(1, int(dask.config.get("num_workers", None) or os.cpu_count() or 1))


def sample_indices(start: int, stop: int, max_frames: int = SAMPLE_FRAMES) -> np.ndarray:
    """Frame indices spread evenly over ``start..stop-1`` (both ends included), plus the first few frames.

    The first frames are all there so that the iterative reference is anchored on the first good frame.
    """
    count = min(max_frames, stop - start)
    spread = np.linspace(start, stop - 1, count).round().astype(np.intp)
    return np.unique(np.concatenate([np.arange(start, min(start + _FIRST_FRAMES, stop)), spread]))


class _Sample:
    """Frames of a stack read once, by index, for the steps that look at a sample (defects, reference)."""

    def __init__(self, frames: xr.DataArray):
        self._frames = frames
        self._read: dict[tuple[int, ...], np.ndarray] = {}

    def get(self, index: np.ndarray) -> np.ndarray:
        """The frames at ``index``; a frame that cannot be read (damaged chunk) comes back as NaN (not lit)."""
        key = tuple(int(i) for i in index)
        if key not in self._read:
            try:
                self._read[key] = np.asarray(self._frames.data[np.asarray(index)].compute())
            except Exception as error:  # read them one by one: only the damaged ones are lost
                frames = [self._frame_or_none(i) for i in key]
                if all(frame is None for frame in frames):
                    raise error  # not damaged frames: nothing can be read at all
                nan = np.full(self._frames.shape[1:], np.nan)
                self._read[key] = np.stack([nan if frame is None else frame for frame in frames])
        return self._read[key]

    def _frame_or_none(self, i: int) -> np.ndarray | None:
        try:
            return np.asarray(self._frames.data[i].compute(), dtype=np.float64)
        except Exception:
            return None


def find_defects(frames: xr.DataArray, user_mask, *, detect: bool = True, sample: _Sample | None = None) -> DefectMap:
    """Static defects of a stack from a sample of its frames (:func:`driftcorr.defects.detect_defects`).

    With ``detect`` False only the user's mask is taken (coded 1 where False).
    """
    frame_shape = tuple(frames.shape[1:])
    if user_mask is not None:
        user_mask = check_mask(user_mask, frame_shape)
    if not detect:
        return DefectMap.from_mask(user_mask, frame_shape)
    sample = sample or _Sample(frames)
    return detect_defects(sample.get(sample_indices(0, frames.shape[0])), user_mask, workers=_local_threads())


def make_reference(frames: xr.DataArray, reference, mask: np.ndarray, *, max_shift=None, bright_pixels=None,
                   sample: _Sample | None = None):
    """Build the reference image of a stack from a specification (see :mod:`driftcorr.reference`).

    Returns
    -------
    image : ndarray
    image_mask : ndarray of bool
        Valid pixels of the reference.
    label : str
        The specification, with the anchor frame of a sampled (iterative or pairs) reference.
    anchor : int
        Frame whose coordinates the reference lies in (the first frame of a range).
    """
    spec = parse_reference(reference, frames.shape[0])
    if spec.kind in ("iterative", "pairs"):
        index = sample_indices(spec.start, spec.stop)
        build = iterative_reference if spec.kind == "iterative" else pairs_reference
        built = build((sample or _Sample(frames)).get(index), mask, max_shift=max_shift, bright_pixels=bright_pixels,
                      workers=_local_threads())
        anchor = int(index[built.anchor])
        label = f"{spec}: {built.n_frames} aligned frames averaged, anchored on frame {anchor}"
        return built.image, built.mask, label, anchor
    try:
        selected = np.asarray(frames.data[spec.start:spec.stop].compute())
    except Exception as error:
        raise InputError(f"reference {spec}: frames {spec.start}-{spec.stop - 1} cannot be read "
                         f"({type(error).__name__}: {error}); choose other reference frames") from None
    image = combine_frames(selected, spec.kind)
    if not np.all(np.isfinite(image[mask])):
        raise InputError(f"reference {spec} contains NaN or infinite pixels; choose another reference frame")
    return image, mask, str(spec), spec.start


def estimate_drift(
    stack,
    *,
    mask=None,
    reference: int | str | None = None,
    upsample_factor: float | None = None,
    max_shift: int | None = None,
    method: str | None = None,
    min_overlap: float | None = None,
    min_ncc: float | None = None,
    detect_defects: bool | None = None,
    tame_outliers: bool | None = None,
    bandpass: tuple[float, float | None] | None = None,
    block_frames: int | None = None,
    array: str | None = None,
    start_time=None,
    frame_interval: float | None = None,
    config: CorrectionConfig | None = None,
) -> xr.Dataset:
    """Estimate the drift of every frame of a stack against a reference.

    Parameters
    ----------
    stack : ndarray, dask.array.Array, xarray.DataArray, str or path-like
        Frames along the first axis (a path/URL is opened with :func:`driftcorr.open_stack`).
    mask : array_like of bool or path, optional
        Valid pixels (True = used), frame shape, shared by every frame (e.g. the beam-block).
    reference : int or str, optional
        ``iterative`` (default), ``iterative:A:B``, ``pairs``, ``pairs:A:B``, a frame index, ``mean:A:B`` or
        ``median:A:B``
        (see :mod:`driftcorr.reference`).
    upsample_factor, max_shift, method, min_overlap, min_ncc, detect_defects, tame_outliers, bandpass,
    block_frames, array, start_time, frame_interval
        See :class:`driftcorr.config.CorrectionConfig`; None keeps the default. ``start_time`` (ISO 8601 or a
        datetime) and ``frame_interval`` (s) give the output a ``time`` coordinate.
    config : CorrectionConfig, optional
        A validated configuration; replaces all the keyword options above.

    Returns
    -------
    xarray.Dataset
        ``shift``, ``sigma`` (frame, axis), ``ncc``, ``valid``, ``overlap``, ``second_peak``, ``raw_shift``,
        ``reference``, ``reference_mask``, ``mask`` (the user's mask without the detected defects) and
        ``defects`` (why each pixel is left out); computed (in memory).
    """
    cfg = _resolve_config(config, reference=reference, upsample_factor=upsample_factor, max_shift=max_shift,
                          method=method, min_overlap=min_overlap, min_ncc=min_ncc, detect_defects=detect_defects,
                          tame_outliers=tame_outliers, bandpass=bandpass, block_frames=block_frames, array=array,
                          start_time=start_time, frame_interval=frame_interval)
    frames = with_time(as_stack(stack, array=cfg.array, block_frames=cfg.block_frames), cfg)
    with _single_threaded_blas():
        setup = _set_up(frames, _mask_array(mask, tuple(frames.shape[1:])), cfg)
        plan = setup.plan(cfg)
        values = _registration_table(frames, plan, cfg.upsample_factor).compute()
    return _drift_from_registration(frames, values, setup, plan, cfg)


@dataclass(frozen=True, eq=False)
class _Setup:
    """What every frame of a run is registered with: found once from a sample of the run, or read back."""

    defects: DefectMap
    image: np.ndarray
    image_mask: np.ndarray
    label: str
    anchor: int

    def plan(self, cfg: CorrectionConfig):
        bright = np.isin(self.defects.codes, (DEFECT_CODES["hot"], DEFECT_CODES["stuck"]))
        return make_plan(self.image, reference_mask=self.image_mask, moving_mask=self.defects.mask,
                         max_shift=cfg.max_shift, method=cfg.method, min_overlap=cfg.min_overlap,
                         tame_outliers=cfg.tame_outliers, bright_pixels=bright, bandpass=cfg.bandpass)


def _set_up(frames: xr.DataArray, user_mask, cfg: CorrectionConfig) -> _Setup:
    """Find the defects and build the reference from a sample of the run (read once)."""
    sample = _Sample(frames)  # read once: defect detection and the iterative reference share it
    defects = find_defects(frames, user_mask, detect=cfg.detect_defects, sample=sample)
    if not defects.mask.any():
        raise InputError("no pixel is left to register once the mask and the detected defects are removed; "
                         "check the mask (True marks the pixels to use)")
    bright = np.isin(defects.codes, (DEFECT_CODES["hot"], DEFECT_CODES["stuck"]))
    image, image_mask, label, anchor = make_reference(frames, cfg.reference, defects.mask, max_shift=cfg.max_shift,
                                                      bright_pixels=bright, sample=sample)
    # The output stores the reference as float32; registering against exactly those values lets a resumed or
    # extended run, which reads it back, give what one uninterrupted run gives.
    image = np.asarray(image, dtype=np.float32).astype(np.float64)
    return _Setup(defects=defects, image=image, image_mask=np.asarray(image_mask, bool), label=label, anchor=anchor)


def _registration_table(frames: xr.DataArray, plan, upsample_factor: float) -> da.Array:
    """Lazy (frame, 2 * ndim + 3) table of every frame's registration: shift, sigma, ncc, overlap, second peak."""
    ndim = frames.ndim - 1
    plan_key = dask.delayed(plan, pure=True)
    return frames.data.map_blocks(
        _register_block, plan_key, upsample_factor, dtype=np.float64,
        drop_axis=list(range(2, ndim + 1)), chunks=(frames.data.chunks[0], (2 * ndim + 3,)),
    )


def _drift_from_registration(frames: xr.DataArray, values: np.ndarray, setup: _Setup, plan,
                             cfg: CorrectionConfig) -> xr.Dataset:
    """The drift Dataset from the registration table: flags, interpolated shifts, the anchor's origin and sigma."""
    ndim = frames.ndim - 1
    anchor = setup.anchor
    raw_shift = values[:, :ndim]
    sigma = values[:, ndim:2 * ndim]
    quality = {name: values[:, 2 * ndim + i] for i, name in enumerate(_QUALITY)}
    valid = flag_frames(raw_shift, quality["ncc"], min_ncc=cfg.min_ncc, max_shift=plan.max_shift)
    shift = fill_invalid(raw_shift, valid)
    # Relative to the anchor frame itself, not to wherever the averaged reference happens to lie.
    origin = np.where(np.isfinite(shift[anchor]), shift[anchor], 0.0)
    shift, raw_shift = shift - origin, raw_shift - origin
    sigma, sigma_anchor = _with_anchor_uncertainty(sigma, valid, anchor)
    return _drift_dataset(frames, shift=shift, raw_shift=raw_shift, sigma=sigma, valid=valid, quality=quality,
                          reference=setup.image, reference_mask=setup.image_mask, defects=setup.defects,
                          reference_label=setup.label, anchor=anchor, sigma_anchor=sigma_anchor,
                          anchor_offset=origin, cfg=cfg)


def _with_anchor_uncertainty(sigma: np.ndarray, valid: np.ndarray, anchor: int) -> tuple[np.ndarray, np.ndarray]:
    """Add the uncertainty of the anchor frame's own registration to every frame's.

    Shifts are relative to the anchor frame (its own shift against the reference is subtracted from all), so
    they carry its registration error, common to all frames. (For a single-frame reference it is 0.)
    Flagged frames, whose shift is interpolated, keep the uncertainty of their nearest trusted neighbours.
    """
    sigma = np.asarray(sigma, dtype=np.float64)
    own = sigma[anchor]
    if not np.all(np.isfinite(own)):
        own = np.nanmedian(sigma[valid], axis=0) if valid.any() else np.full(sigma.shape[1], np.nan)
    total = np.sqrt(fill_invalid(sigma, valid & np.all(np.isfinite(sigma), axis=1)) ** 2 + own**2)
    total[anchor] = 0.0  # the anchor frame's shift is 0 by definition
    return total, own


def _drift_dataset(frames, *, shift, raw_shift, sigma, valid, quality, reference, reference_mask, defects,
                   reference_label, anchor, sigma_anchor, anchor_offset, cfg):
    spatial = frames.dims[1:]
    coords = {name: coord for name, coord in frames.coords.items() if coord.dims == ("frame",)}
    coords["axis"] = ("axis", np.array(spatial, dtype=object))
    px = {"units": "px"}
    data_vars = {
        "shift": (("frame", "axis"), shift,
                  {"long_name": "shift registering the frame onto the reference", **px}),
        "raw_shift": (("frame", "axis"), raw_shift,
                      {"long_name": "measured shift before invalid frames were interpolated", **px}),
        "sigma": (("frame", "axis"), sigma, {
            "long_name": "1-sigma uncertainty of the shift",
            "comment": "includes sigma_anchor, the error of the reference frame's own registration, common to all "
                       "frames; flagged frames take the uncertainty interpolated from trusted neighbours", **px}),
        "ncc": (("frame",), quality["ncc"], {"long_name": "peak normalized cross-correlation", "units": "1"}),
        "valid": (("frame",), valid, {"long_name": "registration trusted (else shift interpolated)"}),
        "overlap": (("frame",), quality["overlap"],
                    {"long_name": "fraction of reference pixels in the overlap at the peak", "units": "1"}),
        "second_peak": (("frame",), quality["second_peak"],
                        {"long_name": "second-highest NCC peak relative to the peak", "units": "1"}),
        "reference": (spatial, reference.astype(np.float32),
                      {"long_name": f"reference image ({reference_label})", "units": "counts"}),
        "reference_mask": (spatial, np.asarray(reference_mask, dtype=bool),
                           {"long_name": "valid pixel of the reference"}),
        "mask": (spatial, defects.mask, {"long_name": "pixel used for registration"}),
        "defects": (spatial, defects.codes, {
            "long_name": "why a pixel is not used", "flag_values": np.array(list(DEFECT_CODES.values()), np.uint8),
            "flag_meanings": " ".join(DEFECT_CODES), "frames_examined": defects.n_frames}),
    }
    attrs = {"driftcorr_version": version("driftcorr"), "config": cfg.model_dump(mode="json"),
             "config_digest": cfg.digest(), "input": frames.attrs.get("source", "in-memory array"),
             "reference_frame": int(anchor), "sigma_anchor": [float(v) for v in sigma_anchor],
             "anchor_offset": [float(v) for v in anchor_offset]}
    return xr.Dataset(data_vars, coords=coords, attrs=attrs)


def _shift_table(drift, n_frames: int) -> np.ndarray:
    if isinstance(drift, str | os.PathLike):
        drift = xr.open_zarr(os.fspath(drift), consolidated=False)
    if isinstance(drift, xr.Dataset):
        if "shift" not in drift:
            raise InputError("drift Dataset has no 'shift' variable; pass the output of estimate_drift")
        drift = drift["shift"]
    shifts = np.asarray(drift, dtype=np.float64)
    if shifts.ndim != 2 or shifts.shape[0] != n_frames:
        raise InputError(f"drift must hold one shift per frame: expected ({n_frames}, ndim), got {shifts.shape}")
    return shifts


def apply_drift(stack, drift, *, interpolation_order: int = 3, block_frames: int | None = None,
                array: str | None = None) -> xr.DataArray:
    """Lazily shift every frame by its drift.

    Parameters
    ----------
    stack : ndarray, dask.array.Array, xarray.DataArray, str or path-like
        The raw frames.
    drift : xarray.Dataset, xarray.DataArray, ndarray or path
        Per-frame shifts (frame, axis): the Dataset from :func:`estimate_drift`, its ``shift``, or an output path.
    interpolation_order : int
        Spline order of the shift (0 to 5).
    block_frames : int, optional
        Frames per chunk.
    array : str, optional
        Array name inside an input group.

    Returns
    -------
    xarray.DataArray
        float32, NaN where pixels come from outside the frame; Dask-backed, nothing computed yet.
    """
    frames = as_stack(stack, array=array, block_frames=block_frames)
    shifts = _shift_table(drift, frames.shape[0])
    ndim = frames.ndim - 1
    if shifts.shape[1] != ndim:
        raise InputError(f"drift has {shifts.shape[1]} axes but frames have {ndim}")
    shift_chunks = da.from_array(shifts, chunks=(frames.data.chunks[0], (ndim,)))
    index = "t" + string.ascii_lowercase[:ndim]
    data = da.blockwise(shift_frames, index, frames.data, index, shift_chunks, "tA", concatenate=True,
                        dtype=np.float32, order=interpolation_order, meta=np.empty((0,) * (ndim + 1), np.float32))
    return xr.DataArray(data, dims=frames.dims, coords=frames.coords, name="corrected",
                        attrs=dict(_CORRECTED_ATTRS))


def correct(
    input,
    output,
    *,
    mask=None,
    reference: int | str | None = None,
    upsample_factor: float | None = None,
    max_shift: int | None = None,
    method: str | None = None,
    detect_defects: bool | None = None,
    tame_outliers: bool | None = None,
    bandpass: tuple[float, float | None] | None = None,
    interpolation_order: int | None = None,
    block_frames: int | None = None,
    array: str | None = None,
    start_time=None,
    frame_interval: float | None = None,
    overwrite: bool = False,
    estimate_only: bool = False,
    config: CorrectionConfig | None = None,
    progress: bool | str = False,
) -> xr.Dataset:
    """Estimate the drift of a stored stack and write shifts, quality and the corrected stack to ``output``.

    The output is written block by block, each block marked done after its data (DESIGN §5). Running the same
    correction again on an interrupted output continues it; on an output whose input has grown since, it
    registers only the new frames (against the stored reference) and appends them. Other options, another input
    or another mask are refused; ``overwrite`` starts over. A lock keeps a second process out while one writes.

    Parameters
    ----------
    input : str, path-like, or array
        The raw stack (see :func:`estimate_drift`).
    output : str or path-like
        Location of the output Zarr v3 group.
    mask, reference, upsample_factor, max_shift, method, detect_defects, tame_outliers, bandpass, block_frames, array,
    start_time, frame_interval
        As in :func:`estimate_drift`.
    interpolation_order : int, optional
        Spline order used to shift frames.
    overwrite : bool
        Replace an existing driftcorr output (anything else is never deleted).
    estimate_only : bool
        Write the drift and quality only, not the corrected stack.
    config : CorrectionConfig, optional
        A validated configuration; replaces the keyword options.
    progress : bool or {"bar", "log", "off"}
        Show progress on standard error: True for a bar on a terminal or in a notebook and a line every
        :data:`PROGRESS_LOG_SECONDS` otherwise; the local and the distributed scheduler alike.

    Returns
    -------
    xarray.Dataset
        The written output, opened lazily.

    Raises
    ------
    OutputMismatchError
        The output exists and was made from another input, mask or options (or the input has shrunk).
    OutputLockedError
        Another process is writing the output.
    RunFailedError
        Some blocks failed; the output is left incomplete and the same call resumes it.
    """
    cfg = _resolve_config(config, reference=reference, upsample_factor=upsample_factor, max_shift=max_shift,
                          method=method, detect_defects=detect_defects, tame_outliers=tame_outliers,
                          bandpass=bandpass, interpolation_order=interpolation_order, block_frames=block_frames,
                          array=array, start_time=start_time, frame_interval=frame_interval)
    frames = with_time(as_stack(input, array=cfg.array, block_frames=cfg.block_frames), cfg)
    location = store.absolute(store.prepare_output(output, input_location=frames.attrs.get("source"),
                                                   overwrite=overwrite, resumable=True))
    user_mask = _mask_array(mask, tuple(frames.shape[1:]))
    identity = _run_identity(frames, user_mask, cfg, estimate_only)
    # The configured block, not the first chunk: a first run shorter than a block must not fix a smaller one.
    block = store.block_frames_for(tuple(frames.shape[1:]), cfg.block_frames)
    mode = _progress_mode(progress)
    with store.output_lock(location), _single_threaded_blas():
        store.clean_partial_files(location)
        state = store.read_output(location)
        if state is None or overwrite or not state.ready:
            setup = _set_up(frames, user_mask, cfg)  # before anything is deleted: a bad option loses nothing
            if state is not None:
                store.clear_output(location)
            _create_output(location, frames, setup, cfg, identity, block, estimate_only)
            store.set_attributes(location, {}, status=store.STATUS_INCOMPLETE)  # consolidated: readable, unfinished
        else:
            _check_same_run(location, state, identity, frames.shape[0])
            if (state.status == store.STATUS_COMPLETE and state.n_frames == frames.shape[0]
                    and not state.attrs.get("unreadable_frames")):
                return store.open_output_dataset(location)  # up to date: nothing is touched
            store.set_attributes(location, {}, status=store.STATUS_INCOMPLETE)
            setup = _setup_from_output(location)
            if frames.shape[0] > state.n_frames:
                coords = {name: np.asarray(coord) for name, coord in frames.coords.items()
                          if coord.dims == ("frame",)}
                stored = [name for name, coord in store.open_output_dataset(location).coords.items()
                          if coord.dims == ("frame",) and name not in coords]
                if stored:
                    raise InputError(f"the input has {frames.shape[0]} frames but no {stored[0]!r} coordinate for "
                                     "all of them (it may not be written yet); run again once it is")
                store.grow_output(location, state.n_frames, frames.shape[0], block, coords)
        plan = setup.plan(cfg)
        # Blocks are corrected as they are registered, with the shift they will have unless flagged; the few
        # blocks whose final shift differs (flagged frames, interpolated) are corrected again below.
        origin = None if estimate_only else _anchor_origin(frames, setup, plan, cfg)
        _run_blocks(_registration_tasks(frames, plan, cfg, location, block, origin),
                    label="registering" if origin is None else "registering and correcting", progress=mode)
        drift = _drift_from_registration(frames, store.read_array(location, store.REGISTRATION), setup, plan, cfg)
        for name in _PER_FRAME:
            store.write_changed_rows(location, name, drift[name].values)
        if not estimate_only:
            _run_blocks(_correction_tasks(frames, drift["shift"].values, cfg, location, block), label="correcting",
                        progress=mode)
        unreadable = _unreadable_frames(location, frames.shape[0], block)
        if unreadable:
            _log.warning("input frames %s could not be read; they are marked invalid",
                         ", ".join(f"{a}-{b}" for a, b in unreadable))
        store.set_attributes(location, {**drift.attrs, **identity, "unreadable_frames": unreadable},
                             status=store.STATUS_COMPLETE)
    return xr.open_zarr(location, consolidated=False)


def _run_identity(frames: xr.DataArray, user_mask, cfg: CorrectionConfig, estimate_only: bool) -> dict:
    """What an output must have been made from to be resumed or extended (stored in its attributes)."""
    if user_mask is None:
        mask_digest = "none"
    else:
        user_mask = np.asarray(user_mask, dtype=bool)
        mask_digest = hashlib.sha256(np.packbits(user_mask).tobytes() + str(user_mask.shape).encode()).hexdigest()
    # The input by its absolute location and by its first frame: the same name in another folder, or a stack
    # written anew at the same place, is another input.
    first_frame = hashlib.sha256(np.ascontiguousarray(frames.data[0].compute()).tobytes()).hexdigest()
    source = frames.attrs.get("source")
    return {"config": cfg.model_dump(mode="json"), "config_digest": cfg.digest(),
            "input": store.absolute(source) if source else "in-memory array", "input_first_frame": first_frame,
            "mask_digest": mask_digest,
            "products": "drift" if estimate_only else "drift+corrected",
            "frame_shape": [int(n) for n in frames.shape[1:]], "dtype": str(frames.dtype)}


def _check_same_run(location: str, state, identity: dict, n_frames: int) -> None:
    """Refuse to resume an output made from another input, mask or options, saying what differs."""
    stored = state.attrs
    how = "run with the same input, mask and options to resume it, or pass --overwrite to start over"
    if stored.get("config_digest") != identity["config_digest"]:
        before, now = stored.get("config") or {}, identity["config"]
        changed = ", ".join(f"{key}={before.get(key)!r} (now {now.get(key)!r})" for key in sorted(now)
                            if before.get(key) != now.get(key)) or "an unknown configuration"
        raise OutputMismatchError(f"output {location!r} exists and was made with {changed}; {how}")
    if stored.get("products") != identity["products"]:
        made = "without" if stored.get("products") == "drift" else "with"
        raise OutputMismatchError(f"output {location!r} exists and was made {made} the corrected stack "
                                  f"('driftcorr {'estimate' if made == 'without' else 'correct'}'); {how}")
    for key, what in (("input", "from the input"), ("input_first_frame", "from another stack: first frame digest"),
                      ("mask_digest", "with a different mask: digest"),
                      ("frame_shape", "from frames of shape"), ("dtype", "from frames of dtype")):
        if stored.get(key) != identity[key]:
            raise OutputMismatchError(f"output {location!r} exists and was made {what} {stored.get(key)!r} "
                                      f"(now {identity[key]!r}); {how}")
    if n_frames < state.n_frames:
        raise OutputMismatchError(f"output {location!r} holds {state.n_frames} frames but the input has only "
                                  f"{n_frames}; an input may only grow: {how}")


def _create_output(location: str, frames: xr.DataArray, setup: _Setup, cfg: CorrectionConfig, identity: dict,
                   block: int, estimate_only: bool) -> None:
    """Write the output's metadata and static variables; per-frame values come later, block by block."""
    n_frames, ndim = frames.shape[0], frames.ndim - 1
    table = store.TABLE_CHUNK  # fixed, whatever the first run's length: appends must not multiply the chunks

    def empty(*shape):
        return da.full((n_frames, *shape), np.nan, chunks=(table, *shape))

    template = _drift_dataset(
        frames, shift=empty(ndim), raw_shift=empty(ndim), sigma=empty(ndim),
        valid=da.zeros(n_frames, dtype=bool, chunks=table), quality={name: empty() for name in _QUALITY},
        reference=setup.image, reference_mask=setup.image_mask, defects=setup.defects, reference_label=setup.label,
        anchor=setup.anchor, sigma_anchor=np.zeros(ndim), anchor_offset=np.zeros(ndim), cfg=cfg)
    if not estimate_only:
        template["corrected"] = xr.DataArray(
            da.full(frames.shape, np.nan, dtype=np.float32, chunks=(block, *frames.shape[1:])), dims=frames.dims,
            attrs=dict(_CORRECTED_ATTRS))
    template.attrs.update({**identity, store.COMMITTED_ATTR: int(n_frames), "status": store.STATUS_INCOMPLETE})
    store.create_output(template, location, block_frames=block, n_columns=2 * ndim + 3)


def _setup_from_output(location: str) -> _Setup:
    """The defects and reference an output was set up with, read back to register more frames against them."""
    stored = store.open_output_dataset(location)
    defects = DefectMap(codes=stored["defects"].values,
                        n_frames=int(stored["defects"].attrs.get("frames_examined", 0)))
    label = stored["reference"].attrs.get("long_name", "")
    label = label[len("reference image ("):-1] if label.startswith("reference image (") else label
    return _Setup(defects=defects, image=stored["reference"].values.astype(np.float64),
                  image_mask=stored["reference_mask"].values.astype(bool), label=label,
                  anchor=int(stored.attrs["reference_frame"]))


def _blocks(n_frames: int, block: int):
    """(index, start, stop) of each block of frames."""
    return [(k, start, min(start + block, n_frames)) for k, start in enumerate(range(0, n_frames, block))]


def _block_source(frames: xr.DataArray, start: int, stop: int):
    """What a block task reads its frames from: the stored array, read inside the task, or a Dask slice."""
    reader = store.frame_reader(frames)
    return (reader, start, stop) if reader is not None else frames.data[start:stop]


def _read_block(source) -> np.ndarray:
    if isinstance(source, tuple):
        reader, start, stop = source
        return reader(start, stop)
    return np.asarray(source)


def _anchor_origin(frames: xr.DataArray, setup: _Setup, plan, cfg: CorrectionConfig) -> np.ndarray | None:
    """The anchor frame's own shift against the reference, which every shift is measured from (None when it
    cannot be registered: then no block is corrected before the drift is known)."""
    try:
        anchor = _read_block(_block_source(frames, setup.anchor, setup.anchor + 1))
    except Exception:  # a damaged anchor frame is reported with its block
        return None
    shift = _register_block(anchor, plan, cfg.upsample_factor)[0, :frames.ndim - 1]
    return shift if np.all(np.isfinite(shift)) else None


def _registration_tasks(frames: xr.DataArray, plan, cfg: CorrectionConfig, location: str, block: int,
                        origin: np.ndarray | None = None) -> list:
    """One task per block not yet registered: register it, write its rows, then its done marker.

    With ``origin`` (the anchor frame's shift, see :func:`_anchor_origin`) each task also corrects its block
    with the shifts measured from it, as :func:`_shift_and_store` would, while its frames are in memory.
    """
    done = store.read_array(location, store.REGISTERED)
    unreadable = store.read_array(location, store.UNREADABLE)  # retried: the storage may have recovered
    plan_key = dask.delayed(plan, pure=True)
    columns = 2 * (frames.ndim - 1) + 3
    correction = None if origin is None else (origin, cfg.interpolation_order)
    return [(start, stop, dask.delayed(_register_and_store, pure=False)(
                _block_source(frames, start, stop), columns, plan_key, cfg.upsample_factor, location, start, k,
                correction, bool(unreadable[k])))
            for k, start, stop in _blocks(frames.shape[0], block) if done[k] != stop - start or unreadable[k]]


def _correction_tasks(frames: xr.DataArray, shifts: np.ndarray, cfg: CorrectionConfig, location: str,
                      block: int) -> list:
    """One task per block not yet corrected with its current shifts: shift it, write it, then its marker."""
    done = store.read_array(location, store.CORRECTED)
    applied = store.read_array(location, store.APPLIED_SHIFT)
    unreadable = store.read_array(location, store.UNREADABLE)
    return [(start, stop, dask.delayed(_shift_and_store, pure=False)(
                _block_source(frames, start, stop), tuple(frames.shape[1:]), shifts[start:stop],
                cfg.interpolation_order, location, start, k, bool(unreadable[k])))
            for k, start, stop in _blocks(frames.shape[0], block)
            if done[k] != stop - start or unreadable[k]
            or not np.array_equal(applied[start:stop], shifts[start:stop], equal_nan=True)]


def _register_and_store(source, columns: int, plan, upsample_factor: float, location: str, start: int,
                        block: int, correction: tuple[np.ndarray, int] | None = None,
                        recorded_unreadable: bool = True) -> tuple[str, str] | None:
    """Register one block and store it; ``("unreadable" | "failed", message)`` when that could not be done.

    With ``correction`` = (origin, interpolation order) the block is also shifted by its measured shifts minus
    ``origin`` and stored as corrected (with those shifts as applied), in the same write: data, then markers.
    ``recorded_unreadable``: the output records the block as unreadable (a readable block clears the record).
    """
    try:
        frames = _read_block(source)
    except Exception as error:  # damaged input chunks: the block's frames are marked invalid
        rows = np.full((source[2] - source[1], columns), np.nan)
        store.write_block(location, start, {store.REGISTRATION: rows}, store.REGISTERED, block, unreadable=True)
        return "unreadable", f"{type(error).__name__}: {error}"
    try:
        values = _register_block(frames, plan, upsample_factor)
        arrays, markers = {store.REGISTRATION: values}, (store.REGISTERED,)
        if correction is not None:
            origin, order = correction
            arrays.update(_corrected_arrays(frames, values[:, :len(origin)] - origin, order))
            markers += (store.CORRECTED,)
        store.write_block(location, start, arrays, markers, block, unreadable=False if recorded_unreadable else None)
    except Exception as error:  # reported with its block by _run_blocks; the other blocks go on
        return "failed", f"{type(error).__name__}: {error}"
    return None


def _shift_and_store(source, frame_shape: tuple[int, ...], shifts: np.ndarray, order: int, location: str,
                     start: int, block: int, recorded_unreadable: bool = True) -> tuple[str, str] | None:
    """Shift one block and store it; an unreadable block is stored as NaN frames."""
    try:
        frames = _read_block(source)
    except Exception as error:
        corrected = np.full((len(shifts), *frame_shape), np.nan, dtype=np.float32)
        store.write_block(location, start, {"corrected": corrected, store.APPLIED_SHIFT: shifts}, store.CORRECTED,
                          block, unreadable=True)
        return "unreadable", f"{type(error).__name__}: {error}"
    try:
        store.write_block(location, start, _corrected_arrays(frames, shifts, order), store.CORRECTED, block,
                          unreadable=False if recorded_unreadable else None)
    except Exception as error:  # reported with its block by _run_blocks; the other blocks go on
        return "failed", f"{type(error).__name__}: {error}"
    return None


def _corrected_arrays(frames: np.ndarray, shifts: np.ndarray, order: int) -> dict:
    """A block's frames shifted by ``shifts``, and those shifts, by their paths in the output."""
    return {"corrected": shift_frames(frames, shifts, order=order), store.APPLIED_SHIFT: shifts}


#: Seconds between progress lines when not writing to a terminal (cron, a log file).
PROGRESS_LOG_SECONDS = 30.0


class _Progress:
    """Frames done out of a total: a bar on a terminal (a widget in a notebook), or a line every
    :data:`PROGRESS_LOG_SECONDS` on standard error otherwise (a run shorter than that prints none); nothing with
    ``mode`` ``"off"``."""

    def __init__(self, label: str, total: int, mode: str):
        self.label, self.total, self.mode = label, total, mode
        self.done, self.start = 0, time.monotonic()
        self.last_line = self.start
        self.bar = None
        if mode == "bar":
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=label, unit="frame", file=sys.stderr)

    def advance(self, frames: int) -> None:
        self.done += frames
        if self.bar is not None:
            self.bar.update(frames)
        elif self.mode == "log" and time.monotonic() - self.last_line >= PROGRESS_LOG_SECONDS:
            self._line()

    def _line(self) -> None:
        self.last_line = time.monotonic()
        rate = self.done / max(self.last_line - self.start, 1e-9)
        print(f"driftcorr: {self.label} {self.done}/{self.total} frames ({100 * self.done / self.total:.0f} %), "
              f"{rate:.1f} frames/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        """End the bar; in log mode a last line, if the run was long enough to print any."""
        if self.bar is not None:
            self.bar.close()
        elif self.mode == "log" and self.last_line > self.start:
            self._line()


def _progress_mode(progress) -> str:
    """``"bar"``, ``"log"`` or ``"off"`` from the ``progress`` option (True: a bar on a terminal or in a notebook,
    log lines otherwise)."""
    if progress in ("bar", "log", "off"):
        return progress
    if not progress:
        return "off"
    interactive = sys.stderr.isatty() or "ipykernel" in sys.modules
    return "bar" if interactive else "log"


def _distributed_client():
    """The Dask distributed client that ``dask.compute`` would use, or None (the local scheduler)."""
    if dask.config.get("scheduler", None) != "dask.distributed":
        return None
    try:
        from distributed import default_client

        return default_client()
    except (ImportError, ValueError):
        return None


def _run_blocks(tasks: list, *, label: str = "blocks", progress: str = "off") -> None:
    """Compute the block tasks; when any fails, stop with the output left incomplete (a rerun resumes it)."""
    if not tasks:
        return
    resume = "the output is left incomplete; run the same command again to resume it"
    meter = _Progress(label, sum(stop - start for start, stop, _ in tasks), progress)
    try:
        results = _compute_with_progress(tasks, meter)
    except Exception as error:  # a worker lost for good, an unreadable in-memory input, ...
        raise RunFailedError(f"the run stopped ({type(error).__name__}: {error}); {resume}") from error
    finally:
        meter.close()
    failed = [(start, stop, result[1]) for (start, stop, _), result in zip(tasks, results, strict=True)
              if result is not None and result[0] == "failed"]
    if failed:
        start, stop, message = failed[0]
        raise RunFailedError(f"{len(failed)} of {len(tasks)} blocks failed, the first one (frames {start}-{stop - 1}) "
                             f"with {message}; {resume}")


def _compute_with_progress(tasks: list, meter: _Progress) -> list:
    """Results of the block tasks, in order, advancing ``meter`` as each block finishes."""
    frames_of = {task.key: stop - start for start, stop, task in tasks}
    client = _distributed_client()
    if client is not None:
        from distributed import as_completed

        futures = client.compute([task for _, _, task in tasks])
        for future in as_completed(futures):
            meter.advance(frames_of.get(future.key, 0))
        return client.gather(futures)

    def finished(key, result, dsk, state, worker_id):
        meter.advance(frames_of.get(key, 0))

    with Callback(posttask=finished):
        return list(dask.compute(*[task for _, _, task in tasks]))


def _unreadable_frames(location: str, n_frames: int, block: int) -> list[list[int]]:
    """[first, last] frame of every block whose input could not be read, from the output's progress record."""
    flags = store.read_array(location, store.UNREADABLE)
    return [[start, stop - 1] for k, start, stop in _blocks(n_frames, block) if flags[k]]


def apply_stored_drift(input, drift, output, *, array: str | None = None, interpolation_order: int = 3,
                       overwrite: bool = False) -> xr.Dataset:
    """Write a corrected stack from a raw stack and a drift output made by ``estimate`` or ``correct``.

    Parameters
    ----------
    input : str or path-like
        The raw stack.
    drift : str or path-like
        A complete driftcorr output holding ``shift``.
    output : str or path-like
        New output group: the drift variables plus ``corrected``.
    array : str, optional
        Array name inside an input group.
    interpolation_order : int
        Spline order of the shift.
    overwrite : bool
        Replace an existing driftcorr output.

    Returns
    -------
    xarray.Dataset
        The written output, opened lazily.
    """
    status = store.read_status(drift)
    if status is None:
        raise InputError(f"drift {os.fspath(drift)!r} is not a driftcorr output; make one with 'driftcorr estimate'")
    if status != store.STATUS_COMPLETE:
        raise InputError(f"drift {os.fspath(drift)!r} is incomplete ({status}); rerun the estimate first")
    frames = as_stack(input, array=array)
    location = store.prepare_output(output, input_location=frames.attrs.get("source"), overwrite=overwrite)
    stored = xr.open_zarr(os.fspath(drift), consolidated=False).load()
    drift_vars = stored.drop_vars([name for name in ("corrected",) if name in stored])
    drift_vars["corrected"] = apply_drift(frames, drift_vars, interpolation_order=interpolation_order,
                                          block_frames=frames.data.chunksize[0])
    attrs = {**stored.attrs, "input": frames.attrs.get("source", "in-memory array"), "drift": os.fspath(drift)}
    store.write_output(drift_vars, location, attrs=attrs, block_frames=frames.data.chunksize[0])
    return xr.open_zarr(location, consolidated=False)
