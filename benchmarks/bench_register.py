"""Benchmark driftcorr's registration against scikit-image and against the FFT floor, on one thread.

Run from the repository root::

    .venv/bin/python benchmarks/bench_register.py                    # 256², 512², 1024² (a few minutes)
    .venv/bin/python benchmarks/bench_register.py --quick            # 256² and 512², fewer frames
    .venv/bin/python benchmarks/bench_register.py --sizes 512 --frames 64
    .venv/bin/python benchmarks/bench_register.py --sizes 512 --profile   # + cProfile of register_frames

Every figure is measured in the same run, on one thread: the BLAS/OpenMP pools are pinned to 1 (environment
variables set before NumPy is imported, plus ``threadpoolctl``), FFTs use ``workers=1`` and Dask runs with the
synchronous scheduler. Timings are the best of ``--repeats`` (default 3) after one warm-up, in ms per frame.

The data are a realistic synthetic diffraction run (:func:`driftcorr.synthetic.make_run`: rings, Bragg
spots, beam-block, Poisson noise, hot/dead pixels, a beam-off frame, a cosmic-ray frame, a re-steer jump).
The mask is the run's full valid-pixel mask, the reference is frame 0 and the truth is
``run.true_shifts(reference=0)``.
See ``benchmarks/README.md`` for what each column means.

Importing this module has no side effects; everything happens in :func:`main`.
"""

from __future__ import annotations

import os

_THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "NUMEXPR_NUM_THREADS",
               "VECLIB_MAXIMUM_THREADS")
if __name__ == "__main__":  # pin the thread pools before NumPy loads its BLAS / OpenMP runtimes
    for _name in _THREAD_ENV:
        os.environ[_name] = "1"

import argparse  # noqa: E402
import cProfile  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import platform  # noqa: E402
import pstats  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402

import dask  # noqa: E402
import numpy as np  # noqa: E402
import scipy  # noqa: E402
import scipy.fft as sfft  # noqa: E402
import skimage  # noqa: E402
from skimage.registration import phase_cross_correlation  # noqa: E402
from threadpoolctl import threadpool_info, threadpool_limits  # noqa: E402

import driftcorr  # noqa: E402
from driftcorr.pipeline import estimate_drift  # noqa: E402
from driftcorr.registration import make_plan, register_frames  # noqa: E402
from driftcorr.store import block_frames_for  # noqa: E402
from driftcorr.synthetic import make_run  # noqa: E402

DEFAULT_SIZES = (256, 512, 1024)
QUICK_SIZES = (256, 512)
SPEEDUP_TARGET = 20.0  # scikit-image masked / driftcorr estimate_drift
FLOOR_TARGET = 2.0  # driftcorr kernel / FFT floor
SKIMAGE_UPSAMPLE = 50


def default_frames(n: int, quick: bool) -> int:
    """Frames in the synthetic run for an n×n frame: 128 up to 512², 32 at 1024² (quick: 32 / 16)."""
    if quick:
        return int(np.clip(2**23 // (n * n), 16, 32))
    return int(np.clip(2**25 // (n * n), 16, 128))


def skimage_masked_subset(n: int, quick: bool) -> int:
    """Frames timed with scikit-image's masked registration (slow): 16 at 256², 8 at 512², 3 at 1024²."""
    count = int(np.clip(round(8 * (512 / n) ** 2), 3, 16))
    return max(2, count // 2) if quick else count


def skimage_unmasked_subset(n: int, quick: bool) -> int:
    """Frames timed with scikit-image's unmasked subpixel registration: 32 at 256², 16 at 512², 8 at 1024²."""
    count = int(np.clip(round(16 * (512 / n) ** 2), 8, 32))
    return max(4, count // 2) if quick else count


def best_time(fn: Callable[[], object], repeats: int, warmup: Callable[[], object] | None = None):
    """Run ``warmup`` (default ``fn``) once, then ``fn`` ``repeats`` times.

    Returns the best and the median wall time (s) and the result of the last call.
    """
    (warmup or fn)()
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), float(np.median(times)), result


def error_stats(estimate: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """RMS and max over frames of the error magnitude ``|estimate - truth|`` (px); NaN counts as inf."""
    if len(estimate) == 0:
        return float("nan"), float("nan")
    err = np.hypot(*(np.asarray(estimate, float) - truth).T)
    err = np.where(np.isfinite(err), err, np.inf)
    return float(np.sqrt(np.mean(err**2))), float(err.max())


def pick(candidates: np.ndarray, count: int) -> np.ndarray:
    """``count`` frame indices spread evenly over ``candidates``."""
    if count >= len(candidates):
        return candidates
    return candidates[np.unique(np.linspace(0, len(candidates) - 1, count).round().astype(int))]


@dataclass
class SizeResult:
    """Everything measured for one frame size."""

    n: int
    n_frames: int
    pad: tuple[int, ...]
    max_shift: tuple[int, ...]
    block: int
    ms: dict[str, float] = field(default_factory=dict)  # method -> ms per frame (best of repeats)
    ms_median: dict[str, float] = field(default_factory=dict)
    # method -> (frames, rms px, max px)
    accuracy: dict[str, tuple[int, float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def fft_floor(plan, stack: np.ndarray, block: int, repeats: int):
    """Time the FFT floor over the whole stack, block by block; returns best, median (s) for all frames.

    Per block: 2 forward real FFTs (the float32 frames and their squares) and 3 inverse real FFTs, all at
    ``plan.pad_shape``. Inputs are prepared outside the timed region, so only the FFTs are timed.
    """
    pad, axes = plan.pad_shape, (-2, -1)
    batches = []
    for i in range(0, stack.shape[0], block):
        x = stack[i:i + block].astype(np.float32)
        spec = sfft.rfftn(x, s=pad, axes=axes, workers=1)
        batches.append((x, x * x, [spec, spec.copy(), spec.copy()]))

    def run():
        for x, x2, spectra in batches:
            sfft.rfftn(x, s=pad, axes=axes, workers=1)
            sfft.rfftn(x2, s=pad, axes=axes, workers=1)
            for spec in spectra:
                sfft.irfftn(spec, s=pad, axes=axes, workers=1)

    best, median, _ = best_time(run, repeats)
    return best, median


def bench_size(n: int, *, n_frames: int, seed: int, repeats: int, quick: bool, log) -> SizeResult:
    """Measure every method on one synthetic run of n×n frames."""
    log(f"[{n}²] rendering {n_frames} frames ...")
    run = make_run(n_frames, (n, n), seed=seed)
    stack = run.stack()
    mask = run.mask
    truth = run.true_shifts(reference=0)
    reference = stack[0]
    block = min(block_frames_for((n, n)), n_frames)

    frames_all = np.arange(n_frames)
    good = frames_all[(~run.beam_off) & (~run.cosmic) & (frames_all != 0)]  # accuracy frames
    cosmic = frames_all[run.cosmic]
    beam_off = frames_all[run.beam_off]

    # (a) driftcorr kernel: plan once, then register_frames block by block.
    plan_best, _, plan = best_time(lambda: make_plan(reference, reference_mask=mask), repeats)
    result = SizeResult(n=n, n_frames=n_frames, pad=plan.pad_shape, max_shift=plan.max_shift, block=block)
    result.ms["plan"] = plan_best * 1e3  # per plan, not per frame
    result.ms_median["plan"] = result.ms["plan"]

    def kernel():
        return np.concatenate([register_frames(plan, stack[i:i + block]).shift
                               for i in range(0, n_frames, block)])

    log(f"[{n}²] driftcorr kernel ...")
    best, median, kernel_shift = best_time(kernel, repeats)
    result.ms["kernel"], result.ms_median["kernel"] = 1e3 * best / n_frames, 1e3 * median / n_frames

    # (b) driftcorr estimate_drift: the whole pipeline on an in-memory stack.
    log(f"[{n}²] driftcorr estimate_drift ...")
    best, median, drift = best_time(lambda: estimate_drift(stack, mask=mask, reference=0), repeats)
    result.ms["estimate_drift"] = 1e3 * best / n_frames
    result.ms_median["estimate_drift"] = 1e3 * median / n_frames
    drift_shift = np.asarray(drift["shift"])
    valid = np.asarray(drift["valid"])

    # (c) scikit-image masked NCC (integer shifts only), on a subset of frames.
    masked_frames = pick(good, skimage_masked_subset(n, quick))
    log(f"[{n}²] scikit-image masked, {len(masked_frames)} frames ...")

    def sk_masked(indices):
        return np.array([
            phase_cross_correlation(reference, stack[i], reference_mask=mask, moving_mask=mask)[0]
            for i in indices
        ])

    best, median, sk_masked_shift = best_time(lambda: sk_masked(masked_frames), repeats,
                                              warmup=lambda: sk_masked(masked_frames[:1]))
    result.ms["skimage_masked"] = 1e3 * best / len(masked_frames)
    result.ms_median["skimage_masked"] = 1e3 * median / len(masked_frames)

    # (d) scikit-image unmasked subpixel, for information.
    unmasked_frames = pick(good, skimage_unmasked_subset(n, quick))
    log(f"[{n}²] scikit-image unmasked, {len(unmasked_frames)} frames ...")

    def sk_unmasked():
        return np.array([phase_cross_correlation(reference, stack[i], upsample_factor=SKIMAGE_UPSAMPLE)[0]
                         for i in unmasked_frames])

    best, median, sk_unmasked_shift = best_time(sk_unmasked, repeats)
    result.ms["skimage_unmasked"] = 1e3 * best / len(unmasked_frames)
    result.ms_median["skimage_unmasked"] = 1e3 * median / len(unmasked_frames)

    # (e) The FFT floor of the same plan, on one block.
    log(f"[{n}²] FFT floor ...")
    best, median = fft_floor(plan, stack, block, repeats)
    result.ms["fft_floor"], result.ms_median["fft_floor"] = 1e3 * best / n_frames, 1e3 * median / n_frames

    # Accuracy on good frames (not beam-off, not cosmic, not the reference itself).
    result.accuracy["driftcorr kernel"] = (len(good), *error_stats(kernel_shift[good], truth[good]))
    result.accuracy["driftcorr estimate_drift"] = (len(good), *error_stats(drift_shift[good], truth[good]))
    result.accuracy["skimage masked (integer)"] = (len(masked_frames),
                                                   *error_stats(sk_masked_shift, truth[masked_frames]))
    result.accuracy["driftcorr kernel, same subset"] = (len(masked_frames),
                                                        *error_stats(kernel_shift[masked_frames],
                                                                     truth[masked_frames]))
    result.accuracy[f"skimage unmasked (upsample {SKIMAGE_UPSAMPLE})"] = (
        len(unmasked_frames), *error_stats(sk_unmasked_shift, truth[unmasked_frames]))

    # Bad frames, reported apart (untimed).
    for t in cosmic:
        sk = sk_masked([t])[0]
        result.notes.append(
            f"cosmic frame {t}: error kernel {error_stats(kernel_shift[[t]], truth[[t]])[1]:.3f} px, "
            f"estimate_drift {error_stats(drift_shift[[t]], truth[[t]])[1]:.3f} px (valid={bool(valid[t])}), "
            f"skimage masked {error_stats(sk[None], truth[[t]])[1]:.3f} px")
    for t in beam_off:
        result.notes.append(
            f"beam-off frame {t}: estimate_drift valid={bool(valid[t])}, "
            f"interpolated shift error {error_stats(drift_shift[[t]], truth[[t]])[1]:.3f} px")
    flagged_good = int(np.count_nonzero(~valid[good]))
    result.notes.append(f"good frames flagged invalid by estimate_drift: {flagged_good} of {len(good)}")
    if run.jump_frame is not None:
        t = run.jump_frame
        result.notes.append(f"re-steer jump at frame {t} "
                            f"({np.hypot(*(truth[t] - truth[t - 1])):.1f} px): kernel error "
                            f"{error_stats(kernel_shift[[t]], truth[[t]])[1]:.3f} px")
    return result


def machine_facts() -> list[str]:
    """Lines describing the machine and the software."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    pools = ", ".join(f"{p['internal_api']}={p['num_threads']}" for p in threadpool_info()) or "none"
    return [
        f"date        {datetime.date.today().isoformat()}",
        f"cpu         {cpu} ({os.cpu_count()} logical CPUs, {usable} usable)",
        f"python      {platform.python_version()} on {platform.system()} {platform.release()}",
        f"versions    driftcorr {driftcorr.__version__}, numpy {np.__version__}, scipy {scipy.__version__}, "
        f"scikit-image {skimage.__version__}, dask {dask.__version__}",
        f"threads     1 (thread pools: {pools}; FFT workers=1; dask scheduler=synchronous)",
    ]


def format_report(results: list[SizeResult], repeats: int) -> list[str]:
    """The timing, accuracy and ratio tables."""
    lines = ["", f"Time per frame, ms (best of {repeats} after one warm-up; plan = once per reference)", ""]
    header = (f"{'size':>6} {'frames':>6} {'pad':>10} {'block':>5} {'plan':>8} {'kernel':>8} {'estimate':>9} "
              f"{'sk_mask':>9} {'sk_unmask':>9} {'fft_floor':>9}")
    lines += [header, "-" * len(header)]
    for r in results:
        lines.append(
            f"{r.n:>5}² {r.n_frames:>6} {'×'.join(map(str, r.pad)):>10} {r.block:>5} {r.ms['plan']:>8.1f} "
            f"{r.ms['kernel']:>8.2f} {r.ms['estimate_drift']:>9.2f} {r.ms['skimage_masked']:>9.1f} "
            f"{r.ms['skimage_unmasked']:>9.2f} {r.ms['fft_floor']:>9.2f}")
    lines += ["", "Accuracy vs truth, px (|error| over frames; good = not beam-off, not cosmic, not frame 0)",
              ""]
    header = f"{'size':>6}  {'method':<36} {'frames':>6} {'rms':>8} {'max':>8}"
    lines += [header, "-" * len(header)]
    for r in results:
        for method, (count, rms, worst) in r.accuracy.items():
            lines.append(f"{r.n:>5}²  {method:<36} {count:>6} {rms:>8.3f} {worst:>8.3f}")
    lines += ["", "Ratios (same run; from best times, from median times in parentheses)", ""]
    header = (f"{'size':>6} {'sk_mask/estimate':>17} {'sk_mask/kernel':>15} {'kernel/fft_floor':>17} "
              f"{'estimate/kernel':>16}   targets")
    lines += [header, "-" * (len(header) + 12)]
    for r in results:
        def ratio(a: str, b: str, r=r) -> tuple[float, float]:
            return r.ms[a] / r.ms[b], r.ms_median[a] / r.ms_median[b]

        speedup, floor = ratio("skimage_masked", "estimate_drift"), ratio("kernel", "fft_floor")
        cells = [speedup, ratio("skimage_masked", "kernel"), floor, ratio("estimate_drift", "kernel")]
        text = " ".join(f"{f'{best:.2f}× ({median:.2f})':>{width}}"
                        for (best, median), width in zip(cells, (17, 15, 17, 16), strict=True))
        verdict_speed = "ok" if speedup[0] >= SPEEDUP_TARGET else "MISS"
        verdict_floor = "ok" if floor[0] <= FLOOR_TARGET else "MISS"
        lines.append(f"{r.n:>5}² {text}   {verdict_speed} ≥{SPEEDUP_TARGET:.0f}×, "
                     f"{verdict_floor} ≤{FLOOR_TARGET:.0f}×")
    lines += ["", "Bad frames and notes", ""]
    for r in results:
        lines += [f"{r.n:>5}²  {note}" for note in r.notes]
    return lines


def profile_kernel(n: int, *, n_frames: int, seed: int, top: int) -> list[str]:
    """cProfile of ``register_frames`` over an n×n run (plan excluded): the top entries by own time."""
    run = make_run(n_frames, (n, n), seed=seed)
    stack = run.stack()
    plan = make_plan(stack[0], reference_mask=run.mask)
    block = min(block_frames_for((n, n)), n_frames)
    register_frames(plan, stack[:block])  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(0, n_frames, block):
        register_frames(plan, stack[i:i + block])
    profiler.disable()
    text = io.StringIO()
    stats = pstats.Stats(profiler, stream=text)
    stats.strip_dirs().sort_stats("tottime").print_stats(top)
    title = f"cProfile of register_frames, {n}², {n_frames} frames, blocks of {block} (top {top} by tottime)"
    return ["", title, text.getvalue()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", help="frame sizes N (N×N); default 256 512 1024")
    parser.add_argument("--frames", type=int,
                        help="frames per synthetic run (default: 128 up to 512², 32 at 1024²)")
    parser.add_argument("--quick", action="store_true", help="256² and 512² only, fewer frames")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats after one warm-up (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic runs (default 0)")
    parser.add_argument("--profile", action="store_true",
                        help="also print a cProfile of register_frames at 512² (or the first size)")
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = list(QUICK_SIZES if args.quick else DEFAULT_SIZES)
    if min(args.sizes) < 32 or (args.frames is not None and args.frames < 4) or args.repeats < 1:
        parser.error("sizes must be at least 32, --frames at least 4 and --repeats at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    start = time.perf_counter()
    results = []
    with threadpool_limits(limits=1), dask.config.set(scheduler="synchronous"):
        print("driftcorr registration benchmark", flush=True)
        print("\n".join(machine_facts()), flush=True)
        for n in args.sizes:
            n_frames = args.frames or default_frames(n, args.quick)
            results.append(bench_size(n, n_frames=n_frames, seed=args.seed, repeats=args.repeats,
                                      quick=args.quick, log=log))
        print("\n".join(format_report(results, args.repeats)))
        if args.profile:
            n = 512 if 512 in args.sizes else args.sizes[0]
            print("\n".join(profile_kernel(n, n_frames=args.frames or default_frames(n, args.quick),
                                           seed=args.seed, top=15)))
    print(f"\ntotal benchmark time {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
