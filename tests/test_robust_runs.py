"""Issue 4 end to end: realistic synthetic runs with only the beam-block mask (or none), through the API and CLI.

Every run carries what a 72-hour run throws at us (``driftcorr.synthetic.make_run``): hot and dead pixels the user
did not mask, ±20 % ring-intensity and ±30 % beam-current changes, a beam-off frame, a cosmic-ray streak and a
10 px re-steer jump. Errors are measured against the truth relative to the output's reference (anchor) frame.

Bounds: issue 4 asks for RMS <= 0.02 px at standard counts (2000) and <= 0.05 px at 0.1x counts, over all frames
but the beam-off ones, and no trusted frame off by more than 0.5 px. The uncertainty test uses the issue's band
[0.67, 1.5] for RMS error / RMS sigma, pooled over the runs of this file's fixture (one run can fall outside it,
see benchmarks/README.md for the spread over many seeds).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from driftcorr import estimate_drift, store
from driftcorr.cli import main
from driftcorr.defects import DEFECT_CODES
from driftcorr.synthetic import make_run

from .helpers import rms_error

pytestmark = pytest.mark.usefixtures("synchronous_dask")

SHAPE = (192, 192)
N_FRAMES = 90


def _errors(run, ds):
    truth = run.true_shifts(int(ds.attrs["reference_frame"]))
    return ds["shift"].values - truth


def _cli_correct(tmp_path, run, *options, mask="block"):
    raw = store.write_stack(run.stack(), tmp_path / "raw.zarr")
    args = ["correct", raw, str(tmp_path / "out.zarr"), *options]
    if mask == "block":
        np.save(tmp_path / "block.npy", run.beam_block)
        args += ["--mask", str(tmp_path / "block.npy")]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return xr.open_zarr(tmp_path / "out.zarr").load()


@pytest.fixture(scope="module", params=[(41, 2000.0), (42, 200.0)], ids=["standard-counts", "tenth-counts"])
def block_only(request, tmp_path_factory):
    """(run, output) corrected through the CLI with the beam-block mask only."""
    seed, counts = request.param
    run = make_run(N_FRAMES, SHAPE, seed=seed, counts=counts)
    assert run.hot_pixels.any() and run.beam_off.any() and run.cosmic.any() and run.jump_frame is not None
    return run, _cli_correct(tmp_path_factory.mktemp("block"), run)


def test_beam_block_only_mask_is_accurate(block_only):
    run, ds = block_only
    error = _errors(run, ds)
    good = ~run.beam_off
    bound = 0.02 if run.counts >= 2000 else 0.05
    assert rms_error(ds["shift"].values[good], run.true_shifts(int(ds.attrs["reference_frame"]))[good]) <= bound
    # The cosmic-ray frame is measured, not merely interpolated: its raw estimate is accurate too.
    cosmic = np.flatnonzero(run.cosmic)
    raw_error = np.linalg.norm(ds["raw_shift"].values[cosmic] - run.true_shifts(int(ds.attrs["reference_frame"]))[
        cosmic], axis=1)
    assert np.all(raw_error <= 0.05), raw_error
    valid = ds["valid"].values
    assert np.linalg.norm(error[valid], axis=1).max() <= 0.5
    assert not valid[run.beam_off].any(), "beam-off frames must be invalid"
    assert valid[good].mean() >= 0.95


def test_undeclared_hot_and_dead_pixels_are_found_and_stored(block_only):
    run, ds = block_only
    codes = ds["defects"].values
    outside = run.beam_block
    assert np.all(codes[run.hot_pixels & outside] == DEFECT_CODES["hot"])
    assert np.all(codes[run.dead_pixels & outside] == DEFECT_CODES["dead"])
    covered = ~run.beam_block
    assert np.all(codes[covered & ~run.hot_pixels] == DEFECT_CODES["masked"])
    assert np.all(codes[covered & run.hot_pixels] == DEFECT_CODES["hot"])  # found under the mask too
    # The stored mask is the one used: beam-block and the found defects removed.
    np.testing.assert_array_equal(ds["mask"].values, codes == DEFECT_CODES["good"])
    assert not ds["mask"].values[run.hot_pixels | run.dead_pixels].any()
    assert ds["defects"].attrs["flag_meanings"].split() == list(DEFECT_CODES)


def test_sigma_is_calibrated(block_only):
    run, ds = block_only
    good = ~run.beam_off
    error = _errors(run, ds)[good]
    ratio = np.sqrt(np.mean(error**2)) / np.sqrt(np.mean(ds["sigma"].values[good] ** 2))
    assert 0.67 <= ratio <= 1.5, ratio
    anchor = ds.attrs["reference_frame"]
    others = np.arange(ds.sizes["frame"]) != anchor
    assert np.all(np.isfinite(ds["sigma"].values)) and np.all(ds["sigma"].values[others] > 0)
    # Shifts are measured from the anchor frame: its own is 0, and its registration error is common to every
    # other frame's uncertainty (added in quadrature).
    np.testing.assert_array_equal(ds["shift"].values[anchor], 0.0)
    np.testing.assert_array_equal(ds["sigma"].values[anchor], 0.0)
    assert np.all(ds["sigma"].values[others] >= np.asarray(ds.attrs["sigma_anchor"]) * (1 - 1e-9))


def test_no_mask_at_all():
    run = make_run(N_FRAMES, SHAPE, seed=43)
    ds = estimate_drift(run.stack())
    good = ~run.beam_off
    assert rms_error(ds["shift"].values[good], run.true_shifts(int(ds.attrs["reference_frame"]))[good]) <= 0.02
    codes = ds["defects"].values
    assert np.all(codes[run.hot_pixels] == DEFECT_CODES["hot"])
    # The beam-block is found as never lit.
    assert np.mean(codes[~run.beam_block] == DEFECT_CODES["unlit"]) >= 0.9
    assert not ds["valid"].values[run.beam_off].any()


def test_without_detection_hot_pixels_lock_onto_zero():
    """The failure the detection prevents: with detection off, the run's hot pixels pull every frame to 0."""
    run = make_run(N_FRAMES, SHAPE, seed=41)
    ds = estimate_drift(run.stack(), mask=run.beam_block, detect_defects=False, reference=0)
    good = ~run.beam_off
    assert rms_error(ds["shift"].values[good], run.true_shifts(0)[good]) > 1.0


def test_cosmic_streak_without_taming_is_worse():
    run = make_run(N_FRAMES, SHAPE, seed=44, counts=2000)
    cosmic = np.flatnonzero(run.cosmic)
    errors = {}
    for tame in (True, False):
        ds = estimate_drift(run.stack(), mask=run.mask, tame_outliers=tame, reference=0)
        errors[tame] = np.linalg.norm(ds["raw_shift"].values[cosmic] - run.true_shifts(0)[cosmic], axis=1).max()
    assert errors[True] <= 0.05
    assert errors[False] > 2 * errors[True]


def test_default_reference_survives_a_bad_first_frame():
    run = make_run(N_FRAMES, SHAPE, seed=45)
    frames = run.stack()
    frames[0] = run.pedestal  # the beam was off for frame 0
    ds = estimate_drift(frames, mask=run.beam_block)
    assert ds.attrs["reference_frame"] == 1
    good = ~run.beam_off
    good[0] = False
    truth = run.true_shifts(1)
    assert rms_error(ds["shift"].values[good], truth[good]) <= 0.02
    assert not ds["valid"].values[0]


def test_jump_is_followed_and_not_flagged():
    run = make_run(N_FRAMES, SHAPE, seed=46, jump_px=12.0)
    ds = estimate_drift(run.stack(), mask=run.beam_block)
    j = run.jump_frame
    truth = run.true_shifts(int(ds.attrs["reference_frame"]))
    assert np.linalg.norm(truth[j] - truth[j - 1]) > 10
    around = np.arange(j - 2, j + 3)
    around = around[~run.beam_off[around]]
    assert ds["valid"].values[around].all()
    assert np.abs(ds["shift"].values[around] - truth[around]).max() <= 0.05


def test_nan_and_blank_frames_are_invalid_and_interpolated():
    run = make_run(N_FRAMES, SHAPE, seed=47, n_cosmic=0)
    frames = run.stack().astype(np.float32)
    frames[10] = np.nan
    frames[20] = 0.0
    ds = estimate_drift(frames, mask=run.beam_block)
    valid = ds["valid"].values
    assert not valid[10] and not valid[20]
    truth = run.true_shifts(int(ds.attrs["reference_frame"]))
    # Interpolated from the neighbours of a smooth drift: close to the truth, and finite.
    assert np.abs(ds["shift"].values[[10, 20]] - truth[[10, 20]]).max() <= 0.2
    assert np.isnan(ds["raw_shift"].values[10]).all()


@pytest.mark.parametrize("reference", ["iterative:0:30", "pairs", "median:0:5", "3", "-1"])
def test_reference_forms_through_the_cli(tmp_path, reference):
    run = make_run(40, (128, 128), seed=48, n_cosmic=0)
    ds = _cli_correct(tmp_path, run, "--reference", reference, "--order", "1")
    anchor = int(ds.attrs["reference_frame"])
    assert anchor == {"iterative:0:30": 0, "pairs": 0, "median:0:5": 0, "3": 3, "-1": 39}[reference]
    good = ~run.beam_off
    # A median of frames 0-4 lies between their positions: compare after removing the common offset.
    error = _errors(run, ds)[good]
    if reference.startswith("median"):
        error = error - error.mean(axis=0)
    assert np.sqrt(np.mean(np.sum(error**2, axis=1))) <= 0.05


def test_bandpass_option_through_the_cli(tmp_path):
    run = make_run(40, (128, 128), seed=49, counts=200)
    ds = _cli_correct(tmp_path, run, "--bandpass", "1", "12")
    good = ~run.beam_off
    assert rms_error(ds["shift"].values[good], run.true_shifts(int(ds.attrs["reference_frame"]))[good]) <= 0.05
    config = ds.attrs["config"]
    config = json.loads(config) if isinstance(config, str) else config
    assert config["bandpass"] == [1.0, 12.0]


def test_bandpass_rejects_bad_scales(tmp_path):
    run = make_run(12, (64, 64), seed=50)
    raw = store.write_stack(run.stack(), tmp_path / "raw.zarr")
    result = CliRunner().invoke(main, ["correct", raw, str(tmp_path / "out.zarr"), "--bandpass", "5", "2"])
    assert result.exit_code == 2
    assert "bandpass" in result.output and "low" in result.output
    assert not (tmp_path / "out.zarr").exists()


def test_example_config_file_is_valid():
    """configs/correct.toml documents every robustness key; it must load and validate as it stands."""
    from pathlib import Path

    from driftcorr.config import load_config_file, make_config

    path = Path(__file__).resolve().parents[1] / "configs" / "correct.toml"
    cfg = make_config(**load_config_file(path))
    assert cfg.reference == "iterative" and cfg.detect_defects and cfg.tame_outliers and cfg.bandpass is None


def test_correct_takes_the_robustness_options(tmp_path):
    """The Python entry point takes the same switches as the CLI and stores them in the output's config."""
    from driftcorr import correct

    run = make_run(16, (64, 64), seed=51)
    out = correct(run.stack(), tmp_path / "out.zarr", mask=run.beam_block, detect_defects=False,
                  tame_outliers=False, bandpass=(1.0, 8.0), estimate_only=True)
    config = out.attrs["config"]
    config = json.loads(config) if isinstance(config, str) else config
    assert config["detect_defects"] is False and config["tame_outliers"] is False
    assert config["bandpass"] == [1.0, 8.0]
    # Detection off: only the user's mask is used.
    np.testing.assert_array_equal(out["mask"].values, run.beam_block)
