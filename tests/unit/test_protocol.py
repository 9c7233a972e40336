"""Finding the latest committed global: by listing, or by stepping forward from a known round."""

from __future__ import annotations

import pytest

from fedtune.federation import protocol as p
from fedtune.storage.memory import MemoryStore


class CountingStore(MemoryStore):
    lists = 0

    def list(self, prefix: str = "") -> list[str]:
        self.lists += 1
        return super().list(prefix)


@pytest.fixture
def store(request: pytest.FixtureRequest) -> CountingStore:
    s = CountingStore(request.node.name)
    for r in range(4):
        s.put(p.global_marker(r), b"{}")
        s.put(p.update_marker(r, "a"), b"{}")
    return s


def test_listing_finds_the_highest_round(store: CountingStore) -> None:
    assert p.latest_global(store) == 3
    assert p.latest_global(CountingStore("empty")) is None


def test_a_hint_steps_forward_without_listing(store: CountingStore) -> None:
    assert p.latest_global(store, hint=1) == 3
    assert p.latest_global(store, hint=3) == 3
    assert store.lists == 0


def test_a_hint_that_is_not_committed_falls_back_to_listing(store: CountingStore) -> None:
    assert p.latest_global(store, hint=7) == 3
    assert p.latest_global(store, hint=-1) == 3
    assert store.lists == 2
