"""Shared fixtures: a synthetic run with known drift, written as Zarr inputs; Dask scheduler helpers.

Plain helper functions (exact subpixel-shifted test images, RMS error) live in ``tests/helpers.py``.
"""

from __future__ import annotations

import dask
import numpy as np
import pytest

from driftcorr import store
from driftcorr.synthetic import SyntheticRun, make_run

from .helpers import ComputeCounter


@pytest.fixture(scope="session")
def drift_run() -> SyntheticRun:
    """A realistic synthetic run with known drift: 40 frames of 128², beam-block, defects, a jump, one beam-off
    and one cosmic-ray frame."""
    return make_run(40, (128, 128), seed=1)


@pytest.fixture(scope="session")
def drift_stack(drift_run: SyntheticRun) -> np.ndarray:
    """The rendered frames of :func:`drift_run` (uint16, read-only)."""
    stack = drift_run.stack()
    stack.setflags(write=False)
    return stack


@pytest.fixture(scope="session")
def small_run() -> SyntheticRun:
    """A short, small synthetic run for the input/output plumbing tests: 16 frames of 64²."""
    return make_run(16, (64, 64), seed=6)


@pytest.fixture(scope="session")
def stored_inputs(tmp_path_factory, drift_run: SyntheticRun, drift_stack: np.ndarray) -> dict:
    """:func:`drift_run` written once as a Zarr v3 array, a v2 array and a v3 group holding it; its mask as files.

    Tests must not modify these (they are shared by the session).
    """
    import imageio.v3 as iio
    import tifffile
    import zarr

    root = tmp_path_factory.mktemp("inputs")
    paths = {
        "v3": store.write_stack(drift_stack, root / "raw_v3.zarr", block_frames=8),
        "v2": store.write_stack(drift_stack, root / "raw_v2.zarr", block_frames=8, zarr_format=2),
    }
    group = zarr.open_group(root / "raw_group.zarr", mode="w", zarr_format=3)
    array = group.create_array("frames", shape=drift_stack.shape, dtype=drift_stack.dtype,
                               chunks=(8, *drift_stack.shape[1:]))
    array[...] = drift_stack
    group.create_array("dark", shape=drift_stack.shape[1:], dtype="float32")  # 2-D: not a stack
    paths["group"] = str(root / "raw_group.zarr")
    mask = drift_run.mask
    np.save(root / "mask.npy", mask)
    tifffile.imwrite(root / "mask.tif", mask.astype(np.uint8) * 7)  # nonzero = valid
    iio.imwrite(root / "mask.png", mask.astype(np.uint8) * 255)
    paths.update(npy=str(root / "mask.npy"), tif=str(root / "mask.tif"), png=str(root / "mask.png"))
    return paths


@pytest.fixture
def synchronous_dask():
    """Run Dask graphs in the test's thread (deterministic, easy to debug)."""
    with dask.config.set(scheduler="synchronous"):
        yield


@pytest.fixture
def compute_counter():
    """Use a counting synchronous scheduler for the test; yields the counter (``.calls``)."""
    counter = ComputeCounter()
    with dask.config.set(scheduler=counter):
        yield counter


@pytest.fixture
def cli():
    """``cli(*args)``: run the command line in-process; returns click's Result (stdout and stderr apart)."""
    from click.testing import CliRunner

    from driftcorr.cli import main

    runner = CliRunner()

    def invoke(*args):
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)

    return invoke
