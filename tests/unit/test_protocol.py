"""Finding the latest committed global with existence checks alone: clients may not list the bucket."""

from __future__ import annotations

import pytest

from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.storage.memory import MemoryStore
from tests.unit.runs import AGGREGATOR_SIGNER, TRUST


class CountingStore(MemoryStore):
    lists = 0
    heads = 0

    def list(self, prefix: str = "") -> list[str]:
        self.lists += 1
        return super().list(prefix)

    def exists(self, key: str) -> bool:
        self.heads += 1
        return super().exists(key)


def ledger_with(name: str, rounds: int) -> tuple[Ledger, CountingStore]:
    s = CountingStore(name)
    ledger = Ledger(s, TRUST, AGGREGATOR_SIGNER)
    for r in range(rounds):
        ledger.commit(
            p.global_marker(r), p.GlobalMarker(round=r, sha256="0" * 64, selected=[], deadline=0, epoch=1, created=0)
        )
    s.heads = 0
    return ledger, s


@pytest.mark.parametrize("rounds", [0, 1, 2, 3, 4, 5, 17, 64, 100])
def test_the_latest_global_is_found_without_listing(rounds: int) -> None:
    ledger, store = ledger_with(f"r{rounds}", rounds)
    assert ledger.latest_global() == (rounds - 1 if rounds else None)
    assert store.lists == 0
    # Doubling then bisecting: logarithmic in the number of rounds, not linear.
    assert store.heads <= 2 * max(rounds, 1).bit_length() + 2


def test_a_marker_that_does_not_verify_is_not_the_latest(request: pytest.FixtureRequest) -> None:
    """Forged markers past the real ones (a bucket without the policy) do not move any reader forward."""
    ledger, store = ledger_with(request.node.name, 3)
    for r in (3, 4, 9):
        store.put(p.global_marker(r), b'{"round": 9}')
    assert ledger.latest_global() == 2
    assert ledger.latest_global(hint=1) == 2


def test_a_hint_steps_forward(request: pytest.FixtureRequest) -> None:
    ledger, store = ledger_with(request.node.name, 4)
    assert ledger.latest_global(hint=1) == 3
    assert ledger.latest_global(hint=3) == 3
    assert ledger.latest_global(hint=7) == 3
    assert ledger.latest_global(hint=-1) == 3
    assert store.lists == 0
