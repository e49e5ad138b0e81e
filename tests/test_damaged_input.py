"""Damaged and missing chunks of the input: the run goes on, the frames they hold are marked invalid.

Decision (README, "Bad input"): a chunk that cannot be read (corrupted bytes, failed checksum) marks the frames of
its block invalid, their shift interpolated and their corrected frames NaN; the run completes (exit 0) with one
warning line naming the frames, and the output records them in ``unreadable_frames``. A missing chunk (frames
holding nothing but the fill value) is treated the same way; the next run retries such blocks.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from driftcorr.store import write_stack
from driftcorr.synthetic import make_run

from .helpers import rms_error

BLOCK = 8


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    """48 frames of 64² in chunks of 8: chunk 2 (frames 16-23) corrupted, chunk 4 (frames 32-39) missing."""
    root = tmp_path_factory.mktemp("damaged")
    run = make_run(48, (64, 64), seed=5, jump_px=None)
    raw = write_stack(run.stack(), root / "raw.zarr", block_frames=BLOCK)
    chunk = root / "raw.zarr" / "c" / "2" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    for position in (10, len(data) // 2):
        data[position] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (root / "raw.zarr" / "c" / "4" / "0" / "0").unlink()
    np.save(root / "mask.npy", run.beam_block)
    files = {p: p.read_bytes() for p in (root / "raw.zarr").rglob("*") if p.is_file()}
    out = root / "out.zarr"
    done = subprocess.run([sys.executable, "-m", "driftcorr.cli", "correct", raw, str(out), "--mask",
                           str(root / "mask.npy"), "--block-frames", str(BLOCK)], capture_output=True, text=True,
                          timeout=300)
    return run, root, files, out, done


def test_damaged_chunk_marks_its_frames_invalid_and_the_run_completes(damaged):
    run, root, files, out, done = damaged
    assert done.returncode == 0, done.stderr
    warning = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(warning) == 1 and "frames 16-23, 32-39" in warning[0] and "Traceback" not in done.stderr, done.stderr
    ds = xr.open_zarr(out).load()
    assert ds.attrs["status"] == "complete"
    assert [list(pair) for pair in ds.attrs["unreadable_frames"]] == [[16, 23], [32, 39]]
    valid = ds["valid"].values
    assert not valid[16:24].any() and np.isnan(ds["raw_shift"].values[16:24]).all()
    assert np.isnan(ds["corrected"].values[16:24]).all()
    # Interpolated between the trusted neighbours; the readable frames are registered as usual.
    shift = ds["shift"].values
    assert valid[15] and valid[24]
    for axis in range(2):
        expected = np.interp(np.arange(16, 24), [15, 24], shift[[15, 24], axis])
        np.testing.assert_allclose(shift[16:24, axis], expected, atol=1e-9)
    truth = run.true_shifts(int(ds.attrs["reference_frame"]))
    readable = valid & ~run.beam_off
    assert readable.sum() >= 30
    assert rms_error(ds["shift"].values[readable], truth[readable]) <= 0.05


def test_missing_chunk_marks_its_frames_invalid_until_it_is_written(damaged, tmp_path):
    run, root, _, out, _ = damaged
    ds = xr.open_zarr(out).load()
    assert not ds["valid"].values[32:40].any()
    assert np.isfinite(ds["shift"].values[32:40]).all()  # interpolated
    # The chunk arrives later (an acquisition that grew the array before writing it): the next run registers it.
    import shutil

    copy = tmp_path / "raw.zarr"
    shutil.copytree(root / "raw.zarr", copy)
    command = [sys.executable, "-m", "driftcorr.cli", "estimate", copy, tmp_path / "out.zarr", "--block-frames",
               str(BLOCK), "--mask", root / "mask.npy"]
    assert subprocess.run(command, capture_output=True, timeout=300).returncode == 0
    assert not xr.open_zarr(tmp_path / "out.zarr")["valid"].values[32:40].any()
    write_stack(run.stack(), tmp_path / "whole.zarr", block_frames=BLOCK)
    shutil.copy(tmp_path / "whole.zarr" / "c" / "4" / "0" / "0", copy / "c" / "4" / "0" / "0")
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    ds = xr.open_zarr(tmp_path / "out.zarr")
    assert ds["valid"].values[32:40].all() and ds.attrs["unreadable_frames"] == [[16, 23]]


def test_damaged_input_is_left_as_it_was(damaged):
    _, root, files, _, _ = damaged
    assert {p: p.read_bytes() for p in (root / "raw.zarr").rglob("*") if p.is_file()} == files
