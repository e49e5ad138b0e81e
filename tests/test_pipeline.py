"""The Dask layer (driftcorr.pipeline) and the stored output (driftcorr.store): estimate_drift, apply_drift, correct.

The Dask functions are compared with the eager NumPy kernels on the same data, laziness is proven with a scheduler
that counts computes, and the written output is checked against the contract of DESIGN §3.
"""

from __future__ import annotations

import json

import dask
import dask.array as da
import numpy as np
import pytest
import xarray as xr
import zarr
from scipy import ndimage as ndi

import driftcorr
from driftcorr import apply_drift, correct, estimate_drift, open_stack
from driftcorr.errors import InputError, OutputError, OutputExistsError
from driftcorr.registration import make_plan, register_frames
from driftcorr.store import write_stack
from driftcorr.synthetic import make_run
from driftcorr.warp import shift_frames

from .helpers import rms_error

pytestmark = pytest.mark.usefixtures("synchronous_dask")

QUALITY = ("sigma", "ncc", "overlap", "second_peak")
ACCURACY = 0.1  # px, RMS on good frames of a realistic synthetic run


#: The pipeline options under which it must equal the eager loop below (no sample-based steps).
AS_LOOP = {"reference": 0, "detect_defects": False}


def _numpy_loop(frames, mask, **plan_options):
    """The eager reference: one plan from frame 0, then each frame registered on its own."""
    plan = make_plan(frames[0], reference_mask=mask, **plan_options)
    results = [register_frames(plan, frames[i:i + 1]) for i in range(frames.shape[0])]
    return {name: np.concatenate([getattr(r, name) for r in results]) for name in ("shift", *QUALITY)}


def _assert_matches_loop(ds, expected):
    # Shifts are measured from the anchor frame: its own shift against the reference is subtracted from all.
    anchor = ds.attrs["reference_frame"]
    offset = expected["shift"][anchor]
    np.testing.assert_allclose(ds.attrs["anchor_offset"], offset, atol=1e-12, rtol=0)
    np.testing.assert_allclose(ds["raw_shift"].values, expected["shift"] - offset, atol=1e-9, rtol=0)
    for name in QUALITY[1:]:
        np.testing.assert_allclose(ds[name].values, expected[name], atol=1e-9, rtol=0, err_msg=name)
    valid = ds["valid"].values
    # sigma adds the anchor frame's own uncertainty (0 for itself); flagged frames take their neighbours'.
    total = np.sqrt(expected["sigma"] ** 2 + expected["sigma"][anchor] ** 2)
    total[anchor] = 0.0
    np.testing.assert_allclose(ds["sigma"].values[valid], total[valid], atol=1e-9, rtol=0)
    np.testing.assert_allclose(ds.attrs["sigma_anchor"], expected["sigma"][anchor], atol=1e-12, rtol=0)
    np.testing.assert_array_equal(ds["shift"].values[valid], ds["raw_shift"].values[valid])


@pytest.fixture(
    scope="module",
    params=[pytest.param("beam-block", id="beam-block"), pytest.param("defects", id="hot-dead")],
)
def equivalence_data(request, drift_run, drift_stack):
    """(frames, mask, loop result): the shared run with its hot/dead pixels, or the same run without them."""
    if request.param == "defects":
        assert (drift_run.hot_pixels | drift_run.dead_pixels).any()
        frames, mask = drift_stack, drift_run.mask
    else:
        run = make_run(40, (128, 128), seed=1, hot_fraction=0.0, dead_fraction=0.0)
        frames, mask = run.stack(), run.mask
    return frames, mask, _numpy_loop(frames, mask)


# ------------------------------------------------------------------------------------------ estimate_drift
@pytest.mark.parametrize("kind", ["numpy", "dask", "xarray"])
def test_estimate_drift_equals_numpy_loop(kind, equivalence_data):
    frames, mask, expected = equivalence_data
    stack = {
        "numpy": lambda: frames,
        "dask": lambda: da.from_array(frames, chunks=(7, 128, 128)),
        "xarray": lambda: xr.DataArray(frames, dims=("t", "row", "col")),
    }[kind]()
    ds = estimate_drift(stack, mask=mask, **AS_LOOP)
    _assert_matches_loop(ds, expected)
    assert ds.sizes["frame"] == frames.shape[0]
    np.testing.assert_array_equal(ds["frame"].values, np.arange(frames.shape[0]))
    assert list(ds["axis"].values) == ["y", "x"]


@pytest.mark.parametrize("block_frames", [3, 16])
def test_block_size_does_not_change_the_result(block_frames, equivalence_data):
    frames, mask, expected = equivalence_data
    ds = estimate_drift(frames, mask=mask, block_frames=block_frames, **AS_LOOP)
    _assert_matches_loop(ds, expected)


@pytest.mark.parametrize("block_frames", [3, 16])
def test_block_size_does_not_change_the_default_result(block_frames, drift_run, drift_stack):
    """Defect detection and the iterative reference read a sample independent of the blocks."""
    expected = estimate_drift(drift_stack, mask=drift_run.beam_block, block_frames=8)
    ds = estimate_drift(drift_stack, mask=drift_run.beam_block, block_frames=block_frames)
    for name in ("raw_shift", "ncc", "valid", "reference", "mask", "defects"):
        np.testing.assert_array_equal(ds[name].values, expected[name].values, err_msg=name)
    # sigma sums float32 products in matrix products whose blocking (and rounding) follows the batch size.
    np.testing.assert_allclose(ds["sigma"].values, expected["sigma"].values, rtol=1e-12, atol=0)


def test_input_kinds_and_path_agree(stored_inputs, drift_run, drift_stack):
    """NumPy, Dask, xarray and a stored path, blocked alike, give identical results (hot pixels included)."""
    expected = estimate_drift(drift_stack, mask=drift_run.mask, block_frames=8)
    others = [
        estimate_drift(da.from_array(drift_stack, chunks=(5, 128, 128)), mask=drift_run.mask, block_frames=8),
        estimate_drift(xr.DataArray(drift_stack, dims=("t", "y", "x")), mask=drift_run.mask, block_frames=8),
        estimate_drift(stored_inputs["v3"], mask=drift_run.mask, block_frames=8),
        estimate_drift(stored_inputs["v2"], mask=drift_run.mask, block_frames=8),
    ]
    for ds in others:
        for name in ("shift", "raw_shift", *QUALITY, "valid", "reference", "mask"):
            np.testing.assert_array_equal(ds[name].values, expected[name].values, err_msg=name)


def test_block_size_does_not_change_the_result_float_frames():
    """Float frames (inexact float32 sums): the block size must not change the result either."""
    run = make_run(24, (128, 128), seed=1, hot_fraction=0.0, dead_fraction=0.0)
    frames = run.stack().astype(np.float32) * np.float32(1.001)  # non-integer values
    one = estimate_drift(frames, mask=run.mask, block_frames=3)
    other = estimate_drift(frames, mask=run.mask, block_frames=16)
    np.testing.assert_allclose(one["raw_shift"].values, other["raw_shift"].values, atol=1e-9, rtol=0)


def test_estimate_drift_accuracy_on_synthetic_run(drift_run, drift_stack):
    ds = estimate_drift(drift_stack, mask=drift_run.mask)
    truth = drift_run.true_shifts(0)
    good = ~drift_run.beam_off
    assert drift_run.beam_off.any() and np.abs(truth).max() > 5  # the run has what this test is about
    assert rms_error(ds["shift"].values[good], truth[good]) <= ACCURACY
    valid = ds["valid"].values
    assert not valid[drift_run.beam_off].any(), "beam-off frames must be flagged invalid"
    assert valid[good].mean() > 0.9
    # Flagged frames get an interpolated (finite) shift; raw_shift keeps what was measured.
    assert np.all(np.isfinite(ds["shift"].values))
    # The default iterative reference is anchored on frame 0 (a good frame here).
    assert ds.attrs["reference_frame"] == 0
    assert "iterative" in ds["reference"].attrs["long_name"]
    assert ds["reference"].dims == ("y", "x") and ds["mask"].dtype == bool
    # The given mask holds the hot and dead pixels already: nothing more is found.
    np.testing.assert_array_equal(ds["mask"].values, drift_run.mask)


def test_cosmic_ray_frame_is_accurate_or_flagged():
    run = make_run(40, (128, 128), seed=2026)
    ds = estimate_drift(run.stack(), mask=run.mask)
    error = np.linalg.norm(ds["shift"].values - run.true_shifts(0), axis=1)
    for t in np.flatnonzero(run.cosmic):
        assert not ds["valid"].values[t] or error[t] <= ACCURACY, f"frame {t}: trusted, error {error[t]:.3f} px"


def test_unmasked_hot_pixels_do_not_lock_onto_zero(drift_run, drift_stack):
    assert drift_run.hot_pixels.any()
    ds = estimate_drift(drift_stack, mask=drift_run.beam_block)  # the beam-block only, as a user would draw it
    good = ~drift_run.beam_off & ds["valid"].values
    assert good.sum() > 30
    assert rms_error(ds["shift"].values[good], drift_run.true_shifts(0)[good]) <= ACCURACY


@pytest.mark.parametrize(
    ("reference", "label"), [("mean:0:4", "mean:0:4"), ("median:0:5", "median:0:5"), (3, "3"), ("-1", "15")]
)
def test_reference_specifications(reference, label, small_run):
    frames = small_run.stack()
    ds = estimate_drift(frames, mask=small_run.mask, reference=reference)
    expected = {
        "mean:0:4": frames[:4].mean(axis=0),
        "median:0:5": np.median(frames[:5], axis=0),
        "3": frames[3],
        "15": frames[15],
    }[label]
    np.testing.assert_allclose(ds["reference"].values, expected, rtol=1e-6)
    assert f"({label})" in ds["reference"].attrs["long_name"]
    if label.isdigit():  # the reference frame registers onto itself
        np.testing.assert_allclose(ds["shift"].values[int(label)], [0, 0], atol=1e-3)


def test_time_coordinate_is_kept(small_run, tmp_path):
    frames = small_run.stack()
    times = np.datetime64("2026-01-01T00:00:00", "us") + np.arange(frames.shape[0]) * np.timedelta64(1500, "ms")
    stack = xr.DataArray(frames, dims=("t", "y", "x"), coords={"time": ("t", times)})
    ds = estimate_drift(stack, mask=small_run.mask)
    assert ds["time"].dims == ("frame",)
    np.testing.assert_array_equal(ds["time"].values, times)
    correct(stack, tmp_path / "out.zarr", mask=small_run.mask)
    stored = xr.open_zarr(tmp_path / "out.zarr")
    assert np.issubdtype(stored["time"].dtype, np.datetime64)
    np.testing.assert_array_equal(stored["time"].values, times)


def test_volumes_4d_stack():
    rng = np.random.default_rng(71)
    big = ndi.gaussian_filter(rng.random((48, 48, 48)), 2)
    shifts = np.array([[0, 0, 0], [1, -2, 1], [-1, 1, 2], [2, 0, -1]])
    frames = np.stack([np.roll(big, s, axis=(0, 1, 2))[8:40, 8:40, 8:40] for s in shifts])
    ds = estimate_drift(frames, max_shift=4)
    assert list(ds["axis"].values) == ["z", "y", "x"]
    assert ds["shift"].shape == (4, 3) and ds["reference"].dims == ("z", "y", "x")
    np.testing.assert_allclose(ds["shift"].values, -shifts, atol=0.05)
    corrected = apply_drift(frames, ds)
    assert corrected.dims == ("frame", "z", "y", "x")


def test_estimate_drift_bad_input(small_run):
    frames = small_run.stack()
    with pytest.raises(InputError, match="shape"):
        estimate_drift(frames, mask=np.ones((10, 10), bool))
    with pytest.raises(InputError):
        estimate_drift(frames, mask=np.zeros((64, 64), bool))
    with pytest.raises(InputError, match="out of range"):
        estimate_drift(frames, reference=16)
    with pytest.raises(InputError, match="max_shift"):
        estimate_drift(frames, max_shift=64)
    with pytest.raises(InputError):
        estimate_drift(frames[0])  # a single 2-D frame is not a stack
    with pytest.raises(driftcorr.ConfigError):
        estimate_drift(frames, method="magic")


# --------------------------------------------------------------------------------------------- apply_drift
def test_apply_drift_is_lazy_and_equals_shift_frames(compute_counter, stored_inputs, drift_stack, drift_run):
    drift = estimate_drift(drift_stack, mask=drift_run.mask)
    calls = compute_counter.calls
    stack = open_stack(stored_inputs["v3"])
    corrected = apply_drift(stack, drift)
    assert compute_counter.calls == calls, "apply_drift computed something before .compute()"
    assert isinstance(corrected, xr.DataArray) and isinstance(corrected.data, da.Array)
    assert corrected.dims == ("frame", "y", "x") and corrected.dtype == np.float32
    assert all(size == 128 for size in corrected.data.chunksize[1:])  # chunks span whole frames
    values = corrected.compute()
    assert compute_counter.calls == calls + 1
    expected = shift_frames(drift_stack, drift["shift"].values)
    np.testing.assert_array_equal(values.values, expected)
    np.testing.assert_array_equal(values["frame"].values, np.arange(drift_stack.shape[0]))


@pytest.mark.parametrize("form", ["dataset", "dataarray", "ndarray"])
def test_apply_drift_accepts_drift_forms(form, small_run):
    frames = small_run.stack()
    drift = estimate_drift(frames, mask=small_run.mask)
    given = {"dataset": drift, "dataarray": drift["shift"], "ndarray": drift["shift"].values}[form]
    corrected = apply_drift(frames, given, interpolation_order=1, block_frames=5)
    np.testing.assert_array_equal(corrected.values, shift_frames(frames, drift["shift"].values, order=1))


def test_apply_drift_rejects_wrong_drift(small_run):
    frames = small_run.stack()
    with pytest.raises(InputError):
        apply_drift(frames, np.zeros((frames.shape[0] - 1, 2)))
    with pytest.raises(InputError):
        apply_drift(frames, np.zeros((frames.shape[0], 3)))
    with pytest.raises(InputError):
        apply_drift(frames, xr.Dataset({"other": ("frame", np.zeros(frames.shape[0]))}))


# ------------------------------------------------------------------------------------------------- correct
@pytest.fixture(scope="module")
def corrected_output(tmp_path_factory, stored_inputs, drift_run):
    """``correct`` of the shared run (v3 array input), written once for the output-contract tests."""
    out = tmp_path_factory.mktemp("correct") / "out.zarr"
    with dask.config.set(scheduler="synchronous"):
        returned = correct(stored_inputs["v3"], out, mask=drift_run.mask)
    return out, returned


def test_correct_output_contract(corrected_output, stored_inputs, drift_stack):
    out, returned = corrected_output
    ds = xr.open_zarr(out)
    n = drift_stack.shape[0]
    for name in ("shift", "sigma"):
        assert ds[name].dims == ("frame", "axis") and ds[name].dtype == np.float64
        assert ds[name].shape == (n, 2)
        assert ds[name].attrs["units"] == "px" and ds[name].attrs["long_name"]
    assert list(ds["axis"].values) == ["y", "x"]
    assert ds["ncc"].dims == ("frame",) and np.issubdtype(ds["ncc"].dtype, np.floating)
    assert ds["valid"].dims == ("frame",) and ds["valid"].dtype == bool
    assert ds["corrected"].dims == ("frame", "y", "x") and ds["corrected"].shape == drift_stack.shape
    assert ds["reference"].dims == ("y", "x") and ds["mask"].dims == ("y", "x")
    assert ds["mask"].dtype == bool
    assert np.issubdtype(ds["frame"].dtype, np.integer)
    np.testing.assert_array_equal(ds["frame"].values, np.arange(n))
    for name in ("shift", "sigma", "ncc", "valid", "corrected", "reference", "reference_mask", "mask", "defects"):
        assert ds[name].attrs.get("long_name"), f"{name} has no long_name"
    for name in ("ncc", "corrected", "reference"):
        assert "units" in ds[name].attrs, f"{name} has no units"
    assert ds.attrs["driftcorr_version"] == driftcorr.__version__
    assert ds.attrs["status"] == "complete"
    assert ds.attrs["input"] == stored_inputs["v3"]
    config = ds.attrs["config"]
    config = json.loads(config) if isinstance(config, str) else config
    assert config["upsample_factor"] == 50 and config["method"] == "ncc" and config["reference"] == "iterative"
    # correct() returns the written output.
    xr.testing.assert_identical(returned.load(), ds.load())


def test_correct_is_accurate_and_matches_in_memory(corrected_output, drift_stack, drift_run):
    out, _ = corrected_output
    ds = xr.open_zarr(out).load()
    good = ~drift_run.beam_off
    assert rms_error(ds["shift"].values[good], drift_run.true_shifts(0)[good]) <= ACCURACY
    assert not ds["valid"].values[drift_run.beam_off].any()
    memory = estimate_drift(drift_stack, mask=drift_run.mask)
    np.testing.assert_allclose(ds["shift"].values, memory["shift"].values, atol=1e-9, rtol=0)
    np.testing.assert_array_equal(ds["corrected"].values, shift_frames(drift_stack, memory["shift"].values))
    np.testing.assert_array_equal(ds["mask"].values, drift_run.mask)


def test_corrected_stack_is_aligned(tmp_path):
    """Per-pixel scatter over frames: the corrected stack is as steady as a run that never drifted."""
    options = {"ring_modulation": 0.0, "beam_current_wander": 0.0, "hot_fraction": 0.0, "dead_fraction": 0.0}
    run = make_run(24, (128, 128), seed=2, **options)
    source = write_stack(run.stack(), tmp_path / "raw.zarr")
    correct(source, tmp_path / "out.zarr", mask=run.mask)
    corrected = xr.open_zarr(tmp_path / "out.zarr")["corrected"].values
    good = ~run.beam_off
    raw = run.stack()[good].astype(np.float64)
    still = make_run(24, (128, 128), seed=2, drift_px=0.0, jump_px=None, **options).stack()[good]
    # Pixels that stay inside the frame and off the (static, hence moving after correction) beam-block.
    margin = int(np.ceil(np.abs(run.true_shifts(0)).max())) + 2
    region = ndi.binary_erosion(run.mask, iterations=margin, border_value=0)
    assert region.sum() > 5000
    scatter_corrected = np.nanstd(corrected[good][:, region], axis=0).mean()
    scatter_raw = raw[:, region].std(axis=0).mean()
    scatter_still = still[:, region].astype(np.float64).std(axis=0).mean()
    assert scatter_corrected < 0.4 * scatter_raw
    assert scatter_corrected < 1.25 * scatter_still


def test_estimate_only_writes_no_corrected_stack(tmp_path, small_run):
    source = write_stack(small_run.stack(), tmp_path / "raw.zarr")
    returned = correct(source, tmp_path / "drift.zarr", mask=small_run.mask, estimate_only=True)
    ds = xr.open_zarr(tmp_path / "drift.zarr")
    assert "corrected" not in ds and "corrected" not in returned
    assert {"shift", "sigma", "ncc", "valid", "reference", "mask"} <= set(ds.data_vars)
    assert ds.attrs["status"] == "complete"


def test_refuses_to_overwrite(tmp_path, small_run):
    source = write_stack(small_run.stack(), tmp_path / "raw.zarr")
    out = tmp_path / "out.zarr"
    correct(source, out, mask=small_run.mask, estimate_only=True)
    with pytest.raises(OutputExistsError, match="exists"):
        correct(source, out, mask=small_run.mask)
    assert "corrected" not in xr.open_zarr(out)  # untouched
    correct(source, out, mask=small_run.mask, overwrite=True)
    assert "corrected" in xr.open_zarr(out)


def test_overwrite_never_deletes_a_foreign_folder(tmp_path, small_run):
    source = write_stack(small_run.stack(), tmp_path / "raw.zarr")
    precious = tmp_path / "thesis"
    precious.mkdir()
    (precious / "chapter1.tex").write_text("results")
    with pytest.raises(OutputError, match="not a driftcorr output"):
        correct(source, precious, mask=small_run.mask, overwrite=True)
    assert (precious / "chapter1.tex").read_text() == "results"
    assert sorted(p.name for p in precious.iterdir()) == ["chapter1.tex"]
    # A Zarr store that driftcorr did not write is foreign too.
    other = write_stack(small_run.stack(), tmp_path / "other.zarr")
    with pytest.raises(OutputError):
        correct(source, other, mask=small_run.mask, overwrite=True)
    np.testing.assert_array_equal(zarr.open_array(other, mode="r")[...], small_run.stack())


def test_output_inside_input_is_refused(tmp_path, small_run):
    source = write_stack(small_run.stack(), tmp_path / "raw.zarr")
    with pytest.raises(OutputError):
        correct(source, tmp_path / "raw.zarr" / "out.zarr", mask=small_run.mask)
    with pytest.raises((OutputError, OutputExistsError)):
        correct(source, source, mask=small_run.mask, overwrite=True)
    np.testing.assert_array_equal(open_stack(source).values, small_run.stack())


# ---------------------------------------------------------------------------------------------------- inputs
@pytest.mark.parametrize("kind", ["v3", "v2", "group"])
def test_inputs_v3_v2_and_group(kind, stored_inputs, drift_stack, tmp_path):
    stack = open_stack(stored_inputs[kind], block_frames=5)
    assert stack.dims == ("frame", "y", "x") and isinstance(stack.data, da.Array)
    assert stack.data.chunks[0] == (5,) * 8 and stack.data.chunks[1:] == ((128,), (128,))
    assert stack.dtype == np.uint16
    np.testing.assert_array_equal(stack.values, drift_stack)
    out = correct(stored_inputs[kind], tmp_path / "out.zarr", estimate_only=True, upsample_factor=1)
    assert out.sizes["frame"] == drift_stack.shape[0]
    assert out.attrs["input"] == stored_inputs[kind]


def test_group_with_two_stacks_needs_array(tmp_path, small_run):
    frames = small_run.stack()
    group = zarr.open_group(tmp_path / "two.zarr", mode="w", zarr_format=3)
    for name, data in (("raw", frames), ("dark", frames[:, ::-1])):
        group.create_array(name, shape=data.shape, dtype=data.dtype, chunks=(4, 64, 64))[...] = data
    location = str(tmp_path / "two.zarr")
    with pytest.raises(InputError, match="array"):
        open_stack(location)
    with pytest.raises(InputError, match="array"):
        correct(location, tmp_path / "out.zarr")
    assert not (tmp_path / "out.zarr").exists()
    np.testing.assert_array_equal(open_stack(location, array="dark").values, frames[:, ::-1])
    with pytest.raises(InputError, match="nope"):
        open_stack(location, array="nope")
    out = correct(location, tmp_path / "out.zarr", array="raw", mask=small_run.mask, estimate_only=True,
                  reference=0)
    np.testing.assert_array_equal(out["reference"].values, frames[0])


def test_missing_input(tmp_path):
    with pytest.raises(InputError, match="does not exist"):
        open_stack(tmp_path / "missing.zarr")
    with pytest.raises(InputError):
        correct(tmp_path / "missing.zarr", tmp_path / "out.zarr")


def test_sample_is_read_once(compute_counter, drift_run, drift_stack):
    """Defect detection and the iterative reference share one read of the sample; then one registration graph."""
    estimate_drift(da.from_array(drift_stack, chunks=(8, 128, 128)), mask=drift_run.beam_block)
    assert compute_counter.calls == 2
