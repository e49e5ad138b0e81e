"""Independent pieces of a kernel on a few threads (pure Python).

The heavy work of the kernels is in NumPy, SciPy and the FFTs, which release the GIL, so threads run it in
parallel; results come back in order, so a kernel that combines them in that order gives the same result on any
number of threads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor


def map_in_threads(function: Callable, items: Iterable, workers: int = 1) -> Iterator:
    """``function(item)`` for each item, on up to ``workers`` threads, yielded in the order of ``items``.

    At most ``workers`` items are in progress or waiting to be taken, so memory does not grow with ``items``.

    Parameters
    ----------
    function : callable
        Applied to each item.
    items : iterable
        The items.
    workers : int
        Threads; 1 (or less) runs everything in the calling thread.

    Yields
    ------
    object
        ``function(item)``, in order.
    """
    items = iter(items)
    if workers <= 1:
        yield from map(function, items)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending = []
        for item in items:
            pending.append(pool.submit(function, item))
            if len(pending) >= workers:
                yield pending.pop(0).result()
        for future in pending:
            yield future.result()
