"""Progress of a correction: log lines when not on a terminal, under the local and the distributed scheduler."""

from __future__ import annotations

import re

import dask
import numpy as np
import pytest
import xarray as xr

import driftcorr.pipeline as pipeline
from driftcorr import correct
from driftcorr.store import write_stack
from driftcorr.synthetic import make_run


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    run = make_run(32, (64, 64), seed=9, jump_px=None)
    return write_stack(run.stack(), tmp_path_factory.mktemp("progress") / "raw.zarr", block_frames=4)


def _lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("driftcorr: ")]


@pytest.mark.parametrize("scheduler", ["threads", "distributed"])
def test_log_lines_count_the_frames(raw, tmp_path, capsys, monkeypatch, scheduler):
    monkeypatch.setattr(pipeline, "PROGRESS_LOG_SECONDS", 0.0)  # a line after every block
    out = tmp_path / "out.zarr"
    if scheduler == "distributed":
        distributed = pytest.importorskip("distributed")
        with distributed.Client(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None):
            correct(raw, out, block_frames=4, progress="log")
    else:
        with dask.config.set(scheduler="threads"):
            correct(raw, out, block_frames=4, progress="log")
    lines = _lines(capsys.readouterr().err)
    registering = [line for line in lines if line.startswith("driftcorr: registering and correcting ")]
    # One line per block of 4 frames and a last one, counting up to all 32 frames.
    assert len(registering) == 9, lines
    counts = [int(re.search(r"(\d+)/32 frames", line).group(1)) for line in registering]
    assert counts[:8] == list(range(4, 33, 4)) and counts[-1] == 32
    # Then only the blocks whose flagged frames got an interpolated shift are corrected again.
    flagged_blocks = len(set(np.flatnonzero(~xr.open_zarr(out)["valid"].values) // 4))
    correcting = [line for line in lines if line.startswith("driftcorr: correcting ")]
    assert flagged_blocks >= 1 and len(correcting) == flagged_blocks + 1, lines
    assert re.search(rf"{4 * flagged_blocks}/{4 * flagged_blocks} frames", correcting[-1])
    assert all("frames/s" in line for line in lines)

def test_no_progress_and_short_runs_are_quiet(raw, tmp_path, capsys):
    correct(raw, tmp_path / "a.zarr", block_frames=4, progress=False)
    correct(raw, tmp_path / "b.zarr", block_frames=4, progress="log")  # shorter than the log interval
    assert not _lines(capsys.readouterr().err)


def test_bar_mode_draws_a_bar(raw, tmp_path, capsys):
    correct(raw, tmp_path / "out.zarr", block_frames=4, progress="bar")
    err = capsys.readouterr().err
    assert "registering" in err and "32/32" in err
