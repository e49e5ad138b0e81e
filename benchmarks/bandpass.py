"""Does the optional band-pass help? RMS error with and without it on low-count synthetic runs.

Run from the repository root::

    .venv/bin/python benchmarks/bandpass.py                  # seeds 31-32, counts 20 and 200, 120 frames of 256²

Each run is ``make_run(120, (256, 256), seed, counts)`` corrected in memory with ``estimate_drift`` and the
beam-block mask, with the default options and with ``bandpass`` set to each pair of scales below. Printed per cell:
the RMS length of the error vector over all frames but the beam-off ones, against the truth relative to the
output's reference frame, and after the slash the RMS length of the reported ``sigma`` (what a run could judge by
itself) over the same frames.
"""

from __future__ import annotations

import argparse

import numpy as np

from driftcorr import estimate_drift
from driftcorr.synthetic import make_run

SCALES = (None, (1.0, None), (1.0, 12.0), (1.5, 12.0), (0.7, 8.0))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs=2, default=(31, 33), metavar=("FIRST", "STOP"))
    parser.add_argument("--counts", type=float, nargs="+", default=(20.0, 200.0))
    parser.add_argument("--frames", type=int, default=120)
    args = parser.parse_args(argv)
    print(f"{'seed':>5} {'counts':>7} " + " ".join(f"{str(s):>13}" for s in SCALES))
    for seed in range(*args.seeds):
        for counts in args.counts:
            run = make_run(args.frames, (256, 256), seed=seed, counts=counts)
            stack = run.stack()
            good = ~run.beam_off
            cells = []
            for scales in SCALES:
                ds = estimate_drift(stack, mask=run.beam_block, bandpass=scales)
                error = ds["shift"].values - run.true_shifts(int(ds.attrs["reference_frame"]))
                rms = float(np.sqrt(np.mean(np.sum(error[good] ** 2, axis=1))))
                reported = float(np.sqrt(np.mean(np.sum(ds["sigma"].values[good] ** 2, axis=1))))
                cells.append(f"{rms:.4f}/{reported:.4f}")
            print(f"{seed:>5} {counts:>7.0f} " + " ".join(f"{c:>13}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
