"""Work ahead of the caller: results in order, bounded how far ahead, errors at their place."""

from __future__ import annotations

import threading
import weakref

import pytest

from fedtune.aggregation.ahead import ahead


def test_results_come_in_order_whatever_order_the_work_finishes_in() -> None:
    second_done = threading.Event()

    def fn(i: int) -> int:
        if i == 0:  # the first item finishes only after the second has
            assert second_done.wait(timeout=30)
        if i == 1:
            second_done.set()
        return i * i

    assert list(ahead(range(6), fn, depth=2, workers=2)) == [0, 1, 4, 9, 16, 25]


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_work_starts_at_most_depth_items_ahead_of_the_caller(depth: int) -> None:
    received = 0
    started: list[int] = []

    def fn(i: int) -> int:
        started.append(i)
        # Item i starts only as item i − depth is handed over: the caller holds all before that one.
        assert i <= received + depth, (i, received)
        return i

    for got in ahead(range(30), fn, depth=depth):
        assert got == received
        received += 1
    assert sorted(started) == list(range(30))


class Result:
    """Stands for a decoded update: something large whose lifetime is what memory is."""


def test_at_most_depth_plus_two_results_exist_at_once() -> None:
    alive: set[int] = set()
    peak = 0
    lock = threading.Lock()

    def fn(i: int) -> Result:
        nonlocal peak
        r = Result()
        with lock:
            alive.add(i)
            peak = max(peak, len(alive))
        weakref.finalize(r, alive.discard, i)
        return r

    for _ in ahead(range(40), fn, depth=2):
        pass
    assert peak <= 4


def test_an_error_is_raised_at_its_items_place_and_stops_the_work() -> None:
    started: list[int] = []

    def fn(i: int) -> int:
        started.append(i)
        if i == 3:
            raise ValueError("item 3")
        return i

    got: list[int] = []
    with pytest.raises(ValueError, match="item 3"):
        for x in ahead(range(100), fn, depth=2):
            got.append(x)
    assert got == [0, 1, 2]
    assert max(started) <= 3 + 2


def test_closing_early_leaves_no_work_behind() -> None:
    started: list[int] = []

    def fn(i: int) -> int:
        started.append(i)
        return i

    it = ahead(range(100), fn, depth=3)
    assert [next(it), next(it)] == [0, 1]
    it.close()
    assert max(started) <= 1 + 3  # nothing beyond what was running when the caller stopped
    assert not [t for t in threading.enumerate() if t.name.startswith("fedtune-ahead")]
