"""The command line (driftcorr.cli): end to end on stored synthetic runs, exit codes and messages.

Most tests drive ``driftcorr.cli.main`` in-process with click's CliRunner; a few run the installed console script
in a subprocess, as a user would.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

import driftcorr
from driftcorr.cli import main

from .helpers import rms_error

ACCURACY = 0.1  # px, RMS on good frames


def _script() -> str:
    """The installed ``driftcorr`` console script (next to this interpreter, else on PATH)."""
    candidate = Path(sys.executable).parent / "driftcorr"
    if candidate.exists():
        return str(candidate)
    found = shutil.which("driftcorr")
    if found is None:
        pytest.skip("the driftcorr console script is not installed")
    return found


def _assert_bad_input(result, *, match: str | None = None):
    """Exit code 2 and one clear line on stderr, no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    assert lines[0].startswith("driftcorr: error:"), lines[0]
    if match is not None:
        assert re.search(match, lines[0], flags=re.IGNORECASE), lines[0]


def _check_accuracy(output, run):
    ds = xr.open_zarr(output)
    assert ds.attrs["status"] == "complete"
    good = ~run.beam_off
    assert rms_error(ds["shift"].values[good], run.true_shifts(0)[good]) <= ACCURACY
    assert not ds["valid"].values[run.beam_off].any()
    return ds


# ------------------------------------------------------------------------------------------------- basics
def test_version_and_help(cli):
    result = cli("--version")
    assert result.exit_code == 0 and driftcorr.__version__ in result.stdout
    result = cli("--help")
    assert result.exit_code == 0
    for command in ("correct", "estimate", "apply", "demo"):
        assert command in result.stdout
    result = cli("correct", "--help")
    assert result.exit_code == 0
    for option in ("--mask", "--config", "--overwrite", "--max-shift", "--reference", "--upsample", "--array"):
        assert option in result.stdout


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.parametrize(("source", "mask"), [("v3", "npy"), ("v2", "tif"), ("group", "png")])
def test_correct_end_to_end(cli, stored_inputs, drift_run, drift_stack, tmp_path, source, mask):
    output = tmp_path / "out.zarr"
    result = cli("correct", stored_inputs[source], output, "--mask", stored_inputs[mask])
    assert result.exit_code == 0, result.output
    assert str(output) in result.stdout
    ds = _check_accuracy(output, drift_run)
    np.testing.assert_array_equal(ds["mask"].values, drift_run.mask)
    assert ds["corrected"].shape == drift_stack.shape


def test_zarr_array_mask(cli, stored_inputs, drift_run, tmp_path):
    mask_path = tmp_path / "mask.zarr"
    zarr.create_array(mask_path, shape=drift_run.mask.shape, dtype="uint8")[...] = drift_run.mask
    output = tmp_path / "out.zarr"
    result = cli("estimate", stored_inputs["v3"], output, "--mask", mask_path)
    assert result.exit_code == 0, result.output
    ds = _check_accuracy(output, drift_run)
    np.testing.assert_array_equal(ds["mask"].values, drift_run.mask)


def test_estimate_then_apply_equals_correct(cli, stored_inputs, tmp_path):
    source, mask = stored_inputs["v3"], stored_inputs["npy"]
    assert cli("correct", source, tmp_path / "c.zarr", "--mask", mask).exit_code == 0
    assert cli("estimate", source, tmp_path / "e.zarr", "--mask", mask).exit_code == 0
    estimated = xr.open_zarr(tmp_path / "e.zarr")
    assert "corrected" not in estimated
    result = cli("apply", source, tmp_path / "e.zarr", tmp_path / "a.zarr")
    assert result.exit_code == 0, result.output
    corrected = xr.open_zarr(tmp_path / "c.zarr")
    applied = xr.open_zarr(tmp_path / "a.zarr")
    np.testing.assert_array_equal(applied["shift"].values, corrected["shift"].values)
    np.testing.assert_array_equal(applied["corrected"].values, corrected["corrected"].values)
    assert applied.attrs["status"] == "complete"


def test_apply_refuses_an_incomplete_or_foreign_drift(cli, stored_inputs, tmp_path):
    foreign = tmp_path / "foreign.zarr"
    zarr.open_group(foreign, mode="w")
    _assert_bad_input(cli("apply", stored_inputs["v3"], foreign, tmp_path / "a.zarr"), match="driftcorr output")
    assert cli("estimate", stored_inputs["v3"], tmp_path / "e.zarr", "--upsample", "1").exit_code == 0
    zarr.open_group(tmp_path / "e.zarr", mode="r+").attrs["status"] = "incomplete"
    _assert_bad_input(cli("apply", stored_inputs["v3"], tmp_path / "e.zarr", tmp_path / "a.zarr"),
                      match="incomplete")
    assert not (tmp_path / "a.zarr").exists()


def test_console_script(stored_inputs, drift_run, tmp_path):
    script = _script()
    env = {**os.environ, "NO_COLOR": "1"}
    output = tmp_path / "out.zarr"
    done = subprocess.run([script, "correct", stored_inputs["group"], str(output), "--mask", stored_inputs["tif"]],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    _check_accuracy(output, drift_run)
    again = subprocess.run([script, "correct", stored_inputs["group"], str(output)],
                           capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2
    lines = again.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in again.stderr and "overwrite" in lines[0], again.stderr
    version = subprocess.run([script, "--version"], capture_output=True, text=True, env=env, timeout=120)
    assert version.returncode == 0 and driftcorr.__version__ in version.stdout


# ------------------------------------------------------------------------------------------------ bad input
def test_missing_input(cli, tmp_path):
    _assert_bad_input(cli("correct", tmp_path / "missing.zarr", tmp_path / "out.zarr"), match="does not exist")
    assert not (tmp_path / "out.zarr").exists()


def test_mask_of_wrong_shape(cli, stored_inputs, tmp_path):
    np.save(tmp_path / "small.npy", np.ones((10, 12), bool))
    result = cli("correct", stored_inputs["v3"], tmp_path / "out.zarr", "--mask", tmp_path / "small.npy")
    _assert_bad_input(result, match="shape")
    assert not (tmp_path / "out.zarr").exists()


def test_missing_and_unreadable_mask(cli, stored_inputs, tmp_path):
    _assert_bad_input(cli("correct", stored_inputs["v3"], tmp_path / "o.zarr", "--mask", tmp_path / "no.npy"),
                      match="does not exist")
    (tmp_path / "junk.npy").write_bytes(b"not a numpy file")
    _assert_bad_input(cli("correct", stored_inputs["v3"], tmp_path / "o.zarr", "--mask", tmp_path / "junk.npy"),
                      match="mask")


def test_unknown_config_key(cli, stored_inputs, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text('reference = "0"\nupsampel_factor = 20\n')
    result = cli("correct", stored_inputs["v3"], tmp_path / "out.zarr", "--config", config)
    _assert_bad_input(result, match="upsampel_factor")


def test_invalid_config_value(cli, stored_inputs, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("upsample_factor = 0.5\n")
    _assert_bad_input(cli("correct", stored_inputs["v3"], tmp_path / "out.zarr", "--config", config),
                      match="upsample_factor")
    config.write_text("this is = not toml [\n")
    _assert_bad_input(cli("correct", stored_inputs["v3"], tmp_path / "out.zarr", "--config", config),
                      match="config")


@pytest.mark.parametrize("value", ["128", "500"])
def test_max_shift_too_large(cli, stored_inputs, tmp_path, value):
    result = cli("correct", stored_inputs["v3"], tmp_path / "out.zarr", "--max-shift", value)
    _assert_bad_input(result, match="max_shift")


@pytest.mark.parametrize("value", ["40", "-41", "mean:50:60", "first"])
def test_reference_out_of_range(cli, stored_inputs, tmp_path, value):
    result = cli("correct", stored_inputs["v3"], tmp_path / "out.zarr", f"--reference={value}")
    _assert_bad_input(result, match="reference")


def test_existing_output_without_overwrite(cli, stored_inputs, tmp_path):
    output = tmp_path / "out.zarr"
    assert cli("estimate", stored_inputs["v3"], output, "--upsample", "1").exit_code == 0
    _assert_bad_input(cli("estimate", stored_inputs["v3"], output), match="overwrite")
    result = cli("estimate", stored_inputs["v3"], output, "--overwrite")
    assert result.exit_code == 0, result.output
    assert json.loads(xr.open_zarr(output).attrs["config"])["upsample_factor"] == 50


def test_failed_overwrite_keeps_the_previous_output(cli, stored_inputs, tmp_path):
    output = tmp_path / "out.zarr"
    assert cli("estimate", stored_inputs["v3"], output, "--upsample", "1").exit_code == 0
    result = cli("estimate", stored_inputs["v3"], output, "--overwrite", "--mask", tmp_path / "typo.npy")
    _assert_bad_input(result, match="does not exist")
    assert xr.open_zarr(output).attrs["status"] == "complete"


def test_group_with_two_stacks_needs_array(cli, small_run, tmp_path):
    frames = small_run.stack()
    group = zarr.open_group(tmp_path / "two.zarr", mode="w")
    for name in ("a", "b"):
        group.create_array(name, shape=frames.shape, dtype=frames.dtype, chunks=(4, 64, 64))[...] = frames
    _assert_bad_input(cli("estimate", tmp_path / "two.zarr", tmp_path / "out.zarr"), match="--array")
    result = cli("estimate", tmp_path / "two.zarr", tmp_path / "out.zarr", "--array", "b")
    assert result.exit_code == 0, result.output


def test_verbose_shows_the_traceback(cli, tmp_path):
    result = CliRunner().invoke(main, ["--verbose", "correct", str(tmp_path / "missing.zarr"),
                                       str(tmp_path / "out.zarr")])
    assert result.exit_code == 2
    assert "Traceback" in result.stderr and "does not exist" in result.stderr


# --------------------------------------------------------------------------------------------------- config
def test_config_file_values_are_used_and_options_override(cli, stored_inputs, drift_run, tmp_path):
    config = tmp_path / "config.toml"
    config.write_text("[correction]\nupsample_factor = 1\nmax_shift = 24\nreference = 5\n")
    result = cli("estimate", stored_inputs["v3"], tmp_path / "a.zarr", "--config", config)
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(tmp_path / "a.zarr")
    stored = json.loads(ds.attrs["config"])
    assert (stored["upsample_factor"], stored["max_shift"], stored["reference"]) == (1, 24, "5")
    shifts = ds["raw_shift"].values
    good = np.all(np.isfinite(shifts), axis=1)
    np.testing.assert_array_equal(shifts[good], np.round(shifts[good]))  # upsample 1: integer shifts
    np.testing.assert_array_equal(shifts[5], [0, 0])  # frame 5 is the reference

    result = cli("estimate", stored_inputs["v3"], tmp_path / "b.zarr", "--config", config, "--upsample", "50",
                 "--reference", "0", "--mask", stored_inputs["npy"])
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(tmp_path / "b.zarr")
    stored = json.loads(ds.attrs["config"])
    assert (stored["upsample_factor"], stored["max_shift"], stored["reference"]) == (50, 24, "0")
    good = ~drift_run.beam_off
    assert rms_error(ds["shift"].values[good], drift_run.true_shifts(0)[good]) <= ACCURACY
    assert not np.array_equal(ds["raw_shift"].values, np.round(ds["raw_shift"].values))


def test_json_config_file(cli, stored_inputs, drift_run, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"upsample_factor": 1, "max_shift": 20}))
    result = cli("estimate", stored_inputs["v2"], tmp_path / "out.zarr", "--config", config)
    assert result.exit_code == 0, result.output
    ds = xr.open_zarr(tmp_path / "out.zarr")
    stored = json.loads(ds.attrs["config"])
    assert (stored["upsample_factor"], stored["max_shift"]) == (1, 20)
    shifts = ds["raw_shift"].values[~drift_run.beam_off]
    np.testing.assert_array_equal(shifts, np.round(shifts))


# ----------------------------------------------------------------------------------------------------- demo
def test_demo(cli, tmp_path):
    out = tmp_path / "demo"
    result = cli("demo", "--out", out, "--frames", "40", "--size", "128")
    assert result.exit_code == 0, result.output
    match = re.search(r"RMS ([0-9.]+) px", result.stdout)
    assert match, result.stdout
    assert float(match.group(1)) <= ACCURACY
    assert (out / "raw.zarr").exists()
    ds = xr.open_zarr(out / "corrected.zarr")
    assert ds.attrs["status"] == "complete" and ds["corrected"].shape == (40, 128, 128)


def test_failing_block_exits_1_and_the_rerun_resumes(cli, stored_inputs, tmp_path, monkeypatch):
    import driftcorr.pipeline as pipeline

    output = tmp_path / "out.zarr"
    register = pipeline._register_block

    def poisoned(block, plan, upsample):
        if poisoned.armed and len(poisoned.calls) == 2:
            poisoned.calls.append("failed")
            raise MemoryError("cannot allocate")
        poisoned.calls.append(len(block))
        return register(block, plan, upsample)

    poisoned.armed, poisoned.calls = True, []
    monkeypatch.setattr(pipeline, "_register_block", poisoned)
    result = cli("estimate", stored_inputs["v3"], output, "--block-frames", "8")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MemoryError" in lines[0] and "resume" in lines[0] and "Traceback" not in result.stderr
    assert xr.open_zarr(output).attrs["status"] == "incomplete"
    poisoned.armed, poisoned.calls = False, []
    result = cli("estimate", stored_inputs["v3"], output, "--block-frames", "8")
    assert result.exit_code == 0, result.stderr
    assert poisoned.calls == [8]  # only the block that failed
    assert xr.open_zarr(output).attrs["status"] == "complete"


@pytest.mark.parametrize("text, named", [
    ("upsample_factor = 7\n[correction]\nmethod = 'ncc'\n", "upsample_factor"),
    ("[cluster]\nscheduler = 'tcp://127.0.0.1:1'\nlocal_workers = 2\n", "not both"),
    ("cluster = 'tcp://127.0.0.1:1'\n[correction]\n", "cluster"),
])
def test_config_file_settings_are_never_silently_ignored(cli, stored_inputs, tmp_path, text, named):
    config = tmp_path / "c.toml"
    config.write_text(text)
    _assert_bad_input(cli("estimate", stored_inputs["v3"], tmp_path / "out.zarr", "--config", config), match=named)
