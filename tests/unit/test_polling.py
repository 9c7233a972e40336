"""Waiting on storage: how often a waiting party asks, and how much each ask costs."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.client import _newer
from fedtune.federation.polling import poll
from fedtune.federation.records import Ledger
from fedtune.storage.memory import MemoryStore
from tests.unit.runs import AGGREGATOR_SIGNER, TRUST


class Clock:
    """A fake monotonic clock: sleeping advances it, and each check may take simulated time."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def ready_after(clock: Clock, checks: int, cost: float = 0.0) -> Callable[[], str | None]:
    """A check that takes `cost` seconds and succeeds on its `checks`-th call."""
    calls = 0

    def check() -> str | None:
        nonlocal calls
        calls += 1
        clock.now += cost
        return "done" if calls == checks else None

    return check


def test_backs_off_from_50ms_to_the_cap_so_a_commit_is_seen_within_0_2s(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("FEDTUNE_POLL_SECONDS", raising=False)
    clock = Clock()
    assert poll(ready_after(clock, 7), clock=clock, sleep=clock.sleep) == "done"
    assert clock.sleeps == pytest.approx([0.05, 0.075, 0.1125, 0.15, 0.15, 0.15])


def test_the_cap_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FEDTUNE_POLL_SECONDS", "1")
    clock = Clock()
    poll(ready_after(clock, 12), clock=clock, sleep=clock.sleep)
    assert clock.sleeps[-3:] == pytest.approx([1.0, 1.0, 1.0])


def test_a_slow_check_is_spaced_out_so_storage_is_busy_at_most_a_quarter_of_the_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("FEDTUNE_POLL_SECONDS", raising=False)
    clock = Clock()
    poll(ready_after(clock, 4, cost=0.1), clock=clock, sleep=clock.sleep)
    assert clock.sleeps == pytest.approx([0.3, 0.3, 0.3])
    clock = Clock()
    poll(ready_after(clock, 3, cost=2.0), clock=clock, sleep=clock.sleep)
    assert clock.sleeps == pytest.approx([1.0, 1.0]), "never spaced further than 1 s"


def test_times_out_naming_what_it_waited_for() -> None:
    clock = Clock()
    with pytest.raises(FedtuneError, match=r"timed out after 2s waiting for updates of round 3"):
        poll(lambda: None, timeout=2, what="updates of round 3", clock=clock, sleep=clock.sleep)
    assert 2 < clock.now < 2.5


class Counting(MemoryStore):
    """A store that counts the requests a waiting client makes."""

    requests = 0

    def exists(self, key: str) -> bool:
        self.requests += 1
        return super().exists(key)

    def get_at_most(self, key: str, limit: int) -> bytes:
        self.requests += 1
        return super().get_at_most(key, limit)


def commit_global(ledger: Ledger, r: int) -> None:
    marker = p.GlobalMarker(round=r, sha256="0" * 64, selected=["clinic"], deadline=0.0, epoch=1, created=0.0)
    ledger.commit(p.global_marker(r), marker)


def test_a_client_waiting_for_the_next_global_makes_one_request_per_check(request: pytest.FixtureRequest) -> None:
    store = Counting(request.node.name, "run")
    ledger = Ledger(store, TRUST, AGGREGATOR_SIGNER)
    for r in range(3):
        commit_global(ledger, r)
    assert _newer(ledger, 2) is None
    assert store.requests == 1
    commit_global(ledger, 3)
    assert _newer(ledger, 2) == 3
    assert _newer(ledger, -1) == 3
