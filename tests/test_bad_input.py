"""Every mistake a user can make through ``driftcorr correct`` is refused cleanly (issue 6).

Each case of :data:`CASES` builds its own bad input under ``tmp_path`` and runs the command line in-process. A
refusal must exit with code 2, print exactly one line ``driftcorr: error: ...`` on stderr (no traceback) that
names the bad value, leave every input file byte-for-byte as it was, and leave no output that claims to be
complete (an output that existed before the run must be byte-identical afterwards).

Inputs (the stack, the mask, a configuration file) live in ``tmp_path / "in"``, and that whole folder is compared
before and after the run.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
import zarr
from click.testing import CliRunner

from driftcorr import store
from driftcorr.cli import main
from driftcorr.synthetic import SyntheticRun, make_run

BLOCK = ("--block-frames", "8")


@pytest.fixture(scope="module")
def run() -> SyntheticRun:
    """A short, small synthetic run: 16 frames of 64², with a beam-block."""
    return make_run(16, (64, 64), seed=6)


# ---------------------------------------------------------------------------------------------------- helpers
def snapshot(*paths: Path, root: Path) -> dict[str, bytes | None]:
    """Relative path -> bytes of every file at or under ``paths`` (None for a path that does not exist)."""
    files: dict[str, bytes | None] = {}
    for path in paths:
        if path.is_file():
            files[str(path.relative_to(root))] = path.read_bytes()
        elif path.is_dir():
            for item in sorted(path.rglob("*")):
                if item.is_file():
                    files[str(item.relative_to(root))] = item.read_bytes()
        else:
            files[str(path.relative_to(root))] = None
    return files


def is_complete(output: Path) -> bool:
    """True where ``output`` opens as a dataset whose status says it is complete."""
    try:
        return xr.open_zarr(output).attrs.get("status") == "complete"
    except Exception:  # not a readable Zarr group at all: certainly not a complete output
        return False


def assert_one_error_line(result, word: str) -> None:
    """Exit code 2 and exactly one line ``driftcorr: error: ...`` on stderr, naming ``word``; no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert "Traceback" not in result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("driftcorr: error:"), lines[0]
    assert re.search(word, lines[0], flags=re.IGNORECASE), (word, lines[0])


@dataclass
class Workspace:
    """Where a case builds its input: ``inputs`` (compared before and after), the run, the command line."""

    tmp: Path
    run: SyntheticRun
    cli: Callable
    cleanups: list[Callable] = field(default_factory=list)

    @property
    def inputs(self) -> Path:
        return self.tmp / "in"

    @property
    def output(self) -> Path:
        return self.tmp / "out.zarr"

    def stack(self, data=None, name: str = "raw.zarr") -> Path:
        """Write ``data`` (default: the run's frames) as a Zarr v3 array in the input folder."""
        data = self.run.stack() if data is None else data
        return Path(store.write_stack(data, self.inputs / name, block_frames=8))

    def mask(self, data=None, name: str = "mask.npy") -> Path:
        path = self.inputs / name
        np.save(path, self.run.beam_block if data is None else data)
        return path

    def config(self, text: str, name: str = "config.toml") -> Path:
        path = self.inputs / name
        path.write_text(text)
        return path


@dataclass
class Setup:
    """What a case runs: the arguments after ``correct``, its output, and a regex the error line must match."""

    args: list
    output: Path
    word: str


# ------------------------------------------------------------------------------------------------------ cases
def missing_input(ws):
    return Setup([ws.inputs / "missing.zarr", ws.output], ws.output, r"missing\.zarr.*does not exist")


def input_2d(ws):
    return Setup([ws.stack(ws.run.stack()[0]), ws.output, *BLOCK], ws.output, r"2-D")


def input_5d(ws):
    return Setup([ws.stack(ws.run.stack()[:, None, None]), ws.output, *BLOCK], ws.output, r"5-D")


def group_of_two_stacks(ws):
    frames = ws.run.stack()
    group = zarr.open_group(ws.inputs / "two.zarr", mode="w")
    for name in ("a", "b"):
        group.create_array(name, shape=frames.shape, dtype=frames.dtype, chunks=(8, 64, 64))[...] = frames
    return Setup([ws.inputs / "two.zarr", ws.output, *BLOCK], ws.output, r"--array")


def unknown_array_name(ws):
    frames = ws.run.stack()
    group = zarr.open_group(ws.inputs / "group.zarr", mode="w")
    group.create_array("frames", shape=frames.shape, dtype=frames.dtype, chunks=(8, 64, 64))[...] = frames
    return Setup([ws.inputs / "group.zarr", ws.output, "--array", "framez", *BLOCK], ws.output, r"framez")


def complex_input(ws):
    return Setup([ws.stack(ws.run.stack().astype(np.complex64)), ws.output, *BLOCK], ws.output, r"dtype complex64")


def bool_input(ws):
    return Setup([ws.stack(ws.run.stack() > 1000), ws.output, *BLOCK], ws.output, r"dtype bool")


def zero_frames(ws):
    return Setup([ws.stack(np.zeros((0, 64, 64), np.uint16)), ws.output, *BLOCK], ws.output, r"no frames")


def mask_of_wrong_shape(ws):
    mask = ws.mask(np.ones((48, 64), bool))
    return Setup([ws.stack(), ws.output, "--mask", mask, *BLOCK], ws.output, r"mask.*shape")


def mask_all_false(ws):
    mask = ws.mask(np.zeros((64, 64), bool))
    return Setup([ws.stack(), ws.output, "--mask", mask, *BLOCK], ws.output, r"mask.*no pixel")


def mask_not_npy(ws):
    mask = ws.inputs / "mask.npy"
    mask.write_bytes(b"\x93NUMPY but not really \x00\xff\xfe garbage")
    return Setup([ws.stack(), ws.output, "--mask", mask, *BLOCK], ws.output, r"mask")


def missing_mask(ws):
    mask = ws.inputs / "typo.npy"
    return Setup([ws.stack(), ws.output, "--mask", mask, *BLOCK], ws.output, r"mask.*typo\.npy.*does not exist")


def output_is_input(ws):
    source = ws.stack()
    return Setup([source, source, *BLOCK], source, r"overlaps the input")


def output_inside_input(ws):
    source = ws.stack()
    return Setup([source, source / "out.zarr", *BLOCK], source / "out.zarr", r"overlaps the input")


def _foreign_output(ws):
    ws.output.mkdir()
    (ws.output / "notes.txt").write_text("my precious notes\n")
    return ws.stack()


def foreign_output(ws):
    return Setup([_foreign_output(ws), ws.output, *BLOCK], ws.output, r"not a driftcorr output")


def foreign_output_overwrite(ws):
    return Setup([_foreign_output(ws), ws.output, "--overwrite", *BLOCK], ws.output, r"not a driftcorr output")


def parent_not_writable(ws):
    if os.geteuid() == 0:
        pytest.skip("root may write anywhere")
    source = ws.stack()
    locked = ws.tmp / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    ws.cleanups.append(lambda: locked.chmod(0o700))
    return Setup([source, locked / "out.zarr", *BLOCK], locked / "out.zarr", r"writable")


def unknown_config_key(ws):
    config = ws.config('reference = "0"\nupsampel_factor = 20\n')
    return Setup([ws.stack(), ws.output, "--config", config, *BLOCK], ws.output, r"upsampel_factor")


def invalid_config_value(ws):
    config = ws.config('method = "fourier"\n')
    return Setup([ws.stack(), ws.output, "--config", config, *BLOCK], ws.output, r"method.*fourier")


def max_shift_over_half_frame(ws):
    return Setup([ws.stack(), ws.output, "--max-shift", "40", *BLOCK], ws.output, r"max_shift")


def reference_out_of_range(ws):
    return Setup([ws.stack(), ws.output, "--reference", "999", *BLOCK], ws.output, r"reference.*999")


def reference_malformed(ws):
    return Setup([ws.stack(), ws.output, "--reference", "mean:5", *BLOCK], ws.output, r"reference.*mean:5")


def negative_upsample(ws):
    return Setup([ws.stack(), ws.output, "--upsample=-3", *BLOCK], ws.output, r"upsample")


def complete_output_other_options(ws):
    source = ws.stack()
    first = ws.cli("correct", source, ws.output, "--upsample", "20", *BLOCK)
    assert first.exit_code == 0, first.output
    assert is_complete(ws.output)
    return Setup([source, ws.output, *BLOCK], ws.output, r"upsample.*--overwrite")


CASES = [
    missing_input,
    input_2d,
    input_5d,
    group_of_two_stacks,
    unknown_array_name,
    complex_input,
    bool_input,
    zero_frames,
    mask_of_wrong_shape,
    mask_all_false,
    mask_not_npy,
    missing_mask,
    output_is_input,
    output_inside_input,
    foreign_output,
    foreign_output_overwrite,
    parent_not_writable,
    unknown_config_key,
    invalid_config_value,
    max_shift_over_half_frame,
    reference_out_of_range,
    reference_malformed,
    negative_upsample,
    complete_output_other_options,
]


def _case_id(build) -> str:
    return build.__name__


@pytest.mark.parametrize("build", CASES, ids=_case_id)
def test_bad_input_is_refused_cleanly(cli, run, tmp_path, build):
    ws = Workspace(tmp_path, run, cli)
    ws.inputs.mkdir()
    try:
        setup = build(ws)
        inputs_before = snapshot(ws.inputs, root=tmp_path)
        existed = setup.output.exists()
        output_before = snapshot(setup.output, root=tmp_path)

        result = cli("correct", *setup.args)

        assert_one_error_line(result, setup.word)
        assert snapshot(ws.inputs, root=tmp_path) == inputs_before
        if existed:
            assert snapshot(setup.output, root=tmp_path) == output_before
        else:
            assert not setup.output.exists() or not is_complete(setup.output)
    finally:
        for cleanup in ws.cleanups:
            cleanup()


# ---------------------------------------------------------------------------------------------- other checks
def test_nan_and_blank_frames_are_flagged_not_refused(cli, tmp_path):
    run = make_run(16, (64, 64), seed=6, jump_px=None)  # no jump: on 64² frames it would leave the search window
    ws = Workspace(tmp_path, run, cli)
    ws.inputs.mkdir()
    frames = run.stack().astype(np.float32)
    nan_frame, blank_frame = 5, 11
    frames[nan_frame] = np.nan
    frames[blank_frame] = 100.0
    source, mask = ws.stack(frames), ws.mask()
    before = snapshot(ws.inputs, root=tmp_path)

    result = cli("correct", source, ws.output, "--mask", mask, *BLOCK)

    assert result.exit_code == 0, result.output
    assert "Traceback" not in result.output
    ds = xr.open_zarr(ws.output)
    assert ds.attrs["status"] == "complete"
    assert ds["corrected"].shape == frames.shape
    flagged = set(np.flatnonzero(~ds["valid"].values).tolist())
    assert flagged == {nan_frame, blank_frame, *np.flatnonzero(run.beam_off).tolist()}
    assert snapshot(ws.inputs, root=tmp_path) == before


def test_verbose_expected_error_still_exits_2(run, tmp_path):
    ws = Workspace(tmp_path, run, None)
    ws.inputs.mkdir()
    source, mask = ws.stack(), ws.mask(np.zeros((64, 64), bool))
    before = snapshot(ws.inputs, root=tmp_path)
    result = CliRunner().invoke(main, ["--verbose", "correct", str(source), str(ws.output), "--mask", str(mask)])
    assert result.exit_code == 2, result.output
    assert "driftcorr: error:" in result.stderr and "mask" in result.stderr
    assert snapshot(ws.inputs, root=tmp_path) == before
    assert not ws.output.exists()
