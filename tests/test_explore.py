"""Exploring an output: the report (PNG and HTML) and the lazy corrected view of a drift-only output."""

from __future__ import annotations

import dask
import numpy as np
import pytest
import xarray as xr
from click.testing import CliRunner

from driftcorr import apply_drift, correct, open_stack
from driftcorr.cli import main
from driftcorr.store import write_stack
from driftcorr.synthetic import make_run


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    """A 40-frame run of 96², corrected (with the stack) and estimated (drift only)."""
    root = tmp_path_factory.mktemp("explore")
    run = make_run(40, (96, 96), seed=8, jump_px=None)
    raw = write_stack(run.stack(), root / "raw.zarr", block_frames=8)
    with dask.config.set(scheduler="synchronous"):
        correct(raw, root / "corrected.zarr", mask=run.beam_block, block_frames=8)
        correct(raw, root / "drift.zarr", mask=run.beam_block, block_frames=8, estimate_only=True)
    return run, raw, root


def _cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_report_writes_a_png_and_an_html_page(outputs, tmp_path):
    import matplotlib.image

    _, _, root = outputs
    result = _cli("report", root / "corrected.zarr", "--png", tmp_path / "r.png", "--html", tmp_path / "r.html")
    assert result.exit_code == 0, result.output
    data = (tmp_path / "r.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(tmp_path / "r.png")
    assert image.shape[0] >= 400 and image.shape[1] >= 600 and image.std() > 0.05  # a real picture, not blank
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "flagged frames" in page
    flagged = np.flatnonzero(~xr.open_zarr(root / "corrected.zarr")["valid"].values).tolist()
    assert str(flagged) in page


def test_report_of_a_drift_only_output(outputs, tmp_path):
    _, _, root = outputs
    assert _cli("report", root / "drift.zarr", "--png", tmp_path / "d.png").exit_code == 0
    assert (tmp_path / "d.png").stat().st_size > 10_000


@pytest.mark.parametrize("case", ["not-an-output", "nothing-to-write", "incomplete"])
def test_report_refuses_what_it_cannot_show(outputs, tmp_path, case):
    _, _, root = outputs
    target = root / "corrected.zarr"
    args = ["--png", tmp_path / "r.png"]
    if case == "not-an-output":
        target = tmp_path / "notes"
        target.mkdir()
    elif case == "nothing-to-write":
        args = []
    else:
        import zarr

        target = tmp_path / "copy.zarr"
        write_stack(np.zeros((2, 8, 8), np.uint16), tmp_path / "raw2.zarr")
        correct(tmp_path / "raw2.zarr", target, estimate_only=True, detect_defects=False, reference=0)
        zarr.open_group(target, mode="r+", use_consolidated=False).attrs["status"] = "incomplete"
    result = _cli("report", target, *args)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.stderr
    assert not (tmp_path / "r.png").exists()


def test_apply_drift_on_a_drift_only_output_is_lazy_and_equals_the_written_frames(outputs):
    _, raw, root = outputs
    view = apply_drift(open_stack(raw), root / "drift.zarr")
    assert isinstance(view.data, dask.array.Array)  # nothing computed yet
    written = xr.open_zarr(root / "corrected.zarr")["corrected"].values
    np.testing.assert_array_equal(view.values, written)


def test_report_of_volumes_and_a_missing_folder(tmp_path):
    rng = np.random.default_rng(0)
    from scipy import ndimage as ndi

    volumes = ndi.gaussian_filter(rng.random((40, 24, 24)), 2)
    stack = np.stack([ndi.shift(volumes, (0, 0.1 * t, 0)) for t in range(6)]).astype(np.float32) * 1000
    correct(stack, tmp_path / "vol.zarr", detect_defects=False, reference=0, max_shift=4)
    assert _cli("report", tmp_path / "vol.zarr", "--png", tmp_path / "v.png").exit_code == 0
    result = _cli("report", tmp_path / "vol.zarr", "--png", tmp_path / "nowhere" / "v.png")
    assert result.exit_code == 2 and "folder does not exist" in result.stderr
