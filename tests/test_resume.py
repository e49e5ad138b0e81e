"""Resumable, incremental and concurrency-safe outputs (DESIGN §5): what a nightly job needs.

The command line runs in subprocesses here, so that it can be killed (SIGKILL, no clean-up at all) at chosen
points of its progress, seen from the outside through the done markers it writes.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import dask
import numpy as np
import pytest
import xarray as xr
import zarr

import driftcorr.pipeline as pipeline
from driftcorr import correct
from driftcorr.errors import OutputError, OutputLockedError, OutputMismatchError, RunFailedError
from driftcorr.store import (
    LOCK_NAME,
    MARKER_ATTR,
    REGISTRATION,
    FrameReader,
    read_array,
    read_lock,
    read_output,
    write_stack,
)
from driftcorr.synthetic import make_run

from .helpers import rms_error

N_FRAMES, SHAPE, BLOCK = 240, (128, 128), 4
N_BLOCKS = N_FRAMES // BLOCK


# ---------------------------------------------------------------------------------------------- helpers
@pytest.fixture(scope="module")
def run_files(tmp_path_factory):
    """A 240-frame run of 128² stored in blocks of 4 frames, its beam-block mask, and one clean output of it."""
    root = tmp_path_factory.mktemp("resume")
    run = make_run(N_FRAMES, SHAPE, seed=11)
    raw = write_stack(run.stack(), root / "raw.zarr", block_frames=BLOCK)
    mask = root / "block.npy"
    np.save(mask, run.beam_block)
    clean = root / "clean.zarr"
    done = _cli("correct", raw, clean, "--mask", mask, "--block-frames", BLOCK)
    assert done.returncode == 0, done.stderr
    return {"run": run, "raw": raw, "mask": mask, "clean": clean, "root": root}


def _command(*args) -> list[str]:
    return [sys.executable, "-m", "driftcorr.cli", *map(str, args)]


def _cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(_command(*args), capture_output=True, text=True, timeout=timeout)


def _markers(output: Path, stage: str) -> int:
    folder = Path(output) / "_progress" / stage / "c"
    return len(list(folder.iterdir())) if folder.is_dir() else 0


def _snapshot(output: Path) -> dict[str, bytes]:
    """Every file of an output but its lock, by relative path."""
    output = Path(output)
    return {str(p.relative_to(output)): p.read_bytes() for p in sorted(output.rglob("*"))
            if p.is_file() and p.name != LOCK_NAME}


def _kill_when(process: subprocess.Popen, ready, timeout: float = 120) -> bool:
    """SIGKILL ``process`` as soon as ``ready()``; False if it finished first."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and time.monotonic() < deadline:
        if ready():
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        time.sleep(0.002)
    process.wait(timeout=timeout)
    return False


# ---------------------------------------------------------------------------------------- kill and resume
KILL_POINTS = {
    "during-set-up": lambda out: (out / LOCK_NAME).exists() and not (out / "_progress").exists(),
    "mid-registration": lambda out: _markers(out, "registered") >= N_BLOCKS // 3,
    # Blocks are corrected as they are registered: killed here, part of the output is corrected too.
    "mid-correction": lambda out: _markers(out, "corrected") >= 2 * N_BLOCKS // 3,
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_sigkill_then_same_command_gives_the_clean_output(point, run_files, tmp_path):
    out = tmp_path / "out.zarr"
    args = ("correct", run_files["raw"], out, "--mask", run_files["mask"], "--block-frames", BLOCK)
    process = subprocess.Popen(_command(*args), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert _kill_when(process, lambda: KILL_POINTS[point](out)), "the run finished before the kill point"
    state = read_output(out)
    assert state is None or state.status != "complete"  # a killed run never claims to be complete
    if point == "mid-correction":
        assert 0 < _markers(out, "corrected") < N_BLOCKS and _markers(out, "registered") >= 2 * N_BLOCKS // 3
    # The lock of the killed process is left behind; the next run takes it over (its process is gone).
    assert (out / LOCK_NAME).exists()
    again = _cli(*args)
    assert again.returncode == 0, again.stderr
    assert _snapshot(out) == _snapshot(run_files["clean"])


def test_resume_recomputes_nothing_already_done(run_files, tmp_path, monkeypatch):
    """In process: an interrupted output resumed registers only the blocks that were not done."""
    out = tmp_path / "out.zarr"
    options = {"mask": np.load(run_files["mask"]), "block_frames": BLOCK}
    calls = []
    register = pipeline._register_block

    def poisoned(block, plan, upsample):
        calls.append(len(block))
        if len(calls) == 7:
            raise RuntimeError("disk full")
        return register(block, plan, upsample)

    monkeypatch.setattr(pipeline, "_register_block", poisoned)
    with dask.config.set(scheduler="synchronous"), pytest.raises(RunFailedError, match="frames .*disk full"):
        correct(run_files["raw"], out, **options)
    assert read_output(out).status == "incomplete"
    assert not (out / LOCK_NAME).exists()
    calls.clear()
    with dask.config.set(scheduler="synchronous"):
        correct(run_files["raw"], out, **options)
    assert calls == [1, BLOCK]  # the anchor frame (the origin of the shifts), then the one failed block
    _assert_same_values(out, run_files["clean"])


def test_blocks_are_corrected_as_they_are_registered(run_files, tmp_path, monkeypatch):
    """One read per block: only blocks holding a flagged frame (interpolated shift) are read and shifted again,
    and the output is the one the two passes (register all, then correct all) give."""
    shifted_again = []
    shift_and_store = pipeline._shift_and_store

    def spy(source, frame_shape, shifts, *args):
        shifted_again.append(args[2])  # the block's first frame (after order and location)
        return shift_and_store(source, frame_shape, shifts, *args)

    monkeypatch.setattr(pipeline, "_shift_and_store", spy)
    options = {"mask": np.load(run_files["mask"]), "block_frames": BLOCK}
    with dask.config.set(scheduler="synchronous"):
        ds = correct(run_files["raw"], tmp_path / "one_pass.zarr", **options).load()
        flagged = sorted({int(frame) // BLOCK * BLOCK for frame in np.flatnonzero(~ds["valid"].values)})
        assert flagged and sorted(shifted_again) == flagged
        shifted_again.clear()
        monkeypatch.setattr(pipeline, "_anchor_origin", lambda *args: None)  # no origin: correct after all
        correct(run_files["raw"], tmp_path / "two_pass.zarr", **options)
    assert sorted(shifted_again) == list(range(0, N_FRAMES, BLOCK))
    _assert_same_values(tmp_path / "one_pass.zarr", tmp_path / "two_pass.zarr")
    _assert_same_values(tmp_path / "one_pass.zarr", run_files["clean"])


def test_a_clean_run_leaves_the_unreadable_record_alone(run_files, tmp_path, monkeypatch):
    """Each block's record of being unreadable is written only where one was made (a small write saved per block);
    the record itself is checked by tests/test_damaged_input.py."""
    from driftcorr import store

    records = []
    write_block = store.write_block

    def spy(*args, unreadable=False):
        records.append(unreadable)
        return write_block(*args, unreadable=unreadable)

    monkeypatch.setattr(store, "write_block", spy)
    with dask.config.set(scheduler="synchronous"):
        correct(run_files["raw"], tmp_path / "out.zarr", mask=np.load(run_files["mask"]), block_frames=BLOCK)
    assert len(records) >= N_FRAMES // BLOCK and set(records) == {None}


def _assert_same_values(out, expected):
    ds, ref = xr.open_zarr(out).load(), xr.open_zarr(expected).load()
    assert set(ds.variables) == set(ref.variables)
    for name in ds.variables:
        np.testing.assert_array_equal(ds[name].values, ref[name].values, err_msg=name)
    assert ds.attrs == ref.attrs


# -------------------------------------------------------------------------------------------------- append
def test_append_registers_only_the_new_frames(run_files, tmp_path):
    run = run_files["run"]
    grown = run.stack()
    n_old = 180  # 45 blocks, then 15 more blocks appended
    raw = write_stack(grown[:n_old], tmp_path / "raw.zarr", block_frames=BLOCK)
    out = tmp_path / "out.zarr"
    args = ("correct", raw, out, "--mask", run_files["mask"], "--block-frames", BLOCK)
    assert _cli(*args).returncode == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in out.rglob("*") if p.is_file()}
    old_shift = xr.open_zarr(out)["shift"].values
    # The acquisition goes on: the same input array grows.
    array = zarr.open_array(raw, mode="r+")
    array.resize(grown.shape)
    array[n_old:] = grown[n_old:]
    done = _cli(*args)
    assert done.returncode == 0, done.stderr
    ds = xr.open_zarr(out).load()
    assert ds.attrs["status"] == "complete" and ds.sizes["frame"] == N_FRAMES
    np.testing.assert_array_equal(ds["frame"].values, np.arange(N_FRAMES))
    # Only the new frames were registered: the old blocks' registration rows are the very same files.
    untouched = [p for p, (mtime, data) in before.items() if p.exists() and p.stat().st_mtime_ns == mtime
                 and p.read_bytes() == data]
    old_chunks = [p for p in before if "/c/" in str(p.relative_to(out)).replace(os.sep, "/")]
    kept = [p for p in old_chunks if p in untouched]
    assert len(kept) >= 0.8 * len(old_chunks), (len(kept), len(old_chunks))
    registration_files = [p for p in old_chunks if "_progress/registration" in p.as_posix()]
    assert all(p in untouched for p in registration_files)
    # The reference and anchor are the stored ones; old frames keep their shifts (but for flags near the join).
    assert ds.attrs["reference_frame"] == 0
    np.testing.assert_array_equal(ds["shift"].values[:n_old - 8], old_shift[:n_old - 8])
    # The new frames are registered correctly.
    truth = run.true_shifts(0)
    good = ~run.beam_off
    assert rms_error(ds["shift"].values[good], truth[good]) <= 0.05
    new = np.arange(N_FRAMES) >= n_old
    assert rms_error(ds["shift"].values[good & new], truth[good & new]) <= 0.05
    frames = run.stack()[new]
    np.testing.assert_array_equal(ds["corrected"].values[new],
                                  pipeline.shift_frames(frames, ds["shift"].values[new]))
    # Nothing to do when run again: not one file changes.
    snapshot = _snapshot(out)
    assert _cli(*args).returncode == 0
    assert _snapshot(out) == snapshot


# ------------------------------------------------------------------------------------- refusals and locks
def test_changed_option_is_refused_and_output_untouched(run_files, tmp_path):
    out = tmp_path / "out.zarr"
    base = ("correct", run_files["raw"], out, "--mask", run_files["mask"], "--block-frames", BLOCK)
    assert _cli(*base).returncode == 0
    snapshot = _snapshot(out)
    for extra, named in ((("--reference", "0"), "reference"), (("--upsample", "20"), "upsample_factor")):
        refused = _cli(*base, *extra)
        assert refused.returncode == 2, refused.stderr
        lines = refused.stderr.strip().splitlines()
        assert len(lines) == 1 and named in lines[0] and "--overwrite" in lines[0], refused.stderr
        assert _snapshot(out) == snapshot
    # Another mask, or the drift only, are other runs too.
    other = tmp_path / "other.npy"
    np.save(other, np.ones(SHAPE, bool))
    assert _cli("correct", run_files["raw"], out, "--mask", other, "--block-frames", BLOCK).returncode == 2
    assert _cli("estimate", run_files["raw"], out, "--mask", run_files["mask"], "--block-frames",
                BLOCK).returncode == 2
    assert _snapshot(out) == snapshot
    # --overwrite starts over with the new options.
    assert _cli(*base, "--reference", "0", "--overwrite").returncode == 0
    config = json.loads(xr.open_zarr(out).attrs["config"])
    assert config["reference"] == "0"


def test_input_that_shrank_is_refused(run_files, tmp_path):
    out = tmp_path / "out.zarr"
    raw = write_stack(run_files["run"].stack()[:40], tmp_path / "raw.zarr", block_frames=BLOCK)
    assert correct(raw, out, block_frames=BLOCK, estimate_only=True).sizes["frame"] == 40
    write_stack(run_files["run"].stack()[:20], raw, block_frames=BLOCK, overwrite=True)
    with pytest.raises(OutputMismatchError, match="only 20"):
        correct(raw, out, block_frames=BLOCK, estimate_only=True)


def test_concurrent_run_is_refused_while_the_first_completes(run_files, tmp_path):
    out = tmp_path / "out.zarr"
    args = ("correct", run_files["raw"], out, "--mask", run_files["mask"], "--block-frames", BLOCK)
    first = subprocess.Popen(_command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (out / LOCK_NAME).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    second = _cli(*args)
    assert second.returncode == 2, second.stderr
    assert "being written by process" in second.stderr and len(second.stderr.strip().splitlines()) == 1
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert _snapshot(out) == _snapshot(run_files["clean"])


HOLD_LOCK = """
import fcntl, json, os, sys, time
descriptor = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR)
fcntl.flock(descriptor, fcntl.LOCK_EX)
os.write(descriptor, json.dumps({"pid": os.getpid(), "host": "elsewhere"}).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_lock_of_a_live_process_holds_and_a_killed_one_does_not(small_run, tmp_path):
    raw = write_stack(small_run.stack(), tmp_path / "raw.zarr")
    out = tmp_path / "out.zarr"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(out / LOCK_NAME)], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputLockedError, match=f"process {holder.pid} on elsewhere"):
            correct(raw, out, estimate_only=True)
        assert read_lock(out)["pid"] == holder.pid and not (out / "zarr.json").exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # Killed: the system released its lock; the file it left behind blocks nothing.
    assert (out / LOCK_NAME).exists() and read_lock(out) is None
    assert correct(raw, out, estimate_only=True).attrs["status"] == "complete"
    assert not (out / LOCK_NAME).exists()


def test_stray_partial_files_are_cleaned_up(run_files, tmp_path):
    out = tmp_path / "out.zarr"
    raw = write_stack(run_files["run"].stack()[:24], tmp_path / "raw.zarr", block_frames=BLOCK)
    correct(raw, out, block_frames=BLOCK, estimate_only=True)
    stray = out / "shift" / "c" / "0" / "0.1f2e3d.partial"
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"half a chunk")
    correct(raw, out, block_frames=BLOCK, estimate_only=True, reference=0, overwrite=True)
    assert not list(out.rglob("*.partial"))


def test_damaged_chunk_is_an_error_not_wrong_data(run_files, tmp_path):
    out = tmp_path / "out.zarr"
    raw = write_stack(run_files["run"].stack()[:24], tmp_path / "raw.zarr", block_frames=BLOCK)
    correct(raw, out, block_frames=BLOCK)
    chunk = out / "corrected" / "c" / "1" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    with pytest.raises(Exception, match="(?i)checksum|crc"):
        zarr.open_array(out / "corrected", mode="r")[4:8]


def test_status_command(run_files, tmp_path):
    status = _cli("status", run_files["clean"])
    assert status.returncode == 0, status.stderr
    assert "complete" in status.stdout and f"registered  {N_FRAMES} / {N_FRAMES}" in status.stdout
    assert f"corrected   {N_FRAMES} / {N_FRAMES}" in status.stdout and '"reference": "iterative"' in status.stdout
    (tmp_path / "notes").mkdir()
    refused = _cli("status", tmp_path / "notes")
    assert refused.returncode == 2 and "not a driftcorr output" in refused.stderr


# ------------------------------------------------------------------------------------- distributed cluster
def test_killed_worker_is_recomputed(run_files, tmp_path):
    distributed = pytest.importorskip("distributed")
    out = tmp_path / "out.zarr"
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  silence_logs=50) as cluster, distributed.Client(cluster) as client:
        pids = list(client.run(os.getpid).values())
        killed = []

        def kill_one_worker():
            deadline = time.monotonic() + 120
            while _markers(out, "registered") < N_BLOCKS // 4 and time.monotonic() < deadline:
                time.sleep(0.005)
            os.kill(pids[0], signal.SIGKILL)
            killed.append(_markers(out, "registered"))

        killer = threading.Thread(target=kill_one_worker)
        killer.start()
        correct(run_files["raw"], out, mask=np.load(run_files["mask"]), block_frames=BLOCK)
        killer.join()
    assert killed and killed[0] < N_BLOCKS, "the worker was killed after the registration had finished"
    _assert_same_values(out, run_files["clean"])


def test_first_run_shorter_than_a_block_then_growth(run_files, tmp_path):
    """A first run of 3 frames must not fix a 3-frame chunk on which later blocks of 4 would overwrite each other."""
    frames = run_files["run"].stack()[:64]
    raw = write_stack(frames[:3], tmp_path / "raw.zarr", block_frames=BLOCK)
    out = tmp_path / "out.zarr"
    with dask.config.set(scheduler="threads"):
        correct(raw, out, block_frames=BLOCK)
        assert zarr.open_array(out / "corrected", mode="r").chunks[0] == BLOCK
        array = zarr.open_array(raw, mode="r+")
        array.resize(frames.shape)
        array[3:] = frames[3:]
        correct(raw, out, block_frames=BLOCK)
    ds = xr.open_zarr(out).load()
    assert ds.attrs["status"] == "complete" and ds.sizes["frame"] == 64
    assert np.isfinite(read_array(out, REGISTRATION)).all()
    np.testing.assert_array_equal(ds["corrected"].values, pipeline.shift_frames(frames, ds["shift"].values))
    assert zarr.open_array(out / "shift", mode="r").chunks[0] == 4096  # per-frame tables: few chunks


def test_unreadable_block_is_retried_by_the_next_run(run_files, tmp_path, monkeypatch):
    raw = write_stack(run_files["run"].stack()[:24], tmp_path / "raw.zarr", block_frames=BLOCK)
    out = tmp_path / "out.zarr"
    reader = FrameReader.__call__

    def flaky(self, start, stop):
        if start == 8:
            raise OSError("connection reset")
        return reader(self, start, stop)

    monkeypatch.setattr(FrameReader, "__call__", flaky)
    with dask.config.set(scheduler="synchronous"):
        first = correct(raw, out, block_frames=BLOCK, estimate_only=True)
    assert [list(p) for p in first.attrs["unreadable_frames"]] == [[8, 11]]
    assert not first["valid"].values[8:12].any()
    monkeypatch.setattr(FrameReader, "__call__", reader)  # the storage recovered
    with dask.config.set(scheduler="synchronous"):
        second = correct(raw, out, block_frames=BLOCK, estimate_only=True)
    assert second.attrs["unreadable_frames"] == [] and second["valid"].values[8:12].all()


def test_object_store_output_never_writes_into_the_input_or_a_foreign_group(run_files):
    group = zarr.open_group("memory://safety/raw.zarr", mode="w")
    frames = run_files["run"].stack()[:8]
    group.create_array("frames", shape=frames.shape, dtype=frames.dtype, chunks=(4, *frames.shape[1:]))[...] = frames
    for output in ("memory://safety/raw.zarr", "memory://safety/raw.zarr/out", "memory://safety"):
        for overwrite in (False, True):
            with pytest.raises(OutputError, match="overlaps the input"):
                correct("memory://safety/raw.zarr", output, array="frames", overwrite=overwrite, estimate_only=True)
    foreign = zarr.open_group("memory://safety/other.zarr", mode="w")
    foreign.create_array("mask", shape=(4,), dtype="u1")
    with pytest.raises(OutputError, match="not a driftcorr output"):
        correct("memory://safety/raw.zarr", "memory://safety/other.zarr", array="frames", overwrite=True,
                estimate_only=True)
    np.testing.assert_array_equal(zarr.open_group("memory://safety/raw.zarr", mode="r")["frames"][...], frames)
    assert "mask" in zarr.open_group("memory://safety/other.zarr", mode="r")
    assert MARKER_ATTR not in zarr.open_group("memory://safety/raw.zarr", mode="r").attrs


def test_same_name_in_another_folder_is_another_input(run_files, tmp_path, monkeypatch):
    stack = run_files["run"].stack()
    for day, frames in (("day1", stack[:24]), ("day2", stack[8:48])):
        (tmp_path / day).mkdir()
        write_stack(frames, tmp_path / day / "raw.zarr", block_frames=BLOCK)
    out = tmp_path / "out.zarr"
    monkeypatch.chdir(tmp_path / "day1")
    correct("raw.zarr", out, block_frames=BLOCK, estimate_only=True)
    monkeypatch.chdir(tmp_path / "day2")
    with pytest.raises(OutputMismatchError, match="input"):
        correct("raw.zarr", out, block_frames=BLOCK, estimate_only=True)
    # Rewritten in place with other frames: refused too (its first frame differs).
    write_stack(stack[1:25], tmp_path / "day1" / "raw.zarr", block_frames=BLOCK, overwrite=True)
    with pytest.raises(OutputMismatchError, match="first frame"):
        correct(tmp_path / "day1" / "raw.zarr", out, block_frames=BLOCK, estimate_only=True)


def test_growth_cut_short_is_completed_by_the_next_run(run_files, tmp_path):
    frames = run_files["run"].stack()[:40]
    raw = write_stack(frames[:24], tmp_path / "raw.zarr", block_frames=BLOCK)
    out = tmp_path / "out.zarr"
    correct(raw, out, block_frames=BLOCK, estimate_only=True)
    array = zarr.open_array(raw, mode="r+")
    array.resize(frames.shape)
    array[24:] = frames[24:]
    # A run killed inside the growth: the frame arrays resized, nothing else (no coordinates, no markers).
    group = zarr.open_group(out, mode="r+", use_consolidated=False)
    for name in ("frame", "shift", "raw_shift", "sigma", "valid", "ncc", "overlap", "second_peak"):
        group[name].resize((40, *group[name].shape[1:]))
    ds = correct(raw, out, block_frames=BLOCK, estimate_only=True).load()
    assert ds.attrs["status"] == "complete" and ds.sizes["frame"] == 40
    np.testing.assert_array_equal(ds["frame"].values, np.arange(40))
    assert np.isfinite(ds["raw_shift"].values[~run_files["run"].beam_off[:40]]).all()
