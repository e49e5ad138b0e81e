"""The only module that builds Dask graphs: estimate drift block-wise, apply it lazily, correct a stored stack.

Each function is a thin layer around the NumPy kernels: a block of whole frames goes to
:func:`driftcorr.registration.register_frames` or :func:`driftcorr.warp.shift_frames`; the reference plan enters the
graph once, as a single key every block depends on.
"""

from __future__ import annotations

import os
import string
from importlib.metadata import version

import dask
import dask.array as da
import numpy as np
import xarray as xr
from threadpoolctl import ThreadpoolController

from . import store
from .config import CorrectionConfig, make_config
from .defects import DEFECT_CODES, DefectMap, detect_defects
from .errors import InputError
from .reference import combine_frames, iterative_reference, pairs_reference, parse_reference
from .registration import check_mask, make_plan, register_frames
from .trajectory import fill_invalid, flag_frames
from .warp import shift_frames

_QUALITY = ("ncc", "overlap", "second_peak")
#: Frames read to find defects and build the iterative reference.
SAMPLE_FRAMES = 32
_FIRST_FRAMES = 4
_THREADPOOLS: ThreadpoolController | None = None


def _blas_pools() -> ThreadpoolController:
    """The process's BLAS/OpenMP pools, inspected once (inspection costs milliseconds)."""
    global _THREADPOOLS
    if _THREADPOOLS is None:
        _THREADPOOLS = ThreadpoolController()
    return _THREADPOOLS


def _resolve_config(config: CorrectionConfig | None, **options) -> CorrectionConfig:
    if config is not None:
        return config
    return make_config(**options)


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
        # Keep coordinates along frames (frame numbers, time); the first dimension is always called "frame".
        coords = {("frame" if name == first else name): ("frame", np.asarray(coord))
                  for name, coord in stack.coords.items() if coord.dims == (first,)}
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
    # Each task owns one thread: BLAS inside it (the DFT matrix products) must not start its own pool.
    with _blas_pools().limit(limits=1, user_api="blas"):
        result = register_frames(plan, block, upsample_factor=upsample_factor, workers=1)
    columns = [result.shift, result.sigma] + [getattr(result, name)[:, None] for name in _QUALITY]
    return np.concatenate(columns, axis=1)


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
        key = tuple(int(i) for i in index)
        if key not in self._read:
            self._read[key] = np.asarray(self._frames.data[np.asarray(index)].compute())
        return self._read[key]


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
    return detect_defects(sample.get(sample_indices(0, frames.shape[0])), user_mask)


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
        built = build((sample or _Sample(frames)).get(index), mask, max_shift=max_shift, bright_pixels=bright_pixels)
        anchor = int(index[built.anchor])
        label = f"{spec}: {built.n_frames} aligned frames averaged, anchored on frame {anchor}"
        return built.image, built.mask, label, anchor
    selected = np.asarray(frames.data[spec.start:spec.stop].compute())
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
    block_frames, array
        See :class:`driftcorr.config.CorrectionConfig`; None keeps the default.
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
                          tame_outliers=tame_outliers, bandpass=bandpass, block_frames=block_frames, array=array)
    frames = as_stack(stack, array=cfg.array, block_frames=cfg.block_frames)
    frame_shape = tuple(frames.shape[1:])
    sample = _Sample(frames)  # read once: defect detection and the iterative reference share it
    defects = find_defects(frames, _mask_array(mask, frame_shape), detect=cfg.detect_defects, sample=sample)
    if not defects.mask.any():
        raise InputError("no pixel is left to register once the mask and the detected defects are removed; "
                         "check the mask (True marks the pixels to use)")
    bright = np.isin(defects.codes, (DEFECT_CODES["hot"], DEFECT_CODES["stuck"]))
    image, image_mask, reference_label, anchor = make_reference(frames, cfg.reference, defects.mask,
                                                                max_shift=cfg.max_shift, bright_pixels=bright,
                                                                sample=sample)
    plan = make_plan(image, reference_mask=image_mask, moving_mask=defects.mask, max_shift=cfg.max_shift,
                     method=cfg.method, min_overlap=cfg.min_overlap, tame_outliers=cfg.tame_outliers,
                     bright_pixels=bright, bandpass=cfg.bandpass)
    ndim = len(frame_shape)
    plan_key = dask.delayed(plan, pure=True)
    table = frames.data.map_blocks(
        _register_block, plan_key, cfg.upsample_factor, dtype=np.float64,
        drop_axis=list(range(2, ndim + 1)), chunks=(frames.data.chunks[0], (2 * ndim + 3,)),
    )
    values = table.compute()
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
                          reference=image, reference_mask=image_mask, defects=defects,
                          reference_label=reference_label, anchor=anchor, sigma_anchor=sigma_anchor,
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
                        attrs={"long_name": "drift-corrected frames", "units": "counts"})


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
    overwrite: bool = False,
    estimate_only: bool = False,
    config: CorrectionConfig | None = None,
) -> xr.Dataset:
    """Estimate the drift of a stored stack and write shifts, quality and the corrected stack to ``output``.

    Parameters
    ----------
    input : str, path-like, or array
        The raw stack (see :func:`estimate_drift`).
    output : str or path-like
        Location of the output Zarr v3 group.
    mask, reference, upsample_factor, max_shift, method, detect_defects, tame_outliers, bandpass, block_frames, array
        As in :func:`estimate_drift`.
    interpolation_order : int, optional
        Spline order used to shift frames.
    overwrite : bool
        Replace an existing driftcorr output (anything else is never deleted).
    estimate_only : bool
        Write the drift and quality only, not the corrected stack.
    config : CorrectionConfig, optional
        A validated configuration; replaces the keyword options.

    Returns
    -------
    xarray.Dataset
        The written output, opened lazily.
    """
    cfg = _resolve_config(config, reference=reference, upsample_factor=upsample_factor, max_shift=max_shift,
                          method=method, detect_defects=detect_defects, tame_outliers=tame_outliers,
                          bandpass=bandpass, interpolation_order=interpolation_order, block_frames=block_frames,
                          array=array)
    frames = as_stack(input, array=cfg.array, block_frames=cfg.block_frames)
    source = frames.attrs.get("source")
    location = store.prepare_output(output, input_location=source, overwrite=overwrite)
    drift = estimate_drift(frames, mask=mask, config=cfg)
    if not estimate_only:
        corrected = apply_drift(frames, drift, interpolation_order=cfg.interpolation_order,
                                block_frames=frames.data.chunksize[0])
        drift["corrected"] = corrected
    store.write_output(drift, location, attrs=dict(drift.attrs), block_frames=frames.data.chunksize[0])
    return xr.open_zarr(location, consolidated=False)


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
