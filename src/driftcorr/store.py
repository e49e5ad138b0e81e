"""Storage: the only module that touches Zarr and files on disk.

Opens input stacks (Zarr v2/v3 arrays, or a group holding one), reads mask files, and writes the output group of
DESIGN §3 with its completion status written last.

A resumable output (DESIGN §5) also holds a ``_progress`` subgroup (ignored by ``xarray.open_zarr``): the raw
registration of every frame, the shift each corrected frame was made with, and per-block done markers (one chunk
per block, written after the block's data). Its creation is the last step of setting an output up, so an output
without it was interrupted before any frame was processed. A lock file in the output folder keeps a second
process out while one is writing. Every array is written with a CRC32C checksum after compression.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dask.array as da
import numpy as np
import xarray as xr
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

from .errors import ConfigError, InputError, OutputError, OutputExistsError, OutputLockedError

STATUS_COMPLETE = "complete"
STATUS_INCOMPLETE = "incomplete"
MARKER_ATTR = "driftcorr_version"
#: Frames of 512×512 per block; other frame sizes scale to the same number of pixels.
_BLOCK_PIXELS = 16 * 512 * 512
_MAX_BLOCK_FRAMES = 64
SPATIAL_DIMS = {2: ("y", "x"), 3: ("z", "y", "x")}
PROGRESS = "_progress"
#: Raw registration results per frame, the shift each corrected frame was made with, and the done markers.
REGISTRATION, APPLIED_SHIFT = f"{PROGRESS}/registration", f"{PROGRESS}/applied_shift"
REGISTERED, CORRECTED = f"{PROGRESS}/registered", f"{PROGRESS}/corrected"
#: Per block: 1 where the input's frames could not be read (they are marked invalid).
UNREADABLE = f"{PROGRESS}/unreadable"
_PROGRESS_ARRAYS = ("registration", "applied_shift", "registered", "corrected", "unreadable")
LOCK_NAME = ".driftcorr.lock"
#: Attribute holding the number of frames an output has been fully set up for (written after a growth).
COMMITTED_ATTR = "frames_committed"
#: Frames per chunk of the per-frame tables (shift, sigma, ...) and coordinates of an output.
TABLE_CHUNK = 4096
#: Encoding of time coordinates in outputs: int64 microseconds.
TIME_UNITS = "microseconds since 1970-01-01"


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
    coords = {"frame": np.arange(arr.shape[0]), **_frame_coordinates(location, arr)}
    return xr.DataArray(data, dims=dims, coords=coords, name="frames",
                        attrs={"source": location, "array_path": arr.path})


def _frame_coordinates(location: str, arr) -> dict:
    """Coordinates along the frames of an array written by xarray (a ``time``, say), decoded; {} for others."""
    names = getattr(arr.metadata, "dimension_names", None) or arr.attrs.get("_ARRAY_DIMENSIONS") or (None,)
    first = names[0]
    if first is None or first == "frame" or not arr.path or "/" in arr.path:
        return {}
    try:
        with _lock_file_ignored():
            coordinate = xr.open_zarr(location, consolidated=False)[first]
    except Exception:  # not an xarray-style group: no coordinates to carry
        return {}
    if coordinate.dims != (first,) or coordinate.shape[0] != arr.shape[0]:
        return {}
    return {first: ("frame", coordinate.values)}


@dataclass(frozen=True)
class FrameReader:
    """Reads frames ``start:stop`` of a stored stack straight from its Zarr array.

    Tasks read their block with it, so that a block whose chunks cannot be read (damaged, checksum mismatch) is
    known by its frames instead of stopping the whole computation.
    """

    location: str
    path: str

    def __call__(self, start: int, stop: int) -> np.ndarray:
        array = zarr.open_array(self.location, path=self.path, mode="r")
        frames = array[start:stop]
        fill = array.metadata.fill_value
        flat = frames.reshape(len(frames), -1)
        unwritten = np.zeros(len(flat), dtype=bool)
        # Only frames whose first pixel holds the fill value can hold nothing else: the others are not compared.
        for i in np.flatnonzero(_is_fill(flat[:, 0], fill)):
            unwritten[i] = _is_fill(flat[i], fill).all()
        if unwritten.any():
            # Nothing but the fill value: a chunk not written (yet). The block is retried by the next run, so
            # frames appended by resizing the array before writing them are registered once they are written.
            raise FileNotFoundError(f"frames {start + int(np.argmax(unwritten))}.. hold only the fill value "
                                    "(chunk missing or not written yet)")
        return frames


def _is_fill(values: np.ndarray, fill) -> np.ndarray:
    """Where ``values`` equal an array's fill value (NaN equals a NaN fill value)."""
    if values.dtype.kind == "f":
        return (values == fill) | (np.isnan(values) & np.isnan(fill))
    return values == fill


def frame_reader(frames: xr.DataArray) -> FrameReader | None:
    """A :class:`FrameReader` for a stack opened by :func:`open_stack` (None for other stacks)."""
    if "source" in frames.attrs and "array_path" in frames.attrs:
        return FrameReader(absolute(frames.attrs["source"]), frames.attrs["array_path"])
    return None


def set_storage_options(storage_options: dict) -> dict:
    """Default fsspec options per protocol (``{"s3": {"endpoint_url": ...}}``) for every URL this process opens.

    Returns the previous options of those protocols, for :func:`restore_storage_options`.
    """
    if not storage_options:
        return {}
    import fsspec.config

    saved = {}
    for protocol, values in storage_options.items():
        if not isinstance(values, dict):
            raise ConfigError(f"[storage_options.{protocol}] must be a table of options for that protocol")
        saved[protocol] = dict(fsspec.config.conf.get(protocol, {}))
        fsspec.config.conf.setdefault(protocol, {}).update(values)
    return saved


def restore_storage_options(saved: dict) -> None:
    """Put back the fsspec options :func:`set_storage_options` replaced."""
    import fsspec.config

    for protocol, values in saved.items():
        fsspec.config.conf[protocol] = values


def absolute(location: str) -> str:
    """A local path made absolute (workers of a cluster need not share our working folder); URLs unchanged."""
    return location if _is_remote(location) else os.path.abspath(location)


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
    state = read_output(path_or_url)
    return None if state is None else state.status


def prepare_output(output, *, input_location: str | None, overwrite: bool, resumable: bool = False) -> str:
    """Check that the output may be written; nothing is deleted here (see :func:`remove_previous_output`).

    With ``resumable``, an existing driftcorr output (or an empty folder) is accepted whatever ``overwrite`` says:
    the caller resumes, extends or (with ``overwrite``) restarts it.

    Raises
    ------
    OutputExistsError
        The output exists and ``overwrite`` is False (not ``resumable``).
    OutputError
        The output is the input, lies inside it, cannot be written, or is not a driftcorr output.
    """
    location = _location(output)
    if _is_remote(location):
        return _prepare_remote_output(location, input_location, overwrite=overwrite, resumable=resumable)
    out_path = Path(location).resolve()
    if input_location is not None and not _is_remote(input_location):
        in_path = Path(input_location).resolve()
        if out_path == in_path or in_path in out_path.parents or out_path in in_path.parents:
            raise OutputError(f"output {location!r} overlaps the input {input_location!r}; "
                              "choose an output outside the input")
    if out_path.exists() and resumable:
        if read_status(out_path) is None and not is_empty_folder(out_path):
            raise OutputError(f"output {location!r} exists and is not a driftcorr output; refusing to write into it, "
                              "choose another output")
    elif out_path.exists():
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


def _prepare_remote_output(location: str, input_location: str | None, *, overwrite: bool, resumable: bool) -> str:
    """:func:`prepare_output` for a URL: no overlap with the input, and nothing but a driftcorr output replaced."""
    if input_location is not None and _is_remote(input_location):
        out_url, in_url = location.rstrip("/") + "/", input_location.rstrip("/") + "/"
        if out_url.startswith(in_url) or in_url.startswith(out_url):
            raise OutputError(f"output {location!r} overlaps the input {input_location!r}; "
                              "choose an output outside the input")
    try:
        existing = zarr.open(location, mode="r")
    except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.NodeNotFoundError):
        return location
    except Exception:  # nothing readable there (or no permission to list it): treat as absent
        return location
    ours = isinstance(existing, zarr.Group) and MARKER_ATTR in existing.attrs
    if not ours:
        raise OutputError(f"output {location!r} exists and is not a driftcorr output; refusing to write into it, "
                          "choose another output")
    if not resumable and not overwrite:
        raise OutputExistsError(f"output {location!r} already exists; pass --overwrite to replace it")
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
    encoding = output_encoding(ds, block_frames)
    remove_previous_output(location)
    ds.to_zarr(location, mode="w-", zarr_format=3, consolidated=False, encoding=encoding)
    group = zarr.open_group(location, mode="r+")
    group.attrs["status"] = STATUS_COMPLETE
    # Consolidated metadata lets ``xarray.open_zarr(OUTPUT)`` open the finished output in one read.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        zarr.consolidate_metadata(location)
    return location


def checksummed(*, stack: bool = False) -> dict:
    """Zarr v3 codecs of a written array, ending in a CRC32C checksum so that a damaged chunk is an error.

    Frame stacks are compressed with blosc lz4 after byte shuffling: on corrected float32 frames it writes 3x
    faster than zstd level 3 and compresses a little better (``benchmarks/compressors.py``); the small arrays
    with zstd level 3.
    """
    compressor = BloscCodec(cname="lz4", clevel=5, shuffle="shuffle") if stack else ZstdCodec(level=3)
    return {"compressors": (compressor, Crc32cCodec())}


def output_encoding(dataset: xr.Dataset, block_frames: int) -> dict:
    """xarray encoding of an output: checksummed arrays; frame stacks chunked one block of frames per chunk."""
    encoding = {}
    for name, variable in dataset.variables.items():
        stack = "frame" in variable.dims and variable.ndim >= 3
        encoding[name] = checksummed(stack=stack)
        if stack:
            encoding[name]["chunks"] = (block_frames, *variable.shape[1:])
        elif variable.dims[:1] == ("frame",):  # per-frame tables and coordinates: fixed chunks, appends add few
            encoding[name]["chunks"] = (TABLE_CHUNK, *variable.shape[1:])
        if np.issubdtype(variable.dtype, np.datetime64):
            # Explicit and fixed, so that appended times are written in the same units (DESIGN §5).
            encoding[name].update(units=TIME_UNITS, dtype="int64")
        elif np.issubdtype(variable.dtype, np.timedelta64):
            encoding[name].update(units="microseconds", dtype="int64")
    return encoding


# ---------------------------------------------------------------------------------------- resumable outputs
@dataclass(frozen=True)
class OutputState:
    """What an existing driftcorr output holds.

    Attributes
    ----------
    attrs : dict
        The group's attributes (JSON strings decoded).
    n_frames : int
        Frames the output has room for.
    ready : bool
        Set up completely (static variables and progress arrays written); False: interrupted during set-up.
    """

    attrs: dict
    n_frames: int
    ready: bool

    @property
    def status(self) -> str:
        return self.attrs.get("status", STATUS_INCOMPLETE)


def _open_output(location: str, mode: str = "r"):
    return zarr.open_group(location, mode=mode, use_consolidated=False)


@contextmanager
def _lock_file_ignored():
    """Zarr warns about any file it does not know while listing a group, such as the lock file: not a problem."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Object at .* is not recognized")
        warnings.filterwarnings("ignore", message="Consolidated metadata", category=UserWarning)
        yield


def read_output(output) -> OutputState | None:
    """The state of the driftcorr output at ``output``, or None if there is none (absent, or not ours)."""
    location = _location(output)
    try:
        group = _open_output(location)
    except (FileNotFoundError, KeyError, ValueError, TypeError, zarr.errors.GroupNotFoundError):
        return None
    attrs = dict(group.attrs)
    if MARKER_ATTR not in attrs:
        return None
    for key, value in attrs.items():
        if isinstance(value, str) and value[:1] in "{[":
            try:
                attrs[key] = json.loads(value)
            except json.JSONDecodeError:
                pass
    with _lock_file_ignored():
        members = dict(group.members())
    n_frames = int(members["frame"].shape[0]) if "frame" in members else 0
    n_frames = int(attrs.get(COMMITTED_ATTR, n_frames))  # arrays may have been resized by a growth cut short
    ready = False
    if PROGRESS in members and isinstance(members[PROGRESS], zarr.Group):
        with _lock_file_ignored():
            present = {name for name, _ in members[PROGRESS].arrays()}
        ready = set(_PROGRESS_ARRAYS) <= present  # all of them: set-up may have been killed between two
    return OutputState(attrs=attrs, n_frames=n_frames, ready=ready)


def open_output_dataset(output) -> xr.Dataset:
    """An output opened lazily with xarray, also while it is being written (its lock file is no array)."""
    with _lock_file_ignored():
        return xr.open_zarr(_location(output), consolidated=False)


def is_empty_folder(output) -> bool:
    """True where ``output`` is a local folder holding nothing (or only a driftcorr lock)."""
    location = _location(output)
    if _is_remote(location) or not Path(location).is_dir():
        return False
    return all(entry.name == LOCK_NAME for entry in Path(location).iterdir())


def clear_output(output) -> None:
    """Delete the contents of a driftcorr output, keeping the folder and its lock (the caller holds it)."""
    location = _location(output)
    if read_output(location) is None and not is_empty_folder(location):
        raise OutputError(f"output {location!r} is not a driftcorr output; refusing to delete it")
    if _is_remote(location):
        zarr.open_group(location, mode="w")
        return
    # The root zarr.json last: killed half-way, the folder is still recognised as a driftcorr output.
    entries = sorted(Path(location).iterdir(), key=lambda entry: entry.name == "zarr.json")
    for entry in entries:
        if entry.name == LOCK_NAME:
            continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()


def clean_partial_files(output) -> int:
    """Remove the temporary ``*.partial`` files a killed write leaves in a local output; returns how many."""
    location = _location(output)
    if _is_remote(location) or not Path(location).is_dir():
        return 0
    removed = 0
    for path in Path(location).rglob("*.partial"):
        path.unlink(missing_ok=True)
        removed += 1
    return removed


def create_output(template: xr.Dataset, output, *, block_frames: int, n_columns: int) -> None:
    """Set up a resumable output: metadata, static variables, then the progress arrays (last: set-up is done).

    ``template`` holds the output's variables; those along ``frame`` may be lazy placeholders (not computed:
    only their metadata is written). Its attributes must include :data:`MARKER_ATTR` and the status.
    """
    location = _location(output)
    encoding = output_encoding(template, block_frames)
    with _lock_file_ignored():
        template.to_zarr(location, mode="a", compute=False, consolidated=False, zarr_format=3, encoding=encoding)
    n_frames = template.sizes["frame"]
    ndim = template.sizes["axis"]
    n_blocks = -(-n_frames // block_frames)
    progress = _open_output(location, "r+").create_group(PROGRESS)
    common = checksummed()
    progress.create_array("registration", shape=(n_frames, n_columns), chunks=(block_frames, n_columns),
                          dtype=np.float64, fill_value=np.nan, **common)
    progress.create_array("applied_shift", shape=(n_frames, ndim), chunks=(block_frames, ndim),
                          dtype=np.float64, fill_value=np.nan, **common)
    for name in ("registered", "corrected", "unreadable"):
        progress.create_array(name, shape=(n_blocks,), chunks=(1,), dtype=np.int32, fill_value=0, **common)


def grow_output(output, old: int, n_frames: int, block_frames: int, frame_coords: dict) -> None:
    """Make room for ``n_frames`` frames (the input has grown from ``old``): resize every frame array, write the new
    coordinates, then record the new length (:data:`COMMITTED_ATTR`). Repeating it after a kill is harmless.

    Parameters
    ----------
    frame_coords : dict of str to ndarray
        Full values of the coordinates along ``frame`` (only the part from ``old`` on is written).
    """
    location = _location(output)
    group = _open_output(location, "r+")
    with _lock_file_ignored():
        arrays = list(group.arrays())
    for _, array in arrays:
        if (array.metadata.dimension_names or (None,))[0] == "frame":
            array.resize((n_frames, *array.shape[1:]))
    progress = group[PROGRESS]
    for name in ("registration", "applied_shift"):
        progress[name].resize((n_frames, *progress[name].shape[1:]))
    for name in ("registered", "corrected", "unreadable"):
        progress[name].resize((-(-n_frames // block_frames),))
    for name, values in frame_coords.items():
        if name in group:
            values = np.asarray(values)[old:]
            if np.issubdtype(values.dtype, np.datetime64):
                values = values.astype("datetime64[us]").astype(np.int64)  # TIME_UNITS
            elif np.issubdtype(values.dtype, np.timedelta64):
                values = values.astype("timedelta64[us]").astype(np.int64)  # microseconds
            group[name][old:] = values
    set_attributes(location, {COMMITTED_ATTR: int(n_frames)}, status=STATUS_INCOMPLETE)


def write_block(output, start: int, arrays: dict, markers: str | tuple[str, ...], block: int, *,
                unreadable: bool | None = False) -> None:
    """Write one block's data, then its done markers (the number of frames it holds).

    Parameters
    ----------
    start : int
        First frame of the block.
    arrays : dict of str to ndarray
        Array path in the output to the block's values (frames along the first axis).
    markers : str or tuple of str
        Paths of the marker arrays (:data:`REGISTERED`, :data:`CORRECTED`), written in order after all the data.
    block : int
        Index of the block.
    unreadable : bool or None
        The block's input frames could not be read (recorded in :data:`UNREADABLE`); None leaves the record as
        it is (the caller knows it is clear).
    """
    group = _open_output(_location(output), "r+")
    count = 0
    for name, values in arrays.items():
        values = np.asarray(values)
        # Whole chunks of computed values: no need for Zarr to look for chunks that hold only the fill value.
        group[name].with_config({"write_empty_chunks": True})[start:start + values.shape[0]] = values
        count = values.shape[0]
    if unreadable is not None:
        group[UNREADABLE][block] = int(unreadable)  # a block read after all is no longer reported
    for marker in (markers,) if isinstance(markers, str) else markers:
        group[marker][block] = count


def read_array(output, name: str) -> np.ndarray:
    """The whole array ``name`` of an output, in memory."""
    return _open_output(_location(output))[name][...]


def write_changed_rows(output, name: str, values: np.ndarray) -> None:
    """Write a per-frame array, only from its first frame that differs from what is stored (NaN equals NaN)."""
    array = _open_output(_location(output), "r+")[name]
    stored = array[...]
    values = np.asarray(values, dtype=array.dtype)
    same = values == stored
    if values.dtype.kind == "f":
        same |= np.isnan(values) & np.isnan(stored)
    rows = np.flatnonzero(~same.reshape(values.shape[0], -1).all(axis=1))
    if rows.size:
        array[rows[0]:] = values[rows[0]:]


def set_attributes(output, attrs: dict, *, status: str) -> None:
    """Update the output's attributes and status; a ``complete`` status also consolidates the metadata.

    While an output is being changed its consolidated metadata is stale, so it is rewritten with the status
    ``incomplete`` first: a reader that trusts consolidated metadata never sees a changing output as complete.
    """
    location = _location(output)
    group = _open_output(location, "r+")
    encoded = {key: json.dumps(value, sort_keys=True) if isinstance(value, dict) else value
               for key, value in attrs.items()}
    group.attrs.update({**encoded, "status": status})
    with _lock_file_ignored():
        zarr.consolidate_metadata(location)


# --------------------------------------------------------------------------------------------------- locks
def read_lock(output) -> dict | None:
    """Who holds the output's lock (``pid``, ``host``, ``since``), or None when no running process holds it."""
    path = Path(_location(output)) / LOCK_NAME
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except (FileNotFoundError, NotADirectoryError):
        return None
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                return json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                return {}
        fcntl.flock(descriptor, fcntl.LOCK_UN)
        return None  # a file left by a killed run: nobody holds it
    finally:
        os.close(descriptor)


def _take_lock(path: Path, location: str) -> int:
    """An open descriptor of the lock file, exclusively locked (``flock``) by this process."""
    owner = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(20):
        descriptor = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(descriptor)
            holder = read_lock(location) or {}
            raise OutputLockedError(
                f"output {location!r} is being written by process {holder.get('pid', '?')} on "
                f"{holder.get('host', '?')}; wait for it to finish or write to another output") from None
        try:
            current = os.stat(path).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            current = False
        if current:
            os.ftruncate(descriptor, 0)
            os.write(descriptor, json.dumps(owner).encode())
            return descriptor
        os.close(descriptor)  # the previous holder removed the file we locked: lock the new one
    raise OutputLockedError(f"output {location!r}: could not take its lock; try again")


@contextmanager
def output_lock(output):
    """Hold the output's lock while writing it; refuse when another running process holds it.

    The lock is an exclusive ``flock`` on a file in the output folder: the system releases it when its process
    ends, however it ends, so a lock left by a killed run never blocks the next one. The output folder is created
    here if needed, and removed again on the way out if nothing was written into it. Object-store outputs are not
    locked.
    """
    location = _location(output)
    if _is_remote(location):
        yield
        return
    folder = Path(location)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    descriptor = _take_lock(path, location)
    try:
        yield
    finally:
        path.unlink(missing_ok=True)  # still holding it: a process waiting on this file retries on the new one
        os.close(descriptor)
        if created and folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()


def describe_output(output) -> str:
    """A few lines on a driftcorr output: completion, frames registered and corrected, lock, input, configuration."""
    location = _location(output)
    state = read_output(location)
    if state is None:
        raise InputError(f"{location!r} is not a driftcorr output; give the OUTPUT of 'driftcorr correct' or "
                         "'driftcorr estimate'")
    lines = [f"output      {location}", f"status      {state.status}"]
    if state.ready:
        group = _open_output(location)
        total = state.n_frames
        registered = int(group[REGISTERED][...].sum())
        lines.append(f"registered  {registered} / {total} frames")
        if "corrected" in group:
            lines.append(f"corrected   {int(group[CORRECTED][...].sum())} / {total} frames")
    else:
        lines.append("registered  0 frames (set-up not finished)")
    owner = read_lock(location) if not _is_remote(location) else None
    if owner is not None:
        lines.append(f"locked by   process {owner.get('pid', '?')} on {owner.get('host', '?')} since "
                     f"{owner.get('since', '?')}")
    lines.append(f"input       {state.attrs.get('input', '?')}")
    config = state.attrs.get("config", {})
    lines.append("config      " + (json.dumps(config, sort_keys=True) if isinstance(config, dict) else str(config)))
    return "\n".join(lines)
