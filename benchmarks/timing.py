"""Shared timing helper of the benchmark scripts (run from the repository root: ``benchmarks/`` is on the path)."""

from __future__ import annotations

import time


def best_seconds(function, repeats: int = 3) -> float:
    """The shortest wall time of ``repeats`` calls of ``function``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best
