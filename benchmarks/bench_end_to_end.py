"""End-to-end speed and memory of ``driftcorr correct`` against a plain scikit-image loop, in the same run.

Run from the repository root::

    .venv/bin/python benchmarks/bench_end_to_end.py                         # 512², 3000 frames (~1.5 min)
    .venv/bin/python benchmarks/bench_end_to_end.py --frames 400 1000 3000 12000 --seed 43  # ~9 min
    .venv/bin/python benchmarks/bench_end_to_end.py --size 1024 --frames 100 400 --sk-frames 10

Every run pays a fixed ~4 s (start-up, defect detection, the reference) before its frames go at the steady
rate, so short runs show a lower rate than long ones; 3000 frames (a few minutes of acquisition) is the default.

For each run length a realistic synthetic uint16 run (:func:`driftcorr.synthetic.make_run`) is written to Zarr
(not timed) with its beam-block mask, then:

- ``driftcorr correct RAW OUT --mask BLOCK.npy`` runs as a subprocess with default options (Zarr in, shifts and
  corrected Zarr out): wall time from start to exit, frames/s, and the peak resident memory of its whole process
  tree (the sum over the process and its children, sampled every 20 ms);
- the scikit-image loop runs as a subprocess too, over the first ``--sk-frames`` frames: read a frame from the same
  Zarr array, ``skimage.registration.phase_cross_correlation`` with the beam-block as reference and moving mask
  (integer precision: the masked path has no upsampling), ``scipy.ndimage.shift`` (cubic), write the frame to a
  float32 Zarr array; its reference is frame 0. frames/s and peak memory likewise.

Printed: both throughputs, their ratio (driftcorr / scikit-image), and the peak memory of each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import psutil

SKIMAGE_LOOP = r"""
import sys, time
import numpy as np, zarr
from scipy import ndimage as ndi
from skimage.registration import phase_cross_correlation
raw, out, mask_path, count = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
source = zarr.open_array(raw, mode="r")
mask = np.load(mask_path)
target = zarr.create_array(out, shape=(count, *source.shape[1:]), chunks=(1, *source.shape[1:]), dtype="f4",
                            overwrite=True)
reference = source[0].astype(np.float64)
start = time.perf_counter()
for t in range(count):
    frame = source[t].astype(np.float64)
    shift = phase_cross_correlation(reference, frame, reference_mask=mask, moving_mask=mask)[0]
    target[t] = ndi.shift(frame, shift, order=3, mode="constant", cval=np.nan).astype(np.float32)
print(time.perf_counter() - start)
"""


def run_measured(command: list[str]) -> tuple[float, float, str]:
    """Run ``command``; returns (wall seconds, peak RSS of its process tree in bytes, stdout)."""
    start = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample():
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    wall = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise RuntimeError(f"{command[:4]} failed ({process.returncode}): {stderr.strip()[-500:]}")
    return wall, peak, stdout


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, nargs="+", default=[3000])
    parser.add_argument("--sk-frames", type=int, default=30, help="frames of the scikit-image loop")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the data in (default: temporary)")
    parser.add_argument("--block-frames", type=int, default=None, help="passed to driftcorr (default: its own)")
    args = parser.parse_args(argv)

    from driftcorr.store import write_stack
    from driftcorr.synthetic import make_run

    print(f"driftcorr end to end, {args.size}² uint16, {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d')}")
    print(f"{'frames':>7} {'driftcorr s':>11} {'frames/s':>9} {'peak RSS':>9}   {'skimage frames/s':>16} "
          f"{'peak RSS':>9}   {'ratio':>6}")
    with tempfile.TemporaryDirectory() as scratch:
        root = args.keep or Path(scratch)
        root.mkdir(parents=True, exist_ok=True)
        for n_frames in args.frames:
            run = make_run(n_frames, (args.size, args.size), seed=args.seed)
            raw, mask = root / f"raw_{n_frames}.zarr", root / "block.npy"
            write_stack(run.stack(), raw, overwrite=True)
            np.save(mask, run.beam_block)
            out = root / f"out_{n_frames}.zarr"
            blocks = [] if args.block_frames is None else ["--block-frames", str(args.block_frames)]
            wall, peak, _ = run_measured([sys.executable, "-m", "driftcorr.cli", "correct", str(raw), str(out),
                                          "--mask", str(mask), "--overwrite", *blocks])
            count = min(args.sk_frames, n_frames)
            sk_wall, sk_peak, stdout = run_measured([sys.executable, "-c", SKIMAGE_LOOP, str(raw),
                                                     str(root / "sk.zarr"), str(mask), str(count)])
            sk_rate = count / float(stdout.strip().splitlines()[-1])
            rate = n_frames / wall
            print(f"{n_frames:>7} {wall:>11.1f} {rate:>9.1f} {peak / 2**30:>7.2f} G   {sk_rate:>16.2f} "
                  f"{sk_peak / 2**30:>7.2f} G   {rate / sk_rate:>5.1f}×", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
