"""The time axis: carried from an xarray-style input, built from options, kept right across appends."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from driftcorr import estimate_drift
from driftcorr.synthetic import make_run

TIMES = np.datetime64("2026-11-20T08:00:00", "us") + np.arange(48) * np.timedelta64(2500, "ms")


@pytest.fixture(scope="module")
def timed_run():
    run = make_run(48, (64, 64), seed=4, jump_px=None)
    return run, xr.DataArray(run.stack(), dims=("time", "y", "x"), coords={"time": TIMES})


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "driftcorr.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_time_coordinate_of_an_in_memory_dataarray(timed_run):
    run, frames = timed_run
    ds = estimate_drift(frames, mask=run.beam_block)
    np.testing.assert_array_equal(ds["frame"].values, np.arange(48))
    assert ds["time"].dims == ("frame",)
    np.testing.assert_array_equal(ds["time"].values, TIMES)


def test_time_of_an_xarray_zarr_input_reaches_the_output_and_survives_an_append(timed_run, tmp_path):
    run, frames = timed_run
    raw, out = tmp_path / "raw.zarr", tmp_path / "out.zarr"
    np.save(tmp_path / "m.npy", run.beam_block)
    xr.Dataset({"frames": frames.isel(time=slice(0, 32))}).to_zarr(
        raw, zarr_format=3, consolidated=False, encoding={"frames": {"chunks": (8, 64, 64)}})
    args = ("correct", raw, out, "--mask", tmp_path / "m.npy", "--block-frames", 8)
    assert _cli(*args).returncode == 0
    np.testing.assert_array_equal(xr.open_zarr(out)["time"].values, TIMES[:32])
    xr.Dataset({"frames": frames.isel(time=slice(32, 48))}).to_zarr(raw, append_dim="time", consolidated=False)
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    ds = xr.open_zarr(out)
    assert ds.sizes["frame"] == 48
    np.testing.assert_array_equal(ds["time"].values, TIMES)
    np.testing.assert_array_equal(ds["frame"].values, np.arange(48))


def test_time_from_start_and_interval(timed_run, tmp_path):
    run, _ = timed_run
    from driftcorr.store import write_stack

    raw = write_stack(run.stack(), tmp_path / "raw.zarr")
    done = _cli("estimate", raw, tmp_path / "out.zarr", "--start-time", "2026-01-01T06:30:00",
                "--frame-interval", "0.5")
    assert done.returncode == 0, done.stderr
    expected = np.datetime64("2026-01-01T06:30:00", "us") + np.arange(48) * np.timedelta64(500, "ms")
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "out.zarr")["time"].values, expected)
    alone = _cli("estimate", raw, tmp_path / "o2.zarr", "--start-time", "2026-01-01")
    assert alone.returncode == 2 and "frame_interval" in alone.stderr and len(alone.stderr.splitlines()) == 1


def test_elapsed_time_coordinate_survives_an_append(timed_run, tmp_path):
    run, _ = timed_run
    elapsed = np.arange(48) * np.timedelta64(2, "s")
    frames = xr.DataArray(run.stack(), dims=("t", "y", "x"), coords={"t": elapsed})
    from driftcorr import correct

    correct(frames.isel(t=slice(0, 16)), tmp_path / "out.zarr", estimate_only=True, block_frames=8)
    correct(frames, tmp_path / "out.zarr", estimate_only=True, block_frames=8)
    np.testing.assert_array_equal(xr.open_zarr(tmp_path / "out.zarr")["t"].values, elapsed)


def test_start_time_with_a_timezone_is_stored_in_utc(timed_run, tmp_path):
    run, _ = timed_run
    ds = estimate_drift(run.stack()[:8], start_time="2026-01-01T12:00:00+02:00", frame_interval=1.5e-6,
                        detect_defects=False, reference=0)
    assert ds["time"].values[0] == np.datetime64("2026-01-01T10:00:00")
    # Offsets are rounded from the start, not accumulated: 6 x 1.5 us = 9 us, not 6 x 2 us.
    assert ds["time"].values[6] - ds["time"].values[0] == np.timedelta64(9, "us")
