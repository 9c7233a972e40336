"""Waiting on storage: poll with backoff, and a deadline where the caller has one.

Every wait in a round is for a commit that is due (the next global, the missing updates), and each
hand-off delays the whole round by up to one interval plus one check, so the backoff is capped low:
0.15 s by default (FEDTUNE_POLL_SECONDS), which keeps a hand-off within 0.2 s. A check that itself
takes long (many objects to read) is spaced out further, up to 1 s, so a waiting party keeps storage
busy at most a quarter of the time.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import TypeVar

from fedtune.errors import FedtuneError

T = TypeVar("T")

log = logging.getLogger("fedtune.polling")

FIRST_SECONDS = 0.05
GROWTH = 1.5
DEFAULT_CAP_SECONDS = 0.15
# A slow check is followed by a sleep of this many times its duration, up to SPACED_CAP_SECONDS.
BUSY_FACTOR = 3.0
SPACED_CAP_SECONDS = 1.0


def cap_seconds() -> float:
    """The longest sleep between two cheap checks."""
    return float(os.environ.get("FEDTUNE_POLL_SECONDS", DEFAULT_CAP_SECONDS))


def poll(
    check: Callable[[], T | None],
    timeout: float | None = None,
    what: str = "condition",
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call check until it returns something other than None, backing off from 50 ms to the cap.

    The wait is logged when it ends, so a run's logs show how long each party waited and how often it asked.
    """
    cap = cap_seconds()
    start = clock()
    interval = FIRST_SECONDS
    checks = 0
    while True:
        began = clock()
        got = check()
        checks += 1
        now = clock()
        if got is not None:
            log.info("waited %.3fs for %s (%d checks)", now - start, what, checks)
            return got
        if timeout is not None and now - start > timeout:
            raise FedtuneError(f"timed out after {timeout:g}s waiting for {what}")
        sleep(max(interval, min(BUSY_FACTOR * (now - began), SPACED_CAP_SECONDS)))
        interval = min(interval * GROWTH, cap)
