"""Tests of the synthetic UED run generator (known truth for registration tests and benchmarks)."""

import numpy as np
import pytest
import scipy.ndimage as ndi

from driftcorr.synthetic import SyntheticRun, make_run

CLEAN = {  # noiseless, nothing static or bad in the way: only the drifting pattern
    "noise": False, "beam_block": False, "hot_fraction": 0.0, "dead_fraction": 0.0, "n_beam_off": 0,
    "n_cosmic": 0, "ring_modulation": 0.0, "beam_current_wander": 0.0,
}


@pytest.fixture(scope="module")
def run() -> SyntheticRun:
    return make_run(60, (96, 128), seed=7)


@pytest.fixture(scope="module")
def stack(run: SyntheticRun) -> np.ndarray:
    return run.stack()


def test_shapes_and_dtypes(run: SyntheticRun, stack: np.ndarray) -> None:
    n, (ny, nx) = 60, (96, 128)
    assert run.n_frames == n and run.shape == (ny, nx)
    assert stack.shape == (n, ny, nx) and stack.dtype == np.uint16
    assert run.frames(3, 5).shape == (2, ny, nx) and run.frames(4, 4).shape == (0, ny, nx)
    assert run.centres.shape == (n, 2) and run.centres.dtype == np.float64
    assert run.beam_current.shape == (n,)
    assert run.ring_gain.shape[0] == n and 4 <= run.ring_gain.shape[1] <= 6
    for name in ("beam_off", "cosmic"):
        assert getattr(run, name).shape == (n,) and getattr(run, name).dtype == bool
    for name in ("beam_block", "hot_pixels", "dead_pixels", "mask"):
        assert getattr(run, name).shape == (ny, nx) and getattr(run, name).dtype == bool
    np.testing.assert_array_equal(run.mask, run.beam_block & ~run.hot_pixels & ~run.dead_pixels)
    assert not run.centres.flags.writeable  # frozen truth


def test_true_shifts(run: SyntheticRun) -> None:
    shifts = run.true_shifts()
    assert shifts.shape == (run.n_frames, 2) and shifts.dtype == np.float64
    np.testing.assert_array_equal(shifts, run.centres[0] - run.centres)
    np.testing.assert_array_equal(run.true_shifts(5)[5], [0.0, 0.0])
    np.testing.assert_array_equal(run.true_shifts(-1), run.true_shifts(run.n_frames - 1))
    with pytest.raises(IndexError):
        run.true_shifts(run.n_frames)


def test_deterministic_in_any_blocking(run: SyntheticRun, stack: np.ndarray) -> None:
    np.testing.assert_array_equal(run.frames(10, 20), stack[10:20])
    singles = np.concatenate([run.frames(t, t + 1) for t in (17, 3, 40)])
    np.testing.assert_array_equal(singles, stack[[17, 3, 40]])
    again = make_run(60, (96, 128), seed=7)
    np.testing.assert_array_equal(again.centres, run.centres)
    np.testing.assert_array_equal(again.frames(30, 60), stack[30:])
    other = make_run(60, (96, 128), seed=8)
    assert not np.array_equal(other.centres, run.centres)
    assert not np.array_equal(other.frames(0, 5), stack[:5])


def test_options_do_not_change_the_draw() -> None:
    # Switching noise/defects/bad frames keeps geometry and trajectory of a seed (fair comparisons).
    a = make_run(40, (64, 64), seed=3)
    b = make_run(40, (64, 64), seed=3, noise=False, hot_fraction=0.01, n_cosmic=3, jump_px=4.0)
    np.testing.assert_array_equal(a.ring_radii, b.ring_radii)
    np.testing.assert_array_equal(a.beam_current, b.beam_current)
    assert a.jump_frame == b.jump_frame
    np.testing.assert_array_equal(a.centres[: a.jump_frame], b.centres[: b.jump_frame])


@pytest.mark.parametrize("shape", [(128, 128), (112, 144)])
def test_sign_convention_subpixel(shape: tuple[int, int]) -> None:
    run = make_run(50, shape, seed=11, drift_px=5.0, jump_px=None, **CLEAN)
    shifts = run.true_shifts(0)
    frac = np.abs(shifts - np.round(shifts))
    # a frame with a clearly sub-pixel shift on both axes and a shift of more than a pixel
    ok = np.flatnonzero((frac.min(axis=1) > 0.15) & (np.abs(shifts).max(axis=1) > 1.0))
    assert ok.size
    t = int(ok[np.argmax(np.abs(shifts[ok]).max(axis=1))])
    ref = run.frames(0, 1)[0].astype(np.float64)
    moving = run.frames(t, t + 1)[0].astype(np.float64)
    interior = (slice(12, shape[0] - 12), slice(12, shape[1] - 12))

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt(np.mean((a[interior] - ref[interior]) ** 2)))

    registered = rms(ndi.shift(moving, shifts[t], order=3, mode="nearest"))
    unshifted = rms(moving)
    wrong_sign = rms(ndi.shift(moving, -shifts[t], order=3, mode="nearest"))
    rounded = rms(ndi.shift(moving, np.round(shifts[t]), order=3, mode="nearest"))
    assert registered < 0.05 * unshifted
    assert registered < 0.05 * wrong_sign
    assert registered < 0.25 * rounded  # the sub-pixel part of the truth is real


def test_sign_convention_matches_scikit_image() -> None:
    registration = pytest.importorskip("skimage.registration")
    run = make_run(30, (128, 128), seed=5, drift_px=4.0, jump_px=3.0, **CLEAN)
    frames = run.stack()
    for t in (run.jump_frame, run.n_frames - 1):
        found, _, _ = registration.phase_cross_correlation(frames[0], frames[t], upsample_factor=50)
        np.testing.assert_allclose(found, run.true_shifts(0)[t], atol=0.1)


def test_beam_block_static_and_sized(run: SyntheticRun, stack: np.ndarray) -> None:
    ny, nx = run.shape
    side = min(ny, nx)
    covered = ~run.beam_block
    disk = np.pi * run.block_radius**2
    assert run.block_radius == pytest.approx(0.06 * side)
    assert disk < covered.sum() < disk + run.rod_width * np.hypot(ny, nx)
    # the disk sits near the first frame's pattern centre and the rod reaches the frame edge
    assert np.hypot(*(run.block_centre - run.centres[0])) < 2.0
    yy, xx = np.indices(run.shape)
    in_disk = np.hypot(yy - run.block_centre[0], xx - run.block_centre[1]) < 0.9 * run.block_radius
    assert covered[in_disk].all()
    assert covered[-1, :].any() or covered[:, -1].any()
    # covered pixels get only a few scattered counts in every frame, whatever the drift
    inside = covered & ~run.hot_pixels & ~run.dead_pixels
    assert stack[~run.cosmic][:, inside].mean() < run.pedestal + 10
    valid_mean = stack[:, run.mask].reshape(run.n_frames, -1).mean(axis=1)
    lit = ~run.beam_off
    assert (valid_mean[lit] > run.pedestal + 50).all()
    assert make_run(5, (64, 64), beam_block=False).beam_block.all()


def test_hot_and_dead_pixels(run: SyntheticRun, stack: np.ndarray) -> None:
    npix = run.shape[0] * run.shape[1]
    assert run.hot_pixels.sum() == round(2e-4 * npix) and run.dead_pixels.sum() == round(2e-4 * npix)
    assert not (run.hot_pixels & run.dead_pixels).any()
    assert (stack[:, run.hot_pixels] == run.hot_value).all() and run.hot_value >= 60000
    assert (stack[:, run.dead_pixels] == 0).all()
    many = make_run(3, (64, 64), hot_fraction=0.01, dead_fraction=0.02, seed=2, n_cosmic=0)
    assert many.hot_pixels.sum() == 41 and many.dead_pixels.sum() == 82
    only_block = make_run(3, (64, 64), hot_fraction=0, dead_fraction=0, n_cosmic=0)
    np.testing.assert_array_equal(only_block.mask, only_block.beam_block)


def test_bad_frames(run: SyntheticRun) -> None:
    for seed in range(6):
        r = make_run(40, (64, 64), seed=seed, n_beam_off=3, n_cosmic=2)
        off, cos = np.flatnonzero(r.beam_off), np.flatnonzero(r.cosmic)
        assert off.size == 3 and cos.size == 2 and not set(off) & set(cos)
        assert 0 not in off and 0 not in cos
        assert r.jump_frame not in off and r.jump_frame not in cos
        assert np.isnan(r.streaks[~r.cosmic]).all() and np.isfinite(r.streaks[r.cosmic]).all()
    with pytest.raises(ValueError, match="bad frames"):
        make_run(4, (64, 64), n_beam_off=2, n_cosmic=2)


def test_beam_off_frame_is_dark(run: SyntheticRun, stack: np.ndarray) -> None:
    (t,) = np.flatnonzero(run.beam_off)
    dark = stack[t][run.mask].astype(np.float64)
    assert dark.mean() == pytest.approx(run.pedestal, abs=0.5)
    assert dark.std() == pytest.approx(run.read_noise, rel=0.2)
    assert stack[t - 1][run.mask].mean() > run.pedestal + 100


def test_cosmic_streak(run: SyntheticRun, stack: np.ndarray) -> None:
    (t,) = np.flatnonzero(run.cosmic)
    row, col, angle, length, width, amplitude = run.streaks[t]
    assert 0.25 * min(run.shape) <= length <= 0.4 * min(run.shape) and amplitude >= 15000
    valid = run.mask
    near = [u for u in (t - 2, t - 1, t + 1, t + 2) if 0 <= u < run.n_frames and u != t]
    neighbours = stack[near].max(axis=0).astype(np.int64)
    excess = (stack[t].astype(np.int64) - neighbours) * valid
    hit = excess > 5000
    # a straight streak: many bright pixels, spread over ~its length, around the recorded midpoint
    assert hit.sum() >= length
    rows, cols = np.nonzero(hit)
    extent = np.hypot(np.ptp(rows), np.ptp(cols))
    assert 0.8 * length <= extent <= length + 6 * width
    assert np.hypot(rows.mean() - row, cols.mean() - col) < 0.15 * length
    # the neighbours do not have it
    assert neighbours[hit].max() < run.pedestal + 3 * run.counts


def test_drift_and_jump() -> None:
    run = make_run(200, (256, 256), seed=4, drift_px=6.0, jump_px=10.0)
    j = run.jump_frame
    assert 200 // 3 <= j < 2 * 200 // 3
    steps = np.hypot(*np.diff(run.centres, axis=0).T)
    assert steps[j - 1] == pytest.approx(10.0, abs=0.3)
    assert np.delete(steps, j - 1).max() < 0.3
    slow = run.centres - run.centres[0]
    slow[j:] -= run.centres[j] - run.centres[j - 1]  # remove the jump (plus one frame's slow step)
    assert np.hypot(*slow.T).max() == pytest.approx(6.0, rel=0.05)
    no_jump = make_run(200, (256, 256), seed=4, jump_px=None)
    assert no_jump.jump_frame is None and np.hypot(*np.diff(no_jump.centres, axis=0).T).max() < 0.3
    assert make_run(20, (64, 64), jump_px=0).jump_frame is None


def test_intensity_wander() -> None:
    run = make_run(300, (64, 64), seed=9, ring_modulation=0.2, beam_current_wander=0.3)
    assert np.abs(run.beam_current - 1).max() <= 0.3 + 1e-12 and np.ptp(run.beam_current) > 0.15
    assert np.abs(run.ring_gain - 1).max() <= 0.2 + 1e-12
    assert (np.ptp(run.ring_gain, axis=0) > 0.05).all()
    assert not np.allclose(run.ring_gain[:, 0], run.ring_gain[:, 1])  # each ring has its own modulation
    assert np.abs(np.diff(run.beam_current)).max() < 0.05  # slow
    flat = make_run(10, (64, 64), ring_modulation=0, beam_current_wander=0)
    assert (flat.beam_current == 1).all() and (flat.ring_gain == 1).all()


def test_noise_statistics() -> None:
    # Noisy minus noiseless frames (same seed and geometry) behave like Poisson + read noise, at high and low
    # counts (the exact-Poisson and the skew-corrected normal branches).
    for counts in (2000.0, 200.0):
        kwargs = {"seed": 1, "counts": counts, "n_cosmic": 0, "n_beam_off": 0}
        noisy = make_run(4, (96, 96), **kwargs)
        clean = make_run(4, (96, 96), noise=False, **kwargs)
        lam = clean.stack()[:, noisy.mask].astype(np.float64) - noisy.pedestal
        z = (noisy.stack()[:, noisy.mask] - lam - noisy.pedestal) / np.sqrt(lam + noisy.read_noise**2)
        assert abs(z.mean()) < 0.03 and z.std() == pytest.approx(1.0, abs=0.05)
        assert lam.max() > 0.8 * counts


def test_pedestal_clipped_not_wrapped() -> None:
    run = make_run(4, (64, 64), seed=2, pedestal=30000.0, counts=2000.0)
    frames = run.stack()
    assert (frames[:, run.mask] >= 29900).all()
    hot = make_run(3, (64, 64), seed=2, pedestal=60000.0, counts=20000.0, noise=False, n_beam_off=0)
    frames = hot.stack()
    ring_max = frames[:, hot.mask].max(axis=1)
    assert (ring_max == 65535).all()  # saturated, clipped to the top of the range
    assert (frames[:, hot.mask] >= 60000).all()  # nothing wrapped around to small values


def test_low_counts() -> None:
    run = make_run(5, (64, 64), counts=200.0, seed=3)
    frames = run.frames()[~run.cosmic & ~run.beam_off][:, run.mask]
    # no more than the central beam at its brightest (plus noise) can show; most pixels see tens of counts
    assert frames.max() < run.pedestal + 1.3 * max(run.beam_amplitude, run.counts * 1.2) + 150
    assert 2 < np.median(frames) - run.pedestal < 100


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_frames": 0}, "n_frames"),
        ({"shape": (16, 64)}, "shape"),
        ({"seed": -1}, "seed"),
        ({"counts": -5.0}, "counts"),
        ({"pedestal": 70000.0}, "pedestal"),
        ({"hot_fraction": 0.9}, "hot_fraction"),
        ({"ring_modulation": 1.5}, "ring_modulation"),
    ],
)
def test_invalid_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        make_run(**kwargs)


def test_frame_range_checked(run: SyntheticRun) -> None:
    with pytest.raises(IndexError):
        run.frames(5, 3)
    with pytest.raises(IndexError):
        run.frames(0, run.n_frames + 1)


def test_tiny_runs() -> None:
    one = make_run(1, (32, 32), n_beam_off=0, n_cosmic=0)
    assert one.jump_frame is None and one.stack().shape == (1, 32, 32)
    two = make_run(2, (32, 32), n_beam_off=0, n_cosmic=0)
    assert two.jump_frame == 1


def test_pickles_for_workers(run: SyntheticRun, stack: np.ndarray) -> None:
    import pickle

    clone = pickle.loads(pickle.dumps(run))
    np.testing.assert_array_equal(clone.frames(20, 25), stack[20:25])
    assert not clone.centres.flags.writeable
    assert "n_frames=60" in repr(run)
