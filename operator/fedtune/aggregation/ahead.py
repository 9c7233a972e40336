"""Work on the next items while the caller uses the current one, in bounded memory.

Reading an update is mostly waiting on storage and hashing, both of which release the GIL, so a few
threads overlap it with the caller's own work. Results come back in the items' order, and work on
item j starts only as item j − depth is handed to the caller, so at most depth + 2 results exist at a
time however many items there are: the caller's previous one until it lets go, the one it is handed,
and `depth` ahead.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections import deque
from collections.abc import Callable, Generator, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from itertools import islice
from typing import TypeVar

from fedtune.tensors import single_threaded

T = TypeVar("T")
R = TypeVar("R")

#: Threads: one update is read and hashed on one core while another is on the second, the two cores an
#: aggregator is given at most; more would only wait on storage or on each other.
WORKERS = 2

_M_ARENA_MAX = -8  # glibc's mallopt parameter


def share_one_heap() -> None:
    """Have every thread of this process allocate from glibc's main arena.

    An update is read into a fresh buffer of tens of MB. glibc gives each thread an arena of its own,
    whose heaps cannot hold such a buffer, so on a pool thread every read maps new pages and faults them
    in: about two thirds of the read. From the main arena, as on the main thread, a read reuses the pages
    that earlier tensors freed. A no-op where the C library is not glibc.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(_M_ARENA_MAX, 1)


def ahead(
    items: Iterable[T], fn: Callable[[T], R], depth: int = WORKERS, workers: int = WORKERS
) -> Generator[R, None, None]:
    """fn(item) for each item, in order, computed on `workers` threads up to `depth` items ahead.

    An exception fn raises is raised here, at its item's place. Closing the iterator early cancels the
    items not yet started and waits for those running.
    """
    if depth < 1:
        raise ValueError(f"depth must be at least 1, not {depth}")
    source = iter(items)

    def run(item: T) -> R:
        with single_threaded():  # torch's thread count is per thread here: the cores are ours already
            return fn(item)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedtune-ahead") as pool:
        started: deque[Future[R]] = deque(pool.submit(run, x) for x in islice(source, depth))
        try:
            while started:
                head = started.popleft()
                started.extend(pool.submit(run, x) for x in islice(source, 1))
                yield head.result()
        finally:
            for f in started:
                f.cancel()
