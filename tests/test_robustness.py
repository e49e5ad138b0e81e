"""Robustness kernels: static defects, lit frames, frame-local outliers, trajectory flags, built references.

Every test is seeded and runs on small synthetic frames (64² to 128², a few tens of frames at most) with known
truth from :mod:`driftcorr.synthetic`.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage as ndi

from driftcorr import register
from driftcorr.defects import DEFECT_CODES, detect_defects, find_outliers, intensity_levels, lit_frames
from driftcorr.errors import InputError
from driftcorr.reference import (
    align_and_average,
    iterative_reference,
    pairs_reference,
    parse_reference,
    solve_positions,
)
from driftcorr.registration import make_plan, register_frames
from driftcorr.synthetic import make_run
from driftcorr.trajectory import fill_invalid, flag_frames, trajectory_outliers

GOOD, MASKED, HOT, DEAD, STUCK, UNLIT = (DEFECT_CODES[name] for name in
                                         ("good", "masked", "hot", "dead", "stuck", "unlit"))
SHAPE = (128, 128)
HOT_VALUE = 60000.0


# --------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def defect_run():
    """24 frames of 128² with 5x the default hot/dead fractions (16 of each) and two beam-off frames."""
    return make_run(24, SHAPE, seed=3, hot_fraction=1e-3, dead_fraction=1e-3, n_beam_off=2)


@pytest.fixture(scope="module")
def defect_stack(defect_run):
    stack = defect_run.stack().astype(np.float64)
    stack.setflags(write=False)
    return stack


@pytest.fixture(scope="module")
def pattern_run():
    """A clean 12-frame run (no beam-off, no cosmic ray) for the outlier tests."""
    return make_run(12, SHAPE, seed=2, n_cosmic=0, n_beam_off=0)


@pytest.fixture(scope="module")
def pattern_stack(pattern_run):
    stack = pattern_run.stack().astype(np.float64)
    stack.setflags(write=False)
    return stack


def _lit_pixels_outside(run, rows_cols):
    """Check the inserted defects sit on lit, otherwise healthy pixels (the test would be vacuous if not)."""
    for r, c in rows_cols:
        assert run.beam_block[r, c] and not run.hot_pixels[r, c] and not run.dead_pixels[r, c]


# ------------------------------------------------------------------------------------------ detect_defects
def test_detect_defects_finds_hot_and_dead_pixels_with_mask(defect_run, defect_stack):
    dm = detect_defects(defect_stack, defect_run.beam_block)
    codes = dm.codes
    assert codes.dtype == np.uint8 and codes.shape == SHAPE
    hot = defect_run.hot_pixels & defect_run.beam_block
    dead = defect_run.dead_pixels & defect_run.beam_block
    assert hot.sum() >= 10 and dead.sum() >= 10  # enough truth for the test to mean something
    assert np.all(codes[hot] == HOT)
    assert np.all(codes[dead] == DEAD)
    # The user's mask is trusted: covered pixels are coded 1, except hot pixels under it, coded 2 (so the
    # outlier search can leave them out).
    covered = ~defect_run.beam_block
    hot_covered = defect_run.hot_pixels & covered
    assert np.all(codes[covered & ~hot_covered] == MASKED)
    assert np.all(codes[hot_covered] == HOT)
    assert dm.counts()["masked"] == int((covered & ~hot_covered).sum())
    # A handful of false positives is tolerated: with this seed 2 lit pixels on the rim of the masked beam-block
    # (see test_detect_defects_mask_border_not_hot); anything more means the thresholds are broken.
    false = (codes != GOOD) & (codes != MASKED) & ~hot & ~dead & ~hot_covered
    assert false.sum() <= 3
    # With a mask nothing is searched for unlit regions.
    assert dm.counts()["unlit"] == 0
    assert np.array_equal(dm.mask, codes == GOOD)
    assert dm.n_frames == defect_run.n_frames - int(defect_run.beam_off.sum())


def test_detect_defects_mask_border_not_hot(defect_run, defect_stack):
    codes = detect_defects(defect_stack, defect_run.beam_block).codes
    healthy = defect_run.beam_block & ~defect_run.hot_pixels & ~defect_run.dead_pixels
    rim = healthy & ndi.binary_dilation(~defect_run.beam_block, structure=np.ones((3, 3), bool))
    assert rim.sum() > 50
    assert np.count_nonzero(codes[rim] == HOT) == 0


def test_detect_defects_adjacent_and_edge_hot_pixels(defect_run, defect_stack):
    # An adjacent pair, the top edge, and a pair in a corner (there the edge mode matters: "reflect" would count
    # the corner pixel and its hot neighbour 5 times among its 8 neighbours; "mirror" counts them twice).
    inserted = [(30, 100), (30, 101), (0, 50), (127, 0), (127, 1)]
    _lit_pixels_outside(defect_run, inserted)
    stack = defect_stack.copy()
    for r, c in inserted:
        stack[:, r, c] = HOT_VALUE
    codes = detect_defects(stack, defect_run.beam_block).codes
    for r, c in inserted:
        assert codes[r, c] == HOT, (r, c)
    # The pair's neighbours are not dragged along (the median of 8 neighbours ignores one hot neighbour).
    assert codes[29, 100] == GOOD and codes[31, 101] == GOOD and codes[1, 50] == GOOD


def test_detect_defects_without_mask_codes_beam_block_unlit(defect_run, defect_stack):
    dm = detect_defects(defect_stack)
    codes = dm.codes
    covered = ~defect_run.beam_block
    assert dm.counts()["masked"] == 0
    # The covered region is excluded entirely and mostly coded unlit; a few pixels of its rim, whose neighbours
    # are mostly lit, may be coded dead instead (and its own hot/dead pixels keep their codes): at least 90%.
    assert np.count_nonzero(codes[covered] == GOOD) == 0
    assert np.mean(codes[covered] == UNLIT) >= 0.9
    # Detector defects in the lit area are still found.
    assert np.all(codes[defect_run.hot_pixels & defect_run.beam_block] == HOT)
    assert np.all(codes[defect_run.dead_pixels & defect_run.beam_block] == DEAD)
    # find_unlit=False switches the search off.
    assert detect_defects(defect_stack, find_unlit=False).counts()["unlit"] == 0


def test_detect_defects_ignores_dark_and_nan_frames(defect_run, defect_stack):
    assert defect_run.beam_off.sum() == 2
    nan_frame = np.full((1, *SHAPE), np.nan)
    blank_frame = np.zeros((1, *SHAPE))
    sample = np.concatenate([defect_stack[:5], nan_frame, defect_stack[5:], blank_frame])
    n_lit = defect_run.n_frames - 2
    dm = detect_defects(sample, defect_run.beam_block)
    assert dm.n_frames == n_lit
    # The statistics are those of the lit frames alone: identical codes, so no defect comes from a dark frame.
    lit_only = detect_defects(defect_stack[~defect_run.beam_off], defect_run.beam_block)
    assert lit_only.n_frames == n_lit
    assert np.array_equal(dm.codes, lit_only.codes)
    assert np.array_equal(dm.codes, detect_defects(defect_stack, defect_run.beam_block).codes)


def test_detect_defects_too_few_lit_frames_returns_user_mask(defect_run, defect_stack):
    sample = np.concatenate([defect_stack[:1], np.full((3, *SHAPE), np.nan)])
    dm = detect_defects(sample, defect_run.beam_block)
    assert dm.n_frames == 1
    assert np.array_equal(dm.codes, np.where(defect_run.beam_block, GOOD, MASKED))


STUCK_PIXELS = [(30, 90), (100, 20)]  # one on a ring, one in the dim outer region


def _with_stuck_pixels(run, stack):
    """Freeze STUCK_PIXELS at their median lit value: constant, but neither hot nor dead for their neighbours."""
    _lit_pixels_outside(run, STUCK_PIXELS)
    stack = stack.copy()
    for r, c in STUCK_PIXELS:
        stack[:, r, c] = np.round(np.median(stack[~run.beam_off, r, c]))
    return stack


def test_detect_defects_finds_stuck_pixels_with_steady_dark_level(defect_run, defect_stack):
    # A detector with a steady dark level: the covered beam-block (3% of the frame, more than the 1% that sets
    # the dark percentile) reads exactly the pedestal in every frame.
    stack = _with_stuck_pixels(defect_run, defect_stack)
    stack[:, ~defect_run.beam_block] = defect_run.pedestal
    stuck = STUCK_PIXELS
    dm = detect_defects(stack, defect_run.beam_block)
    for r, c in stuck:
        assert dm.codes[r, c] == STUCK, (r, c)
    assert dm.counts()["stuck"] == len(stuck)
    # Hot pixels read a constant too but stay hot.
    assert np.all(dm.codes[defect_run.hot_pixels & defect_run.beam_block] == HOT)


def test_detect_defects_finds_stuck_pixels_in_realistic_frames(defect_run, defect_stack):
    lit, dark, _ = lit_frames(defect_stack)
    assert np.ptp(dark[lit]) > 0  # the realistic case: the dark level fluctuates
    stack = _with_stuck_pixels(defect_run, defect_stack)
    codes = detect_defects(stack, defect_run.beam_block).codes
    assert [int(codes[r, c]) for r, c in STUCK_PIXELS] == [STUCK, STUCK]


# ---------------------------------------------------------------------------------------------- lit_frames
def test_lit_frames_excludes_dark_nan_and_blank_frames(defect_run, defect_stack):
    sample = defect_stack[:8].copy()
    beam_off = np.flatnonzero(defect_run.beam_off)
    sample[2] = defect_stack[beam_off[0]]  # a real beam-off frame: pedestal, read noise and hot pixels
    sample[4] = np.nan
    sample[5, 10, 10] = np.inf  # one non-finite pixel is enough
    sample[6] = defect_run.pedestal  # blank
    lit, dark, signal = lit_frames(sample)
    expected = np.ones(8, bool)
    expected[[2, 4, 5, 6]] = False
    expected[defect_run.beam_off[:8]] = False
    assert np.array_equal(lit, expected)
    assert np.isnan(dark[4]) and np.isnan(signal[4]) and np.isnan(dark[5])
    assert signal[6] == 0
    # Lit frames' signal is of the order of the pattern's counts (~2000), a dark frame's of its read noise.
    assert np.all(signal[lit] > 500) and signal[2] < 50


def test_lit_frames_all_lit_and_all_nan():
    rng = np.random.default_rng(0)
    # A smooth pattern well above its noise is lit; the same amount of white noise alone is not (it looks dark).
    yy, xx = np.mgrid[:16, :16]
    pattern = 1000.0 * np.exp(-((yy - 8.0) ** 2 + (xx - 8.0) ** 2) / 20.0)
    lit, _, _ = lit_frames(pattern + rng.normal(0, 5, (4, 16, 16)))
    assert lit.all()
    lit, _, _ = lit_frames(rng.uniform(0, 1000, (4, 16, 16)))
    assert not lit.any()
    lit, dark, _ = lit_frames(np.full((3, 16, 16), np.nan))
    assert not lit.any() and np.isnan(dark).all()


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16, np.int32, np.float32])
@pytest.mark.parametrize("shape", [(1, 7), (2, 2), (5, 9), (64, 48)])
def test_neighbour_median_is_scipys_rank_filter(dtype, shape):
    """The sorting network on integer frames gives exactly the rank filter's values (ties, edges, tiny frames)."""
    from driftcorr.defects import neighbour_median

    rng = np.random.default_rng(shape[0] * 100 + shape[1])
    frame = rng.integers(0, 6 if shape[0] > 8 else 200, shape).astype(dtype)  # many ties in the large frame
    footprint = np.ones((3, 3), bool)
    footprint[1, 1] = False
    expected = ndi.rank_filter(frame.astype(np.float64), rank=4, footprint=footprint, mode="mirror")
    found = neighbour_median(frame)
    assert found.dtype == np.float64
    np.testing.assert_array_equal(found, expected)


# --------------------------------------------------------------------------------- outliers and levels
def test_find_outliers_finds_and_grows_a_streak(pattern_run, pattern_stack):
    mask = pattern_run.mask
    levels = intensity_levels(pattern_stack[0], mask)
    frames = pattern_stack[3:5].copy()
    # A 1-px streak of 20000 counts (cosmic rays peak at 15000-40000) along row 20, far from the beam-block.
    frames[0, 20, 10:111] += 20000.0
    outliers = find_outliers(frames, mask, levels)
    assert outliers.shape == frames.shape and outliers.dtype == bool
    # Grown by OUTLIER_GROWTH = 3 px with the full 3x3 structure: exactly the Chebyshev 3-px box around the
    # streak, restricted to the examined pixels.
    expected = np.zeros(SHAPE, bool)
    expected[17:24, 7:114] = True
    assert np.array_equal(outliers[0], expected & mask)
    assert not outliers[1].any()
    # growth=0: only the streak itself.
    bare = find_outliers(frames, mask, levels, growth=0)
    expected = np.zeros(SHAPE, bool)
    expected[20, 10:111] = True
    assert np.array_equal(bare[0], expected & mask)


def test_find_outliers_the_same_on_integer_frames_and_their_float_copy():
    """Integer frames take an exact integer path to their mean level; it must agree with the float path."""
    run = make_run(8, (96, 96), seed=6, n_cosmic=3, n_beam_off=0)
    counts = run.stack()
    assert counts.dtype == np.uint16
    levels = intensity_levels(counts[0].astype(np.float64), run.mask)
    for mask in (run.mask, ~run.mask | run.beam_block):  # few pixels left out, then most
        found = find_outliers(counts, mask, levels)
        assert np.array_equal(found, find_outliers(counts.astype(np.float64), mask, levels))
    assert find_outliers(counts, run.mask, levels).reshape(8, -1).any(axis=1).sum() >= 1


def test_find_outliers_finds_synthetic_cosmic_rays():
    run = make_run(16, (96, 96), seed=5, n_cosmic=3, n_beam_off=0)
    stack = run.stack().astype(np.float64)
    streak_only = (make_run(16, (96, 96), seed=5, n_cosmic=3, n_beam_off=0, noise=False).stack().astype(float)
                   - make_run(16, (96, 96), seed=5, n_cosmic=0, n_beam_off=0, noise=False).stack())
    reference = int(np.flatnonzero(~run.cosmic)[0])
    outliers = find_outliers(stack, run.mask, intensity_levels(stack[reference], run.mask))
    for t in range(run.n_frames):
        # The streak's pixels above 5000 counts are far above 3x the pattern's peak (~2000 counts).
        bright = (streak_only[t] > 5000) & run.mask
        assert bright.any() == run.cosmic[t]
        assert np.all(outliers[t][bright])
        assert outliers[t].any() == run.cosmic[t]


@pytest.mark.parametrize("current", [0.7, 1.3, 3.0])
def test_find_outliers_follows_beam_current(pattern_run, pattern_stack, current):
    # Scaling the signal (not the pedestal) by the beam current scales the ceiling with it; at 3.0 every frame's
    # brightest pixels exceed the unscaled ceiling floor + 3 (peak - floor), so this needs the scaling.
    mask = pattern_run.mask
    levels = intensity_levels(pattern_stack[0], mask)
    frames = pattern_run.pedestal + current * (pattern_stack - pattern_run.pedestal)
    assert not find_outliers(frames, mask, levels).any()
    assert not find_outliers(pattern_stack, mask, levels).any()


def test_intensity_levels_peak_ignores_isolated_hot_pixel(pattern_run, pattern_stack):
    mask = pattern_run.mask
    image = pattern_stack[0].copy()
    clean = intensity_levels(image, mask)
    r, c = 10, 10  # dim outer corner, a lit valid pixel
    assert mask[r, c] and image[r, c] < 500
    image[r, c] = HOT_VALUE
    hot = intensity_levels(image, mask)
    # The 3-px median filter removes a single pixel entirely: the peak does not move at all.
    assert hot.peak == clean.peak
    assert clean.peak < 0.2 * HOT_VALUE
    # The mean does see it (it is an honest mean of the valid pixels).
    assert hot.mean > clean.mean
    nothing = intensity_levels(image, np.zeros(SHAPE, bool))
    assert np.isnan(nothing.peak) and np.isnan(nothing.mean)


def test_find_outliers_without_levels_returns_nothing(pattern_run, pattern_stack):
    levels = intensity_levels(pattern_stack[0], np.zeros(SHAPE, bool))  # NaN levels
    assert not find_outliers(pattern_stack[:2] + 1e5, pattern_run.mask, levels).any()


# -------------------------------------------------------------------------------------------- trajectory
def _smooth_trajectory(n: int = 30) -> np.ndarray:
    """Slow smooth drift (a few px over the run, at most ~0.4 px per frame)."""
    t = np.arange(n, dtype=np.float64)
    return np.column_stack([0.1 * t + 2.0 * np.sin(t / 5.0), -0.05 * t + 1.5 * np.cos(t / 7.0)])


def test_trajectory_outlier_single_displaced_frame():
    shift = _smooth_trajectory()
    shift[12, 0] += 2.0
    ncc = np.full(len(shift), 0.9)
    assert np.flatnonzero(trajectory_outliers(shift, np.ones(len(shift), bool))).tolist() == [12]
    assert np.flatnonzero(~flag_frames(shift, ncc)).tolist() == [12]
    # The smooth trajectory itself has no outlier.
    assert flag_frames(_smooth_trajectory(), ncc).all()


def test_trajectory_step_is_not_an_outlier():
    # A sudden re-steer jump that persists is followed from the frames after it.
    shift = _smooth_trajectory()
    shift[15:] += np.array([6.0, -8.0])  # 10 px
    ncc = np.full(len(shift), 0.9)
    assert not trajectory_outliers(shift, np.ones(len(shift), bool)).any()
    assert flag_frames(shift, ncc).all()


def test_trajectory_outliers_ignores_untrusted_frames_and_short_runs():
    shift = _smooth_trajectory()
    shift[12] = [40.0, -40.0]
    valid = np.ones(len(shift), bool)
    valid[12] = False
    assert not trajectory_outliers(shift, valid).any()  # frame 12 is left out of the predictions
    assert not trajectory_outliers(shift[:4] + [[0, 0], [0, 0], [5, 5], [0, 0]], np.ones(4, bool)).any()


def test_flag_frames_edge_of_search_window():
    # A linear ramp of the column shift from 0 to 9.67 px: no trajectory outlier, only the window edge matters.
    n = 30
    shift = np.column_stack([np.zeros(n), np.arange(n) / 3.0])
    ncc = np.full(n, 0.9)
    assert flag_frames(shift, ncc).all()
    valid = flag_frames(shift, ncc, max_shift=(8, 8))
    assert np.array_equal(valid, shift[:, 1] < 7.5)
    # Negative shifts and the other axis too; 7.4 px is inside the window, 7.5 px is on its edge.
    shift = np.zeros((8, 2))
    shift[2] = [-7.5, 0.0]
    shift[5] = [0.0, -7.4]
    shift[6] = [7.4, 0.0]
    valid = flag_frames(shift, np.full(8, 0.9), max_shift=(8, 8), outlier_px=100.0)
    assert np.flatnonzero(~valid).tolist() == [2]
    # Per-axis window.
    shift = np.zeros((8, 2))
    shift[3] = [3.6, 3.6]
    valid = flag_frames(shift, np.full(8, 0.9), max_shift=(4, 16), outlier_px=100.0)
    assert np.flatnonzero(~valid).tolist() == [3]


def test_flag_frames_nan_and_low_ncc():
    shift = _smooth_trajectory()
    ncc = np.full(len(shift), 0.9)
    shift[4] = np.nan
    shift[8, 1] = np.nan
    ncc[20] = 0.05  # below min_ncc
    ncc[24] = 0.4  # below relative_ncc * median = 0.45
    ncc[26] = 0.6  # fine
    ncc[16] = np.nan
    valid = flag_frames(shift, ncc)
    assert np.flatnonzero(~valid).tolist() == [4, 8, 16, 20, 24]
    # An all-NaN run trusts nothing (and does not fail).
    assert not flag_frames(np.full((5, 2), np.nan), np.full(5, np.nan)).any()


@pytest.mark.parametrize("untrusted", [[28], [1], [10, 12]])
def test_trajectory_outliers_linear_drift_across_gaps(untrusted):
    n = 30
    shift = np.column_stack([0.5 * np.arange(n), -0.2 * np.arange(n)])
    shift[untrusted] = np.nan
    valid = flag_frames(shift, np.full(n, 0.9))
    assert np.flatnonzero(~valid).tolist() == untrusted


def test_fill_invalid_interpolates_between_trusted_frames():
    shift = np.array([[9.0, 9.0], [1.0, 2.0], [np.nan, np.nan], [3.0, 6.0], [9.0, 9.0]])
    valid = np.array([False, True, False, True, False])
    filled = fill_invalid(shift, valid)
    np.testing.assert_allclose(filled, [[1, 2], [1, 2], [2, 4], [3, 6], [3, 6]])
    assert np.isnan(fill_invalid(shift, np.zeros(5, bool))).all()


# ------------------------------------------------------------------------------------------- references
def test_parse_reference_iterative():
    spec = parse_reference("iterative", 50)
    assert (spec.kind, spec.start, spec.stop) == ("iterative", 0, 50)
    spec = parse_reference("iterative:5:20", 50)
    assert (spec.kind, spec.start, spec.stop) == ("iterative", 5, 20)
    assert spec.frames == range(5, 20) and str(spec) == "iterative:5:20"
    spec = parse_reference(" iterative:-10:100 ", 50)
    assert (spec.kind, spec.start, spec.stop) == ("iterative", 40, 50)


def test_parse_reference_pairs():
    assert (parse_reference("pairs", 50).kind, parse_reference("pairs", 50).stop) == ("pairs", 50)
    spec = parse_reference("pairs:5:20", 50)
    assert (spec.kind, spec.start, spec.stop, str(spec)) == ("pairs", 5, 20, "pairs:5:20")


@pytest.mark.parametrize("value", ["iterative:x", "iterative:1", "iterative:1:x", "iterative:1:2:3", "iterativ",
                                   "iterative:30:10", "iterative:60:70", "pairs:3", "pair", "pairs:9:9"])
def test_parse_reference_iterative_malformed(value):
    with pytest.raises(InputError):
        parse_reference(value, 50)


def test_align_and_average_matches_intensity_and_moves_the_mask():
    rng = np.random.default_rng(11)
    template = ndi.gaussian_filter(rng.random((64, 64)), 3)  # smooth: cubic-spline shifts are accurate
    template = 100.0 + 1000.0 * (template - template.min()) / np.ptp(template)
    shifts = np.array([(0.0, 0.0), (1.5, -2.25), (-3.0, 0.5), (2.0, 2.0)])
    gains, offsets = np.array([1.0, 0.5, 2.0, 1.3]), np.array([0.0, 10.0, -5.0, 40.0])
    # Frame i is the template moved by -shift[i] with its own beam current (gain) and dark level (offset).
    frames = np.stack([a * ndi.shift(template, -s, order=3, mode="nearest") + b
                       for s, a, b in zip(shifts, gains, offsets, strict=True)])
    mask = np.ones((64, 64), bool)
    mask[20:30, 20:30] = False  # static on the detector: in template coordinates it moves with each frame
    image, valid = align_and_average(frames, shifts, mask, template, np.ones((64, 64), bool))
    # Every frame is matched to the template: the average is the template, not mean(gain) * template + ...
    # 10 counts = 1% of its range; the spline shift there and back leaves < 0.5% (near the mask and edges).
    assert valid.sum() > 0.9 * valid.size
    np.testing.assert_allclose(image[valid], template[valid], atol=10.0)
    # Where no frame saw the pattern (the blocks of all four frames overlap) the average is invalid and 0.
    assert not valid[22:28, 22:28].any() and np.all(image[~valid] == 0)


def _residual_std(image: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> float:
    """Std of ``image - (a * truth + b)`` over ``mask`` after a least-squares gain/offset fit."""
    gain, offset = np.polyfit(truth[mask], image[mask], 1)
    return float(np.std(image[mask] - (gain * truth[mask] + offset)))


@pytest.mark.parametrize("n_cosmic", [
    0,
    1,
])
def test_iterative_reference_anchors_on_first_lit_frame_and_averages_noise(n_cosmic):
    # No ring modulation: the average of the frames then equals frame 1's pattern up to gain and offset, so its
    # residual to the noiseless rendering is noise (and interpolation error) only.
    kwargs = dict(n_frames=16, shape=SHAPE, seed=0, ring_modulation=0.0, n_cosmic=n_cosmic)
    run = make_run(**kwargs)
    sample = run.stack().astype(np.float64)
    sample[0] = run.pedestal  # a dark first frame
    built = iterative_reference(sample, run.mask)
    assert built.anchor == 1
    n_lit = run.n_frames - 1 - int(run.beam_off.sum())
    assert built.n_frames == n_lit
    assert built.image.shape == SHAPE and built.mask.sum() > 0.8 * run.mask.sum()
    assert np.all(built.image[~built.mask] == 0)
    # The reference lies in the anchor's coordinates: registering the anchor onto it gives ~0. 0.05 px is ~10x
    # the registration error of this noise level (a few thousandths of a px) and well below any real offset.
    result = register(built.image, sample[1], reference_mask=built.mask, moving_mask=run.mask)
    assert np.all(np.abs(result.shift) < 0.05), result.shift
    # Averaging n_lit ~ 14 frames divides the noise by ~sqrt(14) ~ 3.7; half the single frame's residual leaves
    # room for the cubic-spline interpolation error of the shifts.
    truth = make_run(**kwargs, noise=False).frames(1, 2)[0].astype(np.float64)
    common = built.mask & run.mask
    single = _residual_std(sample[1], truth, common)
    average = _residual_std(built.image, truth, common)
    assert average < 0.5 * single, (average, single)


def test_iterative_reference_all_lit_sample_anchors_on_frame_zero():
    run = make_run(8, (64, 64), seed=7, n_beam_off=0, n_cosmic=0, jump_px=None)
    sample = run.stack().astype(np.float64)
    built = iterative_reference(sample, run.mask, iterations=1)
    assert built.anchor == 0 and built.n_frames == 8
    result = register(built.image, sample[0], reference_mask=built.mask, moving_mask=run.mask)
    assert np.all(np.abs(result.shift) < 0.05), result.shift


@pytest.mark.parametrize("kind", [
    "blank",
    "nan",
    "beam_off",
])
def test_iterative_reference_all_dark_sample_raises(kind):
    run = make_run(12, (64, 64), seed=4, n_beam_off=10, n_cosmic=0, jump_px=None)
    if kind == "blank":
        sample = np.full((4, 64, 64), run.pedestal)
    elif kind == "nan":
        sample = np.full((4, 64, 64), np.nan)
    else:
        sample = run.stack()[run.beam_off].astype(np.float64)
        assert len(sample) == 10
    with pytest.raises(InputError, match="saw the beam"):
        iterative_reference(sample, run.mask)


def test_streak_inside_the_beam_block_leaves_no_tails_outside():
    """A streak whose core lies under a masked region still has its tails outside that region left out.

    Regression: cores were only looked for on valid pixels, so a streak ending under the beam-block left its tails
    (below the ceiling, but hundreds of counts) next to the block: a 0.2 px error on a low-count run.
    """
    run = make_run(6, (128, 128), seed=3, counts=200, n_cosmic=0, n_beam_off=0, hot_fraction=0, dead_fraction=0)
    frames = run.stack().astype(np.float64)
    mask = run.mask.copy()
    mask[10:118, 60:70] = False  # a masked bar holding the streak's core
    cols = np.arange(128)[None, :]
    streak = 16000.0 * np.exp(-0.5 * ((cols - 66.5) / 1.5) ** 2) * ((np.arange(128)[:, None] > 20)
                                                                    & (np.arange(128)[:, None] < 100))
    streaked = frames[3] + streak
    plan = make_plan(frames[0], reference_mask=mask)
    examined = np.ones(mask.shape, bool)  # no isolated defects here: every pixel is examined
    outliers = find_outliers(streaked[None], examined, plan.levels)[0]
    tails = (streak > 20) & mask
    assert tails.any() and np.all(outliers[tails])
    clean = register_frames(plan, frames[3:4])
    hit = register_frames(plan, streaked[None])
    # Losing two columns next to the bar moves the estimate by a few thousandths of a px; tails left in moved it
    # by tenths.
    np.testing.assert_allclose(hit.shift, clean.shift, atol=0.01)


@pytest.mark.parametrize("scales", [(1.0, None), (1.0, 12.0)])
def test_bandpass_keeps_filled_values_at_isolated_defects(scales):
    """Regression: the band-passed frames were zeroed at the isolated defects that the normalized convolution had
    filled. With a low-pass only (pedestal kept) that made a static dip at every hot/dead pixel, pulling every
    frame towards zero shift (0.75 px RMS on a 20-count run of 256²)."""
    run = make_run(24, (128, 128), seed=7, counts=200, n_cosmic=0, hot_fraction=2e-3, dead_fraction=2e-3)
    reference = make_run(24, (128, 128), seed=7, counts=200, n_cosmic=0, hot_fraction=2e-3, dead_fraction=2e-3,
                         noise=False).frames(0, 1)[0]
    plan = make_plan(reference, reference_mask=run.mask, bandpass=scales)
    frames = run.stack()[1:]
    result = register_frames(plan, frames)
    good = ~run.beam_off[1:]
    error = np.linalg.norm(result.shift - run.true_shifts(0)[1:], axis=1)[good]
    # Unfiltered, this run registers to ~0.01 px RMS; 0.05 leaves room for noise but not for a pull to zero.
    assert np.sqrt(np.mean(error**2)) <= 0.05


# --------------------------------------------------------------------------------------- pairs reference
def _chain_pairs(n_frames, neighbours):
    first, second = zip(*[(i, j) for i in range(n_frames) for j in range(i + 1, min(i + 1 + neighbours, n_frames))],
                        strict=True)
    return np.array(first), np.array(second)


def test_solve_positions_recovers_positions_and_drops_a_bad_pair():
    rng = np.random.default_rng(2)
    positions = np.cumsum(rng.normal(0, 1.5, size=(12, 2)), axis=0)
    positions -= positions[0]
    first, second = _chain_pairs(12, 3)
    shifts = positions[second] - positions[first]
    sigmas = np.full(shifts.shape, 0.01)
    solved, kept = solve_positions(first, second, shifts, sigmas, 12)
    np.testing.assert_allclose(solved, positions, atol=1e-9)
    assert kept.all()
    # One pair spoilt (a cosmic-ray frame registered 3 px off against one neighbour) is outvoted and dropped.
    spoilt = shifts.copy()
    spoilt[7] += (3.0, -1.0)
    solved, kept = solve_positions(first, second, spoilt, sigmas, 12)
    np.testing.assert_allclose(solved, positions, atol=1e-9)
    assert np.flatnonzero(~kept).tolist() == [7]


def test_solve_positions_weights_and_unconnected_frames():
    # Frame 1 measured twice: once from the anchor (sigma 0.1) and through frame 2 (sigma 1 each way); frame 3 has
    # no pair and frame 4's only pair is NaN: both unplaced.
    first, second = np.array([0, 0, 2, 0]), np.array([1, 2, 1, 4])
    shifts = np.array([[1.0], [0.0], [0.0], [np.nan]])
    sigmas = np.array([[0.1], [1.0], [1.0], [1.0]])
    solved, kept = solve_positions(first, second, shifts, sigmas, 5, outlier_sigmas=np.inf)
    assert np.isnan(solved[3]).all() and np.isnan(solved[4]).all() and not kept[3]
    # Weighted mean of 1.0 (weight 100) and 0.0 through the two-pair path (variance 2, weight 0.5).
    assert solved[1, 0] == pytest.approx(100 / 100.5, abs=1e-9)
    assert solved[0, 0] == 0.0


def test_pairs_reference_with_a_dark_first_frame_and_a_cosmic_ray():
    kwargs = dict(n_frames=16, shape=SHAPE, seed=0, ring_modulation=0.0, n_cosmic=1)
    run = make_run(**kwargs)
    sample = run.stack().astype(np.float64)
    sample[0] = run.pedestal  # a dark first frame
    built = pairs_reference(sample, run.mask)
    assert built.anchor == 1
    assert built.n_frames == run.n_frames - 1 - int(run.beam_off.sum())
    assert np.all(built.image[~built.mask] == 0) and built.mask.sum() > 0.8 * run.mask.sum()
    # In the anchor's coordinates (see the iterative test for the tolerance), and the noise averaged down.
    result = register(built.image, sample[1], reference_mask=built.mask, moving_mask=run.mask)
    assert np.all(np.abs(result.shift) < 0.05), result.shift
    truth = make_run(**kwargs, noise=False).frames(1, 2)[0].astype(np.float64)
    common = built.mask & run.mask
    assert _residual_std(built.image, truth, common) < 0.5 * _residual_std(sample[1], truth, common)


def test_hot_pixel_just_inside_the_mask_is_hot_not_an_outlier_of_every_frame():
    """A hot pixel on the inner edge of the beam-block cannot be compared fairly with its neighbours, but it is
    masked anyway: coded hot, it is left out of the outlier search. Found as a frame-local outlier instead, it
    sent every frame of a run down the slow per-frame-mask path (half the speed)."""
    run = make_run(40, (128, 128), seed=3, jump_px=None, n_cosmic=0)
    frames = run.stack().astype(np.float64)
    block = run.beam_block
    inner_edge = np.argwhere(~block & ndi.binary_dilation(block, structure=np.ones((3, 3), bool)))
    y, x = inner_edge[len(inner_edge) // 2]
    frames[:, y, x] = 5 * frames.max()
    defects = detect_defects(frames, block)
    assert defects.codes[y, x] == DEFECT_CODES["hot"]
    bright = np.isin(defects.codes, (DEFECT_CODES["hot"], DEFECT_CODES["stuck"]))
    reference = np.where(defects.mask, frames[0], 0.0)  # as a built reference: 0 where it is not valid
    plan = make_plan(reference, reference_mask=defects.mask, bright_pixels=bright)
    lit = lit_frames(frames)[0]
    assert not (find_outliers(frames[lit], plan.outlier_search, plan.levels) & plan.fill.mask).any()
