"""Which compressor for the output's frame stacks: write/read time and size of a block of frames, per codec.

Run from the repository root::

    .venv/bin/python benchmarks/compressors.py          # 16 frames of 512², raw uint16 and corrected float32

The frames are a realistic synthetic run (:func:`driftcorr.synthetic.make_run`) and the same frames shifted by
their drift (:func:`driftcorr.warp.shift_frames`, float32 with NaN outside), written as one chunk to an in-memory
Zarr v3 store; best of 3, ms per frame, one thread.
"""

from __future__ import annotations

import argparse

import zarr
from timing import best_seconds
from zarr.codecs import BloscCodec, ZstdCodec

from driftcorr.synthetic import make_run
from driftcorr.warp import shift_frames

CODECS = {
    "zstd level 1": [ZstdCodec(level=1)],
    "zstd level 3": [ZstdCodec(level=3)],
    "blosc lz4 shuffle": [BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")],
    "blosc zstd1 shuffle": [BloscCodec(cname="zstd", clevel=1, shuffle="shuffle")],
    "none": None,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--frames", type=int, default=16)
    args = parser.parse_args(argv)
    run = make_run(args.frames, (args.size, args.size), seed=0)
    raw = run.stack()
    corrected = shift_frames(raw, run.true_shifts(0))
    print(f"{'data':16} {'codec':20} {'write ms/frame':>14} {'read ms/frame':>13} {'size':>6}")
    for name, data in (("raw uint16", raw), ("corrected f32", corrected)):
        for label, codec in CODECS.items():
            store = zarr.storage.MemoryStore()
            array = zarr.create_array(store, shape=data.shape, chunks=data.shape, dtype=data.dtype,
                                      compressors=codec, fill_value=0)

            def write(array=array, data=data):
                array[...] = data

            write_s = best_seconds(write)
            read_s = best_seconds(lambda array=array: array[...])
            stored = sum(len(value) for key, value in store._store_dict.items() if not key.endswith("zarr.json"))
            print(f"{name:16} {label:20} {write_s / args.frames * 1e3:>14.2f} {read_s / args.frames * 1e3:>13.2f} "
                  f"{stored / data.nbytes:>6.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
