"""Kernels that use a few threads for the set-up give the same result on any number of them."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from driftcorr.defects import detect_defects
from driftcorr.reference import iterative_reference, pairs_reference
from driftcorr.synthetic import make_run
from driftcorr.threads import map_in_threads


def test_map_in_threads_keeps_order_and_bounds_the_work_in_flight():
    lock = threading.Lock()
    running, most, threads = 0, 0, set()

    def work(i):
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            threads.add(threading.get_ident())
        time.sleep(0.002 * ((7 * i) % 5))  # finish out of order
        with lock:
            running -= 1
        return i * i

    assert list(map_in_threads(work, range(20), workers=3)) == [i * i for i in range(20)]
    assert most <= 3 and len(threads) >= 2
    threads.clear()
    assert list(map_in_threads(work, range(5), workers=1)) == [i * i for i in range(5)]
    assert threads == {threading.get_ident()}


def test_errors_reach_the_caller():
    def work(i):
        if i == 3:
            raise ValueError("frame 3")
        return i

    with pytest.raises(ValueError, match="frame 3"):
        list(map_in_threads(work, range(6), workers=2))


@pytest.fixture(scope="module")
def sample():
    run = make_run(120, (128, 128), seed=5)
    return run, run.stack()[::4]


def test_defects_and_references_do_not_depend_on_the_threads(sample):
    run, frames = sample
    results = []
    for workers in (1, 2, 3):
        defects = detect_defects(frames, run.beam_block, workers=workers)
        iterative = iterative_reference(frames, defects.mask, workers=workers)
        pairs = pairs_reference(frames, defects.mask, workers=workers)
        results.append((defects.codes, iterative.image, iterative.mask, pairs.image, pairs.mask))
    assert results[0][1].std() > 0 and results[0][3].std() > 0
    for other in results[1:]:
        for expected, got in zip(results[0], other, strict=True):
            np.testing.assert_array_equal(got, expected)
