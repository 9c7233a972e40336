"""`python -m bench.profiled ARGS`: `fedtune ARGS` with every thread's CPU time profiled.

kopf runs synchronous handlers in a thread pool, so a profile of the main thread alone would miss the
operator's work. Each thread gets its own cProfile on `time.thread_time` (CPU, not waiting); at exit
the profiles are merged into the file named by FEDTUNE_PROFILE, for pstats.
"""

from __future__ import annotations

import atexit
import cProfile
import os
import pstats
import sys
import threading
import time
from typing import Any

from fedtune.cli.main import main

_profiles: list[cProfile.Profile] = []
_lock = threading.Lock()


def _start(*_: Any) -> None:
    """The first profiling event of a new thread: swap this hook for a profiler of its own."""
    profile = cProfile.Profile(time.thread_time)
    with _lock:
        _profiles.append(profile)
    profile.enable()


def _dump(path: str) -> None:
    stats = pstats.Stats()
    with _lock:
        for profile in _profiles:
            profile.disable()
            stats.add(profile)
    stats.dump_stats(path)


if __name__ == "__main__":
    threading.setprofile(_start)
    atexit.register(_dump, os.environ["FEDTUNE_PROFILE"])
    _start()
    sys.argv = ["fedtune", *sys.argv[1:]]
    main()
