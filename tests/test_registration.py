"""The registration kernel: subpixel masked NCC of one pair or a batch (driftcorr.registration).

Known answers are made two ways: Fourier-shifted crops of a larger smooth random image (an exact subpixel shift;
cropping keeps the wrap-around away from the borders), and analytically rendered synthetic frames. Sign convention:
content moved by +d registers with shift -d (``scipy.ndimage.shift(moving, shift) ≈ reference``).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import ndimage as ndi

import driftcorr
from driftcorr.errors import InputError
from driftcorr.registration import RegistrationResult, make_plan, register, register_frames
from driftcorr.synthetic import make_run

from .helpers import rms_error, shifted_crop, smooth_field

# Noiseless synthetic frames: only the drifting pattern (no defects, bad frames or intensity changes).
CLEAN = {
    "noise": False, "beam_block": False, "hot_fraction": 0.0, "dead_fraction": 0.0, "n_beam_off": 0,
    "n_cosmic": 0, "ring_modulation": 0.0, "beam_current_wander": 0.0,
}
NOISELESS_RMS = 0.01  # px, target of the kernel on noiseless data
MASKED_RMS = 0.02  # px, target with corrupted pixels masked out


@functools.cache
def _big(seed: int = 0, size: int = 256) -> np.ndarray:
    """Smooth random 2-D field to crop exact shifted images from (cached: the property test reuses it)."""
    return smooth_field((size, size), seed)


def _pair(d, *, seed: int = 0, size: int = 128):
    """(reference, moving) crops of one field, the moving content moved by ``d``."""
    big = _big(seed, 2 * size)
    return shifted_crop(big, (0, 0), size), shifted_crop(big, d, size)


def _beam_block(shape, centre=(60, 66), radius=14, rod_width=3) -> np.ndarray:
    """True where a disk + rod beam-block covers the detector."""
    yy, xx = np.indices(shape)
    disk = (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 < radius**2
    rod = (np.abs(yy - centre[0]) < rod_width) & (xx > centre[1])
    return disk | rod


# --------------------------------------------------------------------------------------------- known shifts
@pytest.mark.parametrize("d", [(0, 0), (3, -5), (-7, 2), (1, 0), (-10, -9)])
def test_integer_shift(d):
    reference, moving = _pair(d)
    result = register(reference, moving)
    np.testing.assert_allclose(result.shift, -np.asarray(d, float), atol=NOISELESS_RMS)
    integer = register(reference, moving, upsample_factor=1)
    np.testing.assert_array_equal(integer.shift, -np.asarray(d, float))


def test_subpixel_shifts_rms():
    rng = np.random.default_rng(11)
    shifts = rng.uniform(-10, 10, size=(12, 2))
    reference = _pair((0, 0))[0]
    found = np.array([register(reference, _pair(d)[1]).shift for d in shifts])
    assert rms_error(found, -shifts) <= NOISELESS_RMS


def test_subpixel_beats_integer_precision():
    """Subpixel refinement must do better than rounding the true shift (would be ~0.4 px RMS here)."""
    d = np.array([2.37, -4.61])
    reference, moving = _pair(d)
    integer = register(reference, moving, upsample_factor=1).shift
    np.testing.assert_array_equal(integer, np.round(-d))
    for factor, tol in [(4, 0.25), (50, NOISELESS_RMS)]:
        np.testing.assert_allclose(register(reference, moving, upsample_factor=factor).shift, -d, atol=tol)


def test_noiseless_synthetic_frames():
    run = make_run(12, (128, 128), seed=4, **CLEAN)
    frames = run.stack()
    truth = run.true_shifts(0)
    assert np.abs(truth).max() > 2  # the run does drift
    found = register(frames[0], frames).shift
    assert rms_error(found, truth) <= NOISELESS_RMS


def test_noiseless_synthetic_frames_with_beam_block_mask():
    options = {**CLEAN, "beam_block": True}
    run = make_run(12, (128, 128), seed=5, **options)
    frames = run.stack()
    found = register(frames[0], frames, reference_mask=run.mask).shift
    assert rms_error(found, run.true_shifts(0)) <= NOISELESS_RMS


# ------------------------------------------------------------------------------------------------- masks
def _corrupt(image, fraction, rng, where=None):
    """Set a random ``fraction`` of pixels (or the pixels ``where``) to garbage; returns (image, valid mask)."""
    bad = rng.random(image.shape) < fraction if where is None else where
    out = image.copy()
    out[bad] = rng.uniform(-5, 5, size=int(bad.sum()))
    return out, ~bad


def test_corrupted_pixels_masked_out():
    """25% garbage pixels in each image: masked out they barely matter; left in they ruin the registration."""
    rng = np.random.default_rng(21)
    size = 256
    reference = _pair((0, 0), seed=1, size=size)[0]
    shifts = rng.uniform(-6, 6, size=(6, 2))
    masked, unmasked = [], []
    for d in shifts:
        moving = _pair(d, seed=1, size=size)[1]
        ref_bad, ref_valid = _corrupt(reference, 0.25, rng)
        mov_bad, mov_valid = _corrupt(moving, 0.25, rng)
        masked.append(register(ref_bad, mov_bad, reference_mask=ref_valid, moving_mask=mov_valid).shift)
        unmasked.append(register(ref_bad, mov_bad).shift)
    masked_rms = rms_error(masked, -shifts)
    assert masked_rms <= MASKED_RMS
    assert rms_error(unmasked, -shifts) > max(1.0, 20 * masked_rms)


@pytest.mark.parametrize("static", [False, True], ids=["independent-masks", "static-defect-mask"])
def test_corrupted_pixels_masked_out_small_frames(static):
    """128² frames; garbage at independent places in each image, or at the same (static defect) places."""
    rng = np.random.default_rng(5)
    reference = _pair((0, 0), seed=5)[0]
    shifts = rng.uniform(-6, 6, size=(8, 2))
    found = []
    for d in shifts:
        moving = _pair(d, seed=5)[1]
        mov_bad, mov_valid = _corrupt(moving, 0.25, rng)
        ref_bad, ref_valid = _corrupt(reference, 0.25, rng, where=~mov_valid if static else None)
        found.append(register(ref_bad, mov_bad, reference_mask=ref_valid, moving_mask=mov_valid).shift)
    assert rms_error(found, -shifts) <= MASKED_RMS


def test_only_moving_image_corrupted():
    """A clean reference (e.g. an averaged one) and a frame with 25% garbage pixels and its own mask."""
    rng = np.random.default_rng(8)
    reference = _pair((0, 0))[0]
    shifts = rng.uniform(-6, 6, size=(8, 2))
    found = []
    for d in shifts:
        mov_bad, mov_valid = _corrupt(_pair(d)[1], 0.25, rng)
        found.append(register(reference, mov_bad, moving_mask=mov_valid).shift)
    assert rms_error(found, -shifts) <= MASKED_RMS


def test_static_beam_block_mask():
    """A static disk + rod holding the same garbage in both images: masked, it does not pull the shift to 0."""
    rng = np.random.default_rng(13)
    block = _beam_block((128, 128))
    garbage = rng.uniform(0, 3, size=block.shape)
    reference = np.where(block, garbage, _pair((0, 0))[0])
    shifts = rng.uniform(-6, 6, size=(8, 2))
    masked, unmasked = [], []
    for d in shifts:
        moving = np.where(block, garbage, _pair(d)[1])
        masked.append(register(reference, moving, reference_mask=~block).shift)
        unmasked.append(register(reference, moving).shift)
    masked_rms = rms_error(masked, -shifts)
    assert masked_rms <= NOISELESS_RMS
    assert rms_error(unmasked, -shifts) > max(1.0, 20 * masked_rms)


def test_pedestal_float32_as_accurate_as_float64():
    """uint16 frames: a 30000 pedestal and a 40-count modulation (Σf² − (Σf)²/n cancels catastrophically)."""
    rng = np.random.default_rng(17)
    big = _big(2)
    big = (big - big.min()) / np.ptp(big)

    def frame(d):
        return np.round(30000 + 40 * shifted_crop(big, d, 128)).astype(np.uint16)

    reference = frame((0, 0))
    shifts = rng.uniform(-6, 6, size=(8, 2))
    moving = [frame(d) for d in shifts]
    found = {dtype: np.array([register(reference, m, dtype=dtype).shift for m in moving])
             for dtype in (np.float32, np.float64)}
    assert rms_error(found[np.float64], -shifts) <= MASKED_RMS
    assert rms_error(found[np.float32], -shifts) <= MASKED_RMS
    np.testing.assert_allclose(found[np.float32], found[np.float64], atol=0.005)


def test_volumes_subpixel_3d():
    big = smooth_field((96, 96, 96), seed=3)
    reference = shifted_crop(big, (0, 0, 0), 48)
    rng = np.random.default_rng(3)
    for d in rng.uniform(-4, 4, size=(3, 3)):
        result = register(reference, shifted_crop(big, d, 48), max_shift=6)
        assert result.shift.shape == (3,) and result.sigma.shape == (3,)
        np.testing.assert_allclose(result.shift, -d, atol=0.05)
    d = np.array([2.0, -3.0, 1.0])
    integer = register(reference, shifted_crop(big, d, 48), max_shift=6, upsample_factor=1)
    np.testing.assert_array_equal(integer.shift, -d)


@settings(max_examples=25, deadline=None)
@given(
    dy=st.floats(-7.5, 7.5, allow_nan=False),
    dx=st.floats(-7.5, 7.5, allow_nan=False),
)
def test_property_recovers_any_shift_within_max_shift(dy, dx):
    reference, moving = _pair((dy, dx))
    result = register(reference, moving, max_shift=8)
    np.testing.assert_allclose(result.shift, [-dy, -dx], atol=0.05)


# ---------------------------------------------------------------------------------- agreement with skimage
def _skimage_cases():
    rng = np.random.default_rng(31)
    block = _beam_block((128, 128))
    cases = []
    for i, d in enumerate([(3, -5), (-6, 2), (2.2, 4.8), (-4.7, -1.3), (0.4, 7.1)]):
        reference, moving = _pair(d, seed=7)
        if i % 3 == 0:  # static beam-block with the same garbage in both
            garbage = rng.uniform(0, 3, size=block.shape)
            reference, moving = np.where(block, garbage, reference), np.where(block, garbage, moving)
            ref_mask = mov_mask = ~block
        else:  # independent scattered bad pixels
            reference, ref_mask = _corrupt(reference, 0.2, rng)
            moving, mov_mask = _corrupt(moving, 0.2, rng)
        cases.append((reference, moving, ref_mask, mov_mask))
    return cases


@pytest.mark.parametrize("case", range(5))
def test_integer_peak_agrees_with_skimage_masked(case):
    registration = pytest.importorskip("skimage.registration")
    reference, moving, ref_mask, mov_mask = _skimage_cases()[case]
    expected = registration.phase_cross_correlation(reference, moving, reference_mask=ref_mask,
                                                    moving_mask=mov_mask)
    expected = expected[0] if isinstance(expected, tuple) else expected
    result = register(reference, moving, reference_mask=ref_mask, moving_mask=mov_mask, upsample_factor=1,
                      max_shift=16)
    np.testing.assert_array_equal(result.shift, expected)


# --------------------------------------------------------------------------------------------------- phase
def test_phase_method_on_white_content():
    """Phase correlation on unmasked data with a flat spectrum (content that whitening does not distort)."""
    rng = np.random.default_rng(41)
    big = rng.random((192, 192))
    reference = big[32:160, 32:160]
    for d in [(3, -5), (-7, 2), (6, 6)]:
        moving = np.roll(big, d, axis=(0, 1))[32:160, 32:160]
        result = register(reference, moving, method="phase")
        np.testing.assert_allclose(result.shift, -np.asarray(d, float), atol=0.05)
        assert np.all(np.isnan(result.sigma))  # the NCC uncertainty model does not apply


def test_phase_method_on_synthetic_frames():
    run = make_run(8, (128, 128), seed=2, **CLEAN)
    frames = run.stack()
    result = register(frames[0], frames, method="phase")
    np.testing.assert_allclose(result.shift, run.true_shifts(0), atol=0.1)


def test_phase_method_on_periodic_image():
    rng = np.random.default_rng(0)
    image = ndi.gaussian_filter(rng.random((128, 128)), 2, mode="wrap")
    for d in [(3, -5), (7, 2), (-6, -6)]:
        result = register(image, np.roll(image, d, axis=(0, 1)), method="phase")
        np.testing.assert_allclose(result.shift, -np.asarray(d, float), atol=0.05)


# --------------------------------------------------------------------------------------------------- batch
def _assert_same_results(batch, singles):
    for i, single in enumerate(singles):
        for name in RegistrationResult.__dataclass_fields__:
            np.testing.assert_allclose(getattr(batch, name)[i], getattr(single, name), atol=1e-9, rtol=0,
                                       err_msg=f"{name} of frame {i}")




@pytest.mark.parametrize(
    "defects", [pytest.param(False, id="beam-block"), pytest.param(True, id="hot-dead-pixels")]
)
def test_batch_equals_per_pair(defects):
    """Registering a block of uint16 frames at once gives exactly what registering each frame alone gives."""
    fraction = 2e-4 if defects else 0.0
    run = make_run(6, (128, 128), seed=12, n_beam_off=0, n_cosmic=0, hot_fraction=fraction,
                   dead_fraction=fraction)
    assert (run.hot_pixels | run.dead_pixels).any() == defects
    frames = run.stack()
    reference, mask = frames[0], run.mask
    plan = make_plan(reference, reference_mask=mask, max_shift=16)
    singles = [register(reference, frame, reference_mask=mask, max_shift=16) for frame in frames]
    _assert_same_results(register_frames(plan, frames), singles)
    _assert_same_results(register(reference, frames, reference_mask=mask, max_shift=16), singles)
    _assert_same_results(register_frames(plan, frames[::-1]), singles[::-1])
    assert rms_error(register_frames(plan, frames).shift, run.true_shifts(0)) < 0.1


def test_batch_equals_per_pair_float_frames():
    """Float frames (inexact float32 sums): the valid-pixel mean must not depend on the batch either."""
    rng = np.random.default_rng(51)
    shifts = rng.uniform(-8, 8, size=(5, 2))
    reference = _pair((0, 0))[0]
    frames = np.stack([_pair(d)[1] for d in shifts])
    plan = make_plan(reference, max_shift=12)
    singles = [register(reference, frame, max_shift=12) for frame in frames]
    _assert_same_results(register_frames(plan, frames), singles)


def test_result_shapes():
    reference, moving = _pair((1.5, -2.5))
    single = register(reference, moving)
    assert isinstance(single, RegistrationResult)
    assert single.shift.shape == (2,) and single.sigma.shape == (2,)
    assert np.ndim(single.ncc) == np.ndim(single.overlap) == np.ndim(single.second_peak) == 0
    batch = register(reference, np.stack([moving, moving, reference]))
    assert batch.shift.shape == (3, 2) and batch.sigma.shape == (3, 2)
    assert batch.ncc.shape == batch.overlap.shape == batch.second_peak.shape == (3,)
    empty = register_frames(make_plan(reference), np.zeros((0, 128, 128)))
    assert empty.shift.shape == (0, 2)


def test_top_level_api():
    assert driftcorr.register is register
    assert driftcorr.RegistrationResult is RegistrationResult
    assert issubclass(driftcorr.InputError, ValueError)


# ------------------------------------------------------------------------------------------------- quality
def test_quality_fields():
    rng = np.random.default_rng(61)
    reference, moving = _pair((2.3, -1.6))
    same = register(reference, reference)
    np.testing.assert_allclose(same.shift, [0, 0], atol=1e-3)
    assert abs(same.ncc - 1) < 1e-3
    assert same.overlap == pytest.approx(1.0)

    clean = register(reference, moving)
    noise = 0.5 * reference.std() * rng.standard_normal(moving.shape)
    noisy = register(reference, moving + noise)
    assert abs(clean.ncc - 1) < 1e-3
    assert noisy.ncc < clean.ncc - 0.05
    for result in (same, clean, noisy):
        assert np.isfinite(result.second_peak) and result.second_peak < 1
        assert 0 < result.overlap <= 1
        assert np.all(np.isfinite(result.sigma)) and np.all(result.sigma > 0)
    assert np.all(noisy.sigma > clean.sigma)  # more noise, less certain
    # The overlap at a shift of (2.3, -1.6) on a 128² frame is about (128 - 2)(128 - 2) / 128².
    assert 0.9 < clean.overlap < 1.0


def test_overlap_counts_valid_reference_pixels_only():
    reference, moving = _pair((3, -4))
    mask = ~_beam_block(reference.shape)
    result = register(reference, moving, reference_mask=mask)
    assert 0 < result.overlap <= 1
    np.testing.assert_allclose(result.shift, [-3, 4], atol=NOISELESS_RMS)


# -------------------------------------------------------------------------------------------------- dtypes
@pytest.mark.parametrize("dtype", [np.uint16, np.float32, np.float64, np.int32, np.uint8, np.int16])
def test_input_dtypes(dtype):
    big = _big(9)
    big = (big - big.min()) / np.ptp(big)
    scale = 200 if np.dtype(dtype).itemsize == 1 else 1000

    def frame(d):
        image = 20 + scale * shifted_crop(big, d, 128)  # the offset keeps Fourier ringing above 0
        return np.round(image).astype(dtype) if np.dtype(dtype).kind in "iu" else image.astype(dtype)

    d = np.array([2.6, -3.3])
    reference, moving = frame((0, 0)), frame(d)
    result = register(reference, moving)
    for name in RegistrationResult.__dataclass_fields__:
        assert np.asarray(getattr(result, name)).dtype == np.float64, name
    np.testing.assert_allclose(result.shift, -d, atol=0.05)
    plan = make_plan(reference)
    batch = register_frames(plan, moving[None])
    assert batch.shift.dtype == np.float64 and batch.ncc.dtype == np.float64


def test_inputs_are_not_modified():
    reference, moving = _pair((1.5, 2.5))
    ref_copy, mov_copy = reference.copy(), moving.copy()
    register(reference, moving, reference_mask=~_beam_block(reference.shape))
    np.testing.assert_array_equal(reference, ref_copy)
    np.testing.assert_array_equal(moving, mov_copy)


# -------------------------------------------------------------------------------------------------- errors
def test_max_shift_must_be_at_most_half_the_frame():
    reference, moving = _pair((1, 1), size=64)
    with pytest.raises(InputError, match="max_shift") as info:
        register(reference, moving, max_shift=33)
    assert isinstance(info.value, ValueError)
    assert "33" in str(info.value) and "at most 32" in str(info.value)
    with pytest.raises(ValueError, match="max_shift"):
        register(reference, moving, max_shift=100)
    with pytest.raises(InputError, match="max_shift"):
        register(reference, moving, max_shift=0)
    assert np.all(np.isfinite(register(reference, moving, max_shift=32).shift))


def test_all_false_mask_raises():
    reference, moving = _pair((1, 1), size=64)
    empty = np.zeros(reference.shape, bool)
    with pytest.raises(InputError, match="reference_mask"):
        register(reference, moving, reference_mask=empty)
    with pytest.raises(InputError, match="moving_mask"):
        register(reference, moving, moving_mask=empty)


def test_mask_of_wrong_shape_raises():
    reference, moving = _pair((1, 1), size=64)
    with pytest.raises(InputError, match="shape"):
        register(reference, moving, reference_mask=np.ones((32, 32), bool))


def test_mismatched_shapes_raise():
    reference, moving = _pair((1, 1), size=64)
    with pytest.raises(InputError, match="shape"):
        register(reference, moving[:60])
    with pytest.raises(InputError, match="shape"):
        register(reference, moving[:, :, None])
    with pytest.raises(InputError, match="shape"):
        register_frames(make_plan(reference), moving)  # a frame without its batch axis


def test_complex_input_raises():
    reference, moving = _pair((1, 1), size=64)
    with pytest.raises(InputError, match="real"):
        register(reference.astype(complex), moving)
    with pytest.raises(InputError, match="real"):
        register(reference, moving.astype(np.complex64))


def test_bad_options_raise():
    reference, moving = _pair((1, 1), size=64)
    with pytest.raises(InputError, match="method"):
        register(reference, moving, method="fourier")
    with pytest.raises(InputError, match="upsample_factor"):
        register(reference, moving, upsample_factor=0.5)
    with pytest.raises(InputError, match="min_overlap"):
        register(reference, moving, min_overlap=0)
    with pytest.raises(InputError, match="dtype"):
        register(reference, moving, dtype=np.int32)
    with pytest.raises(InputError):
        register(reference[0], moving[0])  # 1-D
    with pytest.raises(InputError, match="NaN"):
        register(np.where(reference > np.median(reference), np.nan, reference), moving)


def test_non_finite_moving_frame_gives_nan_not_garbage():
    reference, moving = _pair((1, 1), size=64)
    bad = moving.copy()
    bad[10, 10] = np.nan
    result = register(reference, np.stack([moving, bad]))
    assert np.all(np.isfinite(result.shift[0]))
    assert np.all(np.isnan(result.shift[1])) and np.isnan(result.ncc[1])


def test_fft_helper_is_consistent():
    """Guard for the test images themselves: the shifted crop is the analytic shift (registers as -d)."""
    big = _big(0)
    d = (2.0, -3.0)
    crop = shifted_crop(big, d, 128)
    np.testing.assert_allclose(crop, np.roll(big, d, axis=(0, 1))[64:192, 64:192], atol=1e-12)
    np.testing.assert_allclose(ndi.shift(crop, (-2, 3), order=1)[8:-8, 8:-8], big[64:192, 64:192][8:-8, 8:-8],
                               atol=1e-12)


def test_diffraction_frames_512_subpixel_accuracy():
    """Issue 3's acceptance case: 512² diffraction frames with a full valid-pixel mask, RMS error ≤ 0.02 px.

    Through ``register`` (one batch) and through ``estimate_drift(stack, mask=..., reference=0)``. Cosmic-ray
    frames are issue 4's (frame-local outliers); beam-off frames carry no pattern and are excluded.
    """
    import dask

    from driftcorr import estimate_drift

    run = make_run(16, (512, 512), seed=31, n_beam_off=1, n_cosmic=0)
    frames = run.stack()
    truth = run.true_shifts(0)
    good = ~run.beam_off
    good[0] = False  # the reference itself
    direct = register(frames[0], frames, reference_mask=run.mask)
    assert np.sqrt(np.mean(np.sum((direct.shift[good] - truth[good]) ** 2, axis=1))) <= 0.02
    with dask.config.set(scheduler="synchronous"):
        ds = estimate_drift(frames, mask=run.mask, reference=0)
    errors = ds["shift"].values[good] - truth[good]
    assert np.sqrt(np.mean(np.sum(errors**2, axis=1))) <= 0.02
    assert not ds["valid"].values[run.beam_off].any()
