"""What the final residual step costs: ``register_frames`` with it and with it stubbed out, and ``make_plan``;
and what shifting the registered frames costs (``shift_frames``, cubic, float32).

Run from the repository root::

    .venv/bin/python benchmarks/step_cost.py            # 512², 32 frames in blocks of 16, one thread

Timings are the best of 3, in ms per frame (``make_plan``: ms per plan), on one thread (BLAS pinned, FFT
``workers=1``). The stub returns the shifts unchanged and no uncertainty, so the difference is the whole cost of
:func:`driftcorr.residual.residual_step` (the step and sigma).
"""

from __future__ import annotations

import argparse

import numpy as np
from threadpoolctl import threadpool_limits
from timing import best_seconds

import driftcorr.registration as registration
from driftcorr.synthetic import make_run
from driftcorr.warp import shift_frames


def _best_ms(function) -> float:
    return best_seconds(function) * 1e3


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=32)
    parser.add_argument("--block", type=int, default=16)
    args = parser.parse_args(argv)
    run = make_run(args.frames, (args.size, args.size), seed=1)
    stack = run.stack().astype(np.float32)
    with threadpool_limits(1):
        plan = registration.make_plan(stack[0], reference_mask=run.mask)

        def register_all():
            for start in range(0, args.frames, args.block):
                registration.register_frames(plan, stack[start:start + args.block], workers=1)

        with_step = _best_ms(register_all) / args.frames
        blocks = [(stack[start:start + args.block], registration.register_frames(plan, stack[start:start + args.block],
                                                                                 workers=1).shift)
                  for start in range(0, args.frames, args.block)]
        shift_ms = _best_ms(lambda: [shift_frames(frames, shifts) for frames, shifts in blocks]) / args.frames
        original = registration.residual_step
        registration.residual_step = lambda basis, spectra, masks, shift, ok, pad, **_: (shift, np.full_like(shift,
                                                                                                         np.nan))
        try:
            without_step = _best_ms(register_all) / args.frames
        finally:
            registration.residual_step = original
        plan_ms = _best_ms(lambda: registration.make_plan(stack[0], reference_mask=run.mask))
        plain_plan_ms = _best_ms(lambda: registration.make_plan(stack[0], reference_mask=run.mask,
                                                                radial_intensity=False))
    print(f"{args.size}², {args.frames} frames in blocks of {args.block}, one thread")
    print(f"register_frames with the step     {with_step:7.1f} ms/frame")
    print(f"register_frames, step stubbed out {without_step:7.1f} ms/frame")
    print(f"shift_frames (cubic)              {shift_ms:7.1f} ms/frame")
    print(f"make_plan                         {plan_ms:7.0f} ms ({plain_plan_ms:.0f} without the symmetry centre)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
