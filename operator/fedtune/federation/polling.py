"""Waiting on storage: poll with backoff, and a deadline where the caller has one."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from fedtune.errors import FedtuneError

T = TypeVar("T")


def poll(check: Callable[[], T | None], timeout: float | None = None, what: str = "condition") -> T:
    """Call check until it returns something other than None, backing off from 50 ms to 1 s."""
    start = time.monotonic()
    interval = 0.05
    while True:
        got = check()
        if got is not None:
            return got
        if timeout is not None and time.monotonic() - start > timeout:
            raise FedtuneError(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(interval)
        interval = min(interval * 1.5, 1.0)
