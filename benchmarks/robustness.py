"""Accuracy and calibrated uncertainty on unseen realistic synthetic runs, corrected through the CLI.

Run from the repository root::

    .venv/bin/python benchmarks/robustness.py                       # seeds 300-305, 256², counts 2000 and 200
    .venv/bin/python benchmarks/robustness.py --seeds 400 410 --size 512 --frames 120

Each run (:func:`driftcorr.synthetic.make_run`: rings and Bragg spots, beam-block, Poisson noise, hot and dead
pixels, a beam-off frame, a cosmic-ray streak, ±20 % ring-intensity and ±30 % beam-current changes, a 10 px
jump) is written to Zarr and corrected with ``driftcorr correct RAW OUT --mask BLOCK.npy``, the mask holding the
beam-block only (hot and dead pixels are left for driftcorr to find). Printed per run:

- ``rms``: RMS length of the error vector of ``shift`` against the truth, over all frames but the beam-off ones
  (the cosmic-ray frame included), relative to the output's reference frame;
- ``max_valid``: the largest error of a frame marked valid;
- ``beam_off``: whether every beam-off frame is marked invalid;
- ``ratio``: RMS error per axis / RMS reported ``sigma`` over the same frames (1 = calibrated).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import xarray as xr

from driftcorr.store import write_stack
from driftcorr.synthetic import make_run


def correct_through_cli(run, folder: Path) -> xr.Dataset:
    """Write the run and its beam-block mask, run ``driftcorr correct``, open the output."""
    raw, out, mask = folder / "raw.zarr", folder / "out.zarr", folder / "block.npy"
    write_stack(run.stack(), raw)
    np.save(mask, run.beam_block)
    command = [sys.executable, "-m", "driftcorr.cli", "correct", str(raw), str(out), "--mask", str(mask)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    return xr.open_zarr(out).load()


def score(run, ds: xr.Dataset) -> dict:
    """Accuracy and calibration figures of one corrected run (see the module docstring)."""
    truth = run.true_shifts(int(ds.attrs["reference_frame"]))
    error = ds["shift"].values - truth
    good = ~run.beam_off
    valid = ds["valid"].values
    sigma = ds["sigma"].values
    per_axis = float(np.sqrt(np.mean(error[good] ** 2)))
    return {
        "rms": float(np.sqrt(np.mean(np.sum(error[good] ** 2, axis=1)))),
        "max_valid": float(np.linalg.norm(error[good & valid], axis=1).max()),
        "beam_off": bool(not valid[run.beam_off].any()),
        "ratio": per_axis / float(np.sqrt(np.mean(sigma[good] ** 2))),
        "flagged": int((~valid).sum()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(300, 306), metavar=("FIRST", "STOP"))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--frames", type=int, default=200)
    parser.add_argument("--counts", type=float, nargs="+", default=(2000.0, 200.0))
    args = parser.parse_args(argv)
    rows = []
    print(f"{'seed':>5} {'counts':>7} {'rms px':>8} {'max valid':>9} {'beam-off':>8} {'ratio':>6} {'flagged':>7}")
    for seed in range(*args.seeds):
        for counts in args.counts:
            run = make_run(args.frames, (args.size, args.size), seed=seed, counts=counts)
            with tempfile.TemporaryDirectory() as folder:
                figures = score(run, correct_through_cli(run, Path(folder)))
            rows.append((counts, figures))
            print(f"{seed:>5} {counts:>7.0f} {figures['rms']:>8.4f} {figures['max_valid']:>9.3f} "
                  f"{str(figures['beam_off']):>8} {figures['ratio']:>6.2f} {figures['flagged']:>7}", flush=True)
    for counts in args.counts:
        chosen = [f for c, f in rows if c == counts]
        ratios = np.array([f["ratio"] for f in chosen])
        print(f"counts {counts:.0f}: worst rms {max(f['rms'] for f in chosen):.4f} px, worst max_valid "
              f"{max(f['max_valid'] for f in chosen):.3f} px, beam-off always flagged "
              f"{all(f['beam_off'] for f in chosen)}, ratio {ratios.min():.2f}-{ratios.max():.2f} "
              f"(geometric mean {np.exp(np.log(ratios).mean()):.2f}), in [0.67, 1.5]: "
              f"{int(((ratios >= 0.67) & (ratios <= 1.5)).sum())}/{len(ratios)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
