"""A round's updates are all checked, and every rejection recorded, before a strategy sees one; a
strategy that needs all updates at once reads them from a private spool, each read once from storage."""

from __future__ import annotations

import stat
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

from fedtune.aggregation import ClientUpdate, State, Strategy
from fedtune.aggregation.encoding import encode
from fedtune.aggregation.spool import SpooledDelta
from fedtune.api import FederatedFineTuneSpec, parse_resource
from fedtune.federation import protocol as p
from fedtune.federation.aggregator import Aggregator
from fedtune.federation.signing import AGGREGATOR
from fedtune.storage.memory import MemoryStore
from fedtune.training.model import adapter_state
from tests.federation.conftest import tiny_resource, write_data
from tests.federation.parties import Parties, submit_update


class Spy(Strategy):
    """The aggregator's own strategy, noting before each attempt which rejection records exist (and what
    `watch` sees), and which updates it is given."""

    def __init__(self, inner: Strategy, agg: Aggregator, gm: p.GlobalMarker, watch: Callable[[], object]) -> None:
        super().__init__(inner.spec)
        self.inner, self.agg, self.gm, self.watch = inner, agg, gm, watch
        self.single_pass = inner.single_pass
        self.recorded: list[set[str]] = []
        self.watched: list[object] = []
        self.given: list[list[str]] = []
        self.lazy: list[bool] = []

    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        self.recorded.append({c for c in self.gm.selected if self._rejected(c)})
        self.watched.append(self.watch())
        given: list[str] = []
        self.given.append(given)

        def noted() -> Iterable[ClientUpdate]:
            for u in updates:
                given.append(u.client)
                self.lazy.append(isinstance(u.delta, SpooledDelta))
                yield u

        return self.inner.aggregate(global_state, noted(), server_state)

    def _rejected(self, client: str) -> bool:
        return self.agg.ledger.read(p.rejection(self.gm.round, client), p.Rejection, AGGREGATOR) is not None


class Rereads(MemoryStore):
    """Counts reads of update objects; from the second read on, answers for `changes` with other bytes."""

    reads: dict[str, int]
    changes: dict[str, bytes]

    def size(self, key: str) -> int:  # a HEAD, not a read
        return len(super().get(key))

    def get(self, key: str) -> bytes:
        if key.startswith(p.CLIENTS) and key.endswith(".safetensors"):
            self.reads[key] = self.reads.get(key, 0) + 1
            client = key.split("/")[1]
            if self.reads[key] > 1 and client in self.changes:
                return self.changes[client]
        return super().get(key)


def spec_for(data: Path, strategy: str) -> FederatedFineTuneSpec:
    doc = tiny_resource(data, aggregation={"strategy": strategy, "minClients": 2, "roundTimeoutSeconds": 60})
    return parse_resource(doc).spec


def play(
    data: Path,
    name: str,
    strategy: str,
    scales: dict[str, float],
    changes: dict[str, float] | None = None,
    watch: Callable[[], object] = lambda: None,
) -> tuple[Aggregator, Spy, Rereads, State, State]:
    """Round 0 with each client sending a constant delta of its scale (nan: rejected); returns the old
    and new global."""
    store = Rereads(name, "run")
    store.reads = {}
    parties = Parties(spec_for(data, strategy))
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    state, _ = agg.load_global(gm)
    for client in gm.selected:
        submit_update(parties.client(store, client), gm, client, encode(_delta(agg, state, scales[client])))
    store.changes = {c: encode(_delta(agg, state, s)) for c, s in (changes or {}).items()}
    spy = Spy(agg.strategy, agg, gm, watch)
    agg.strategy = spy
    agg.close_round(gm)
    new, _ = agg.load_global(agg.read_global_marker(1))
    return agg, spy, store, state, new


def _delta(agg: Aggregator, state: State, scale: float) -> State:
    return {k: torch.full_like(state[k], scale) for k in agg.trainable}


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_data(tmp_path)
    return tmp_path


def test_rejections_are_recorded_before_the_strategy_starts_and_it_sees_accepted_updates_only(data: Path) -> None:
    agg, spy, store, old, new = play(data, "checks", "fedavg", {"alpha": 0.01, "beta": float("nan"), "gamma": 0.03})
    assert spy.recorded == [{"beta"}]
    assert spy.given == [["alpha", "gamma"]]
    summary = agg.ledger.summary(0)
    assert summary is not None and summary.participants == ["alpha", "gamma"]
    for k in agg.trainable:
        torch.testing.assert_close(new[k], old[k] + 0.02, rtol=0, atol=1e-6)
    # A single-pass strategy reads each accepted update once more from storage, as it adds them.
    assert sorted(store.reads.values()) == [1, 2, 2]


def test_an_update_changed_after_its_check_is_rejected_and_the_round_aggregated_afresh_without_it(
    data: Path,
) -> None:
    scales = {"alpha": 0.01, "beta": 0.02, "gamma": 0.03}
    agg, spy, _, old, new = play(data, "changed", "fedavg", scales, changes={"beta": 5.0})
    assert spy.recorded == [set(), {"beta"}]
    assert spy.given == [["alpha"], ["alpha", "gamma"]]  # the first attempt stopped before beta reached it
    summary = agg.ledger.summary(0)
    assert summary is not None and summary.participants == ["alpha", "gamma"]
    assert "changed after it was accepted" in {r.client: r.reason for r in summary.rejected}["beta"]
    for k in agg.trainable:
        torch.testing.assert_close(new[k], old[k] + 0.02, rtol=0, atol=1e-6)


def test_a_robust_strategy_reads_each_update_once_and_then_from_a_private_spool(
    data: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    def spool() -> tuple[int, int]:
        (folder,) = tmp_path.glob("fedtune-spool-*")
        return stat.S_IMODE(folder.stat().st_mode), len(list(folder.iterdir()))

    scales = {"alpha": 0.01, "beta": 0.05, "gamma": 0.02}
    agg, spy, store, old, new = play(data, "robust", "fedmedian", scales, watch=spool)
    assert spy.watched == [(0o700, 3)]  # while the strategy ran: a private folder, one file per update
    assert not list(tmp_path.glob("fedtune-spool-*"))  # and gone after the round
    assert spy.lazy == [True, True, True]
    assert sorted(store.reads.values()) == [1, 1, 1]
    for k in agg.trainable:
        torch.testing.assert_close(new[k], old[k] + 0.02, rtol=0, atol=1e-6)
