"""Storage: the only module that touches Zarr and files on disk.

Opens input stacks (Zarr v2/v3 arrays, or a group holding one), reads mask files, and writes the output group of
DESIGN §3 with its completion status written last.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr

from .errors import InputError, OutputError, OutputExistsError

STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"
MARKER_ATTR = "driftcorr_version"
#: Frames of 512×512 per block; other frame sizes scale to the same number of pixels.
_BLOCK_PIXELS = 16 * 512 * 512
_MAX_BLOCK_FRAMES = 64
SPATIAL_DIMS = {2: ("y", "x"), 3: ("z", "y", "x")}


def _location(path_or_url) -> str:
    return os.fspath(path_or_url)


def _is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def _open_node(location: str):
    if not _is_remote(location) and not Path(location).exists():
        raise InputError(f"input {location!r} does not exist; give the path of a Zarr array or group")
    try:
        return zarr.open(location, mode="r")
    except (FileNotFoundError, KeyError, ValueError, TypeError) as error:
        raise InputError(f"input {location!r} is not a readable Zarr array or group ({error})") from None


def _pick_array(node, location: str, array: str | None):
    if isinstance(node, zarr.Array):
        if array is not None:
            raise InputError(f"input {location!r} is a single array; drop --array {array!r}")
        return node
    if array is not None:
        try:
            chosen = node[array]
        except KeyError:
            names = sorted(name for name, _ in node.arrays())
            raise InputError(f"group {location!r} has no array {array!r}; its arrays: {names}") from None
        if not isinstance(chosen, zarr.Array):
            raise InputError(f"{array!r} in {location!r} is a group, not an array; name an array with --array")
        return chosen
    candidates = sorted((name, arr) for name, arr in node.arrays() if arr.ndim in (3, 4))
    if not candidates:
        raise InputError(f"group {location!r} holds no 3-D or 4-D array; give the array's path or --array NAME")
    if len(candidates) > 1:
        names = [name for name, _ in candidates]
        raise InputError(f"group {location!r} holds several stacks {names}; choose one with --array NAME")
    return candidates[0][1]


def block_frames_for(frame_shape: tuple[int, ...], requested: int | None = None) -> int:
    """Frames per block (one task, one write unit): about 4 Mpixel, at most 64 frames."""
    if requested is not None:
        return int(requested)
    return int(np.clip(_BLOCK_PIXELS // int(np.prod(frame_shape)), 1, _MAX_BLOCK_FRAMES))


def open_stack(path_or_url, *, array: str | None = None, block_frames: int | None = None) -> xr.DataArray:
    """Open an image stack lazily.

    Parameters
    ----------
    path_or_url : str or path-like
        A Zarr array (v2 or v3), or a group holding one 3-D (or 4-D) array.
    array : str, optional
        Name of the array inside a group that holds several.
    block_frames : int, optional
        Frames per Dask chunk (chunks always span whole frames). Default: from the frame size.

    Returns
    -------
    xarray.DataArray
        Dims ``(frame, y, x)`` (``(frame, z, y, x)`` for volumes), backed by a Dask array.
    """
    location = _location(path_or_url)
    arr = _pick_array(_open_node(location), location, array)
    validate_stack_shape(arr.shape, arr.dtype, location)
    blocks = block_frames_for(arr.shape[1:], block_frames)
    data = da.from_zarr(arr, chunks=(blocks, *arr.shape[1:]))
    dims = ("frame", *SPATIAL_DIMS[arr.ndim - 1])
    return xr.DataArray(data, dims=dims, coords={"frame": np.arange(arr.shape[0])}, name="frames",
                        attrs={"source": location})


def validate_stack_shape(shape: tuple[int, ...], dtype, where: str = "input") -> None:
    """Refuse stacks that cannot be registered, naming the problem."""
    dtype = np.dtype(dtype)
    if len(shape) not in (3, 4):
        raise InputError(f"{where} must be a stack of frames (frame, y, x) or volumes (frame, z, y, x); "
                         f"got {len(shape)}-D shape {tuple(shape)}")
    if dtype.kind not in "uif":
        raise InputError(f"{where} has dtype {dtype}; frames must be integer or floating point")
    if shape[0] == 0:
        raise InputError(f"{where} has no frames (shape {tuple(shape)})")
    if min(shape[1:]) < 4:
        raise InputError(f"{where} frames are too small to register (shape {tuple(shape)})")


def load_mask(path_or_url, frame_shape: tuple[int, ...]) -> np.ndarray:
    """Read a mask file: ``.npy``, ``.tif``/``.tiff``, ``.png`` (nonzero = valid) or a Zarr array.

    Returns
    -------
    ndarray of bool
        True where pixels are valid.
    """
    location = _location(path_or_url)
    suffix = Path(location.rstrip("/")).suffix.lower()
    if not _is_remote(location) and not Path(location).exists():
        raise InputError(f"mask {location!r} does not exist")
    try:
        if suffix == ".npy":
            data = np.load(location, allow_pickle=False)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            data = tifffile.imread(location)
        elif suffix == ".png":
            import imageio.v3 as iio

            data = iio.imread(location)
            if data.ndim == 3 and len(frame_shape) == 2:
                data = data[..., :3].max(axis=-1) if data.shape[-1] in (3, 4) else data
        else:
            node = zarr.open(location, mode="r")
            if not isinstance(node, zarr.Array):
                raise InputError(f"mask {location!r} is a Zarr group; give the path of the mask array")
            data = node[...]
    except InputError:
        raise
    except Exception as error:  # any reader failure means the same thing to the user
        raise InputError(f"cannot read mask {location!r} ({type(error).__name__}: {error}); "
                         "use .npy, .tif, .png or a Zarr array") from None
    data = np.asarray(data)
    if data.shape != tuple(frame_shape):
        raise InputError(f"mask {location!r} has shape {data.shape} but frames are {tuple(frame_shape)}")
    if np.iscomplexobj(data):
        raise InputError(f"mask {location!r} has complex values; use nonzero = valid pixel")
    mask = data.astype(bool)
    if not mask.any():
        raise InputError(f"mask {location!r} marks no pixel as valid (all zero); nonzero = valid pixel")
    return mask


def write_stack(data, path_or_url, *, block_frames: int | None = None, zarr_format: int = 3,
                overwrite: bool = False) -> str:
    """Write an in-memory or Dask stack as a Zarr array (chunks of whole frames). Returns the location."""
    location = _location(path_or_url)
    shape = tuple(data.shape)
    blocks = block_frames_for(shape[1:], block_frames)
    arr = zarr.create_array(location, shape=shape, dtype=data.dtype, chunks=(blocks, *shape[1:]),
                            zarr_format=zarr_format, overwrite=overwrite)
    if isinstance(data, da.Array):
        da.store(data.rechunk((blocks, *shape[1:])), arr, lock=False)
    else:
        arr[...] = np.asarray(data)
    return location


def read_status(path_or_url) -> str | None:
    """Completion status of a driftcorr output, or None if the location is not a driftcorr output."""
    location = _location(path_or_url)
    try:
        group = zarr.open_group(location, mode="r")
    except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.GroupNotFoundError):
        return None
    attrs = dict(group.attrs)
    if MARKER_ATTR not in attrs:
        return None
    return attrs.get("status", STATUS_INCOMPLETE)


def prepare_output(output, *, input_location: str | None, overwrite: bool) -> str:
    """Check that the output may be written; nothing is deleted here (see :func:`remove_previous_output`).

    Raises
    ------
    OutputExistsError
        The output exists and ``overwrite`` is False.
    OutputError
        The output is the input, lies inside it, cannot be written, or is not a driftcorr output.
    """
    location = _location(output)
    if _is_remote(location):
        return location
    out_path = Path(location).resolve()
    if input_location is not None and not _is_remote(input_location):
        in_path = Path(input_location).resolve()
        if out_path == in_path or in_path in out_path.parents or out_path in in_path.parents:
            raise OutputError(f"output {location!r} overlaps the input {input_location!r}; "
                              "choose an output outside the input")
    if out_path.exists():
        if not overwrite:
            raise OutputExistsError(f"output {location!r} already exists; pass --overwrite to replace it")
        if read_status(out_path) is None:
            raise OutputError(f"output {location!r} exists and is not a driftcorr output; refusing to delete it, "
                              "choose another output")
    parent = out_path.parent
    if not parent.exists():
        try:
            parent.mkdir(parents=True)
        except OSError as error:
            raise OutputError(f"cannot create the output's folder {str(parent)!r}: {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise OutputError(f"output folder {str(parent)!r} is not writable; choose another output")
    return location


def remove_previous_output(output) -> None:
    """Delete a previous driftcorr output at ``output`` (call only once the new result is ready to be written)."""
    location = _location(output)
    if _is_remote(location) or not Path(location).exists():
        return
    if read_status(location) is None:
        raise OutputError(f"output {location!r} is not a driftcorr output; refusing to delete it")
    shutil.rmtree(location)


def write_output(dataset: xr.Dataset, output, *, attrs: dict, block_frames: int) -> str:
    """Write the correction Dataset as a Zarr v3 group; the status becomes ``complete`` only at the very end.

    ``dataset`` may hold Dask-backed variables (the corrected stack): they are computed block by block as they
    are written, one Zarr chunk per block.
    """
    location = _location(output)
    ds = dataset.copy()
    ds.attrs = {**attrs, MARKER_ATTR: attrs[MARKER_ATTR], "status": STATUS_INCOMPLETE}
    for key, value in list(ds.attrs.items()):
        if isinstance(value, dict):
            ds.attrs[key] = json.dumps(value, sort_keys=True)
    encoding = {}
    for name, variable in ds.data_vars.items():
        if "frame" in variable.dims and variable.ndim >= 3:
            encoding[name] = {"chunks": (block_frames, *variable.shape[1:])}
    remove_previous_output(location)
    ds.to_zarr(location, mode="w-", zarr_format=3, consolidated=False, encoding=encoding)
    group = zarr.open_group(location, mode="r+")
    group.attrs["status"] = STATUS_COMPLETE
    # Consolidated metadata lets ``xarray.open_zarr(OUTPUT)`` open the finished output in one read.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(location)
    return location
