"""A corpus of hostile updates: each is rejected with its reason, never crashes the aggregator, costs
no more memory than an honest round, is not read again after a restart, and leaves the global exactly
what the honest updates alone give."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as st_save

from fedtune.aggregation.encoding import encode
from fedtune.api import FederatedFineTuneSpec, parse_resource
from fedtune.federation import protocol as p
from fedtune.federation.aggregator import Aggregator, Collected
from fedtune.federation.signing import client_party
from fedtune.storage import ObjectStore, StorageError, open_store
from fedtune.storage.local_fs import FileStore
from fedtune.storage.memory import MemoryStore
from fedtune.training.model import adapter_state
from tests.federation.conftest import tiny_resource, write_data
from tests.federation.parties import Parties, submit_update

State = dict[str, torch.Tensor]
HONEST = {"honest-a": (0.01, 10), "honest-b": (-0.02, 30)}


def _claims_more(payload: bytes) -> bytes:
    (size,) = struct.unpack("<Q", payload[:8])
    return struct.pack("<Q", size + 10**6) + payload[8:]


# name -> (how its payload is made from an honest delta and payload, marker fields, expected reason)
CORPUS: dict[str, tuple[Callable[[State, bytes], bytes], dict[str, object], str]] = {
    "zero-weight": (lambda d, b: b, {"examples": 0}, "examples 0 outside 1.."),
    "huge-weight": (lambda d, b: b, {"examples": 10**12}, "outside 1.."),
    "huge-values": (lambda d, b: encode({k: torch.full_like(v, 3e38) for k, v in d.items()}), {}, "exceeds the bound"),
    "nan": (lambda d, b: encode({k: torch.full_like(v, float("nan")) for k, v in d.items()}), {}, "non-finite"),
    "wrong-dtype": (  # the same size as an honest update, so only the header tells
        lambda d, b: st_save({k: v.int() for k, v in d.items()}, metadata={"encoding": "fp32"}),
        {},
        "dtype I32, expected F32",
    ),
    "extra-key": (lambda d, b: encode({**d, "extra.weight": torch.zeros(1)}), {}, "unexpected key extra.weight"),
    "missing-key": (  # one tensor renamed: the same size, so only the header tells
        lambda d, b: encode({("renamed" if i == 0 else k): v for i, (k, v) in enumerate(d.items())}),
        {},
        "missing key",
    ),
    "oversized": (lambda d, b: b + bytes(9 * len(b)), {}, "bytes, an update of this adapter in fp32 has"),
    "truncated": (lambda d, b: b[: len(b) // 2], {}, "bytes, an update of this adapter in fp32 has"),
    "header-lies": (lambda d, b: _claims_more(b), {}, "header claims"),
    "other-global": (lambda d, b: b, {"global_sha256": "0" * 64}, "trained on global 000000000000…"),
    "shape-not-a-list": (
        lambda d, b: _header_edit(b, lambda h: {k: {**v, "shape": 5} for k, v in h.items()}),
        {},
        "shape 5",
    ),
    "deep-header": (lambda d, b: struct.pack("<Q", 2000) + b"[" * 2000 + b[2008:], {}, "bad header"),
    "huge-count": (lambda d, b: b, {"metrics": {"eval_examples": 10**400}}, "not a valid UpdateMarker"),
    "nan-loss": (lambda d, b: b, {"metrics": {"train_loss": float("inf")}}, "not a valid UpdateMarker"),
}


def _header_edit(payload: bytes, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> bytes:
    """The same tensors under an edited header (same length, padded with spaces as safetensors allows)."""
    (size,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + size])
    meta = header.pop("__metadata__", None)
    edited = edit(header)
    if meta is not None:
        edited["__metadata__"] = meta
    text = json.dumps(edited).encode()
    return payload[:8] + text.ljust(size) + payload[8 + size :]


def spec_for(data: Path, names: list[str]) -> FederatedFineTuneSpec:
    # An adapter of about 260 kB an update, so update bytes, not bookkeeping, set the memory peak.
    doc = tiny_resource(
        data,
        aggregation={"minClients": 2, "roundTimeoutSeconds": 600},
        peft={"r": 64, "alpha": 64},
        model={
            "config": {**tiny_resource(data)["spec"]["model"]["config"], "hidden_size": 256, "num_attention_heads": 4}
        },
    )
    doc["spec"]["clients"] = [{"name": n, "data": {"uri": str(data / "alpha.jsonl")}} for n in names]
    return parse_resource(doc).spec


def play_round(store: ObjectStore, spec: FederatedFineTuneSpec) -> tuple[Parties, State, State, int]:
    """Round 0 with every client of spec submitting; returns the old and new global and the peak bytes."""
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    state, _ = agg.load_global(gm)
    for name in gm.selected:
        scale, examples = HONEST.get(name, (0.01, 10))
        delta = {k: torch.full_like(state[k], scale) for k in agg.trainable}
        payload = encode(delta)
        make, fields, _ = CORPUS.get(name, (lambda d, b: b, {}, ""))
        stored = make(delta, payload)
        marker = submit_update(parties.client(store, name), gm, name, stored, examples=examples)
        if fields:  # a marker whose own fields lie: re-signed by the client, as a hostile client would
            key = p.update_marker(0, name)
            body = {**p.dumps(marker), **fields}
            store.put(key, parties.signers[client_party(name)].sign(key, body))
    tracemalloc.start()
    agg.close_round(gm)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    new, _ = agg.load_global(agg.read_global_marker(1))
    return parties, state, new, peak


@pytest.fixture
def data(tmp_path: Path) -> Path:
    write_data(tmp_path)
    return tmp_path


def test_every_hostile_update_is_rejected_and_the_global_is_the_honest_one(data: Path) -> None:
    honest_store = open_store("memory://hostile-baseline/run")
    _, _, honest_global, honest_peak = play_round(honest_store, spec_for(data, sorted(HONEST)))

    names = sorted([*HONEST, *CORPUS])
    store = open_store("memory://hostile/run")
    parties, old, new, peak = play_round(store, spec_for(data, names))

    ledger = parties.ledger(store)
    summary = ledger.summary(0)
    assert summary is not None
    assert summary.participants == sorted(HONEST)
    reasons = {r.client: r.reason for r in summary.rejected}
    for name, (_, _, expected) in CORPUS.items():
        assert expected in reasons[name], (name, reasons[name])
    # Exactly the example-weighted mean of the honest deltas, as in the run without attackers.
    mean = sum(scale * n for scale, n in HONEST.values()) / sum(n for _, n in HONEST.values())
    for k, v in new.items():
        if not torch.equal(v, old[k]):
            torch.testing.assert_close(v, old[k] + mean, rtol=0, atol=1e-6)
    assert all(torch.equal(new[k], honest_global[k]) for k in new)
    assert peak <= 2 * honest_peak, (peak, honest_peak)


class CountingStore(MemoryStore):
    """Counts reads of client update objects (a size look-up is a HEAD, not a read)."""

    reads: list[str]

    def size(self, key: str) -> int:
        return len(super().get(key))

    def get(self, key: str) -> bytes:
        if key.endswith(".safetensors") and key.startswith(p.CLIENTS):
            self.reads.append(key)
        return super().get(key)


def test_a_rejected_update_is_not_read_again_after_a_restart(data: Path) -> None:
    spec = spec_for(data, ["honest-a", "honest-b", "nan"])
    store = CountingStore("restart", "run")
    store.reads = []
    parties = Parties(spec)
    first = parties.aggregator(store)
    gm = first.publish_global(0, adapter_state(first.model), {})
    state, _ = first.load_global(gm)
    reference = {k: state[k] for k in first.trainable}
    submit_update(parties.client(store, "nan"), gm, "nan", CORPUS["nan"][0](reference, b""))
    first._check_new(gm, reference, Collected())
    assert len(store.reads) == 1

    store.reads.clear()
    restarted = Aggregator(parties.ledger(store), spec)  # a new process: it reads what was recorded
    seen = Collected()
    restarted._recorded_rejections(gm, seen)
    restarted._check_new(gm, reference, seen)
    assert "non-finite" in seen.rejected["nan"]
    assert store.reads == []


class FlakyStore(MemoryStore):
    """Fails every read of client updates while `down`, as a storage outage on the aggregator's side."""

    down = True

    def size(self, key: str) -> int:
        if self.down and key.startswith(p.CLIENTS):
            raise StorageError(f"{self.url(key)}: 503: service unavailable")
        return super().size(key)


def test_a_storage_error_on_the_aggregators_side_is_never_the_clients_fault(data: Path) -> None:
    spec = spec_for(data, ["honest-a", "honest-b"])
    store = FlakyStore("flaky", "run")
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    state, _ = agg.load_global(gm)
    reference = {k: state[k] for k in agg.trainable}
    for name in gm.selected:
        submit_update(parties.client(store, name), gm, name, encode({k: v * 0 for k, v in reference.items()}))
    seen = Collected()
    agg._check_new(gm, reference, seen)
    assert seen.rejected == {} and seen.accepted == {}  # unresolved: retried on the next poll
    store.down = False
    agg._check_new(gm, reference, seen)
    assert sorted(seen.accepted) == ["honest-a", "honest-b"] and seen.rejected == {}


def test_a_round_resumed_long_after_its_wall_clock_deadline_does_not_close_early(data: Path) -> None:
    """The round's time runs on the aggregator's own clock from when it began collecting."""
    doc = tiny_resource(data, aggregation={"minClients": 1, "roundTimeoutSeconds": 2})
    spec = parse_resource(doc).spec
    store = open_store("memory://resumed/run")
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    gm = gm.model_copy(update={"deadline": gm.deadline - 3600})  # as if the run had been down an hour
    state, _ = agg.load_global(gm)
    reference = {k: state[k] for k in agg.trainable}
    first = gm.selected[0]
    submit_update(parties.client(store, first), gm, first, encode({k: v * 0 for k, v in reference.items()}))
    started = time.monotonic()
    seen = agg.collect(gm, reference)
    assert time.monotonic() - started >= 2  # waited its own timeout for the others, not closed at once
    assert list(seen.accepted) == [first] and seen.timed_out


class GrowingStore(FileStore):
    """Answers a HEAD with the size an object had when its marker was written; the object then grew."""

    honest: dict[str, int]

    def size(self, key: str) -> int:
        return self.honest.get(key, super().size(key))


def test_an_object_that_grows_after_its_head_is_not_read_past_the_bound(data: Path, tmp_path: Path) -> None:
    spec = spec_for(data, ["honest-a", "honest-b"])
    store = GrowingStore(tmp_path / "growing")
    store.honest = {}
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    state, _ = agg.load_global(gm)
    reference = {k: state[k] for k in agg.trainable}
    payload = encode({k: v * 0 for k, v in reference.items()})
    marker = submit_update(parties.client(store, "honest-a"), gm, "honest-a", payload)
    key = p.update_data(0, "honest-a", marker.sha256)
    store.honest[key] = len(payload)
    with (store.root / key).open("ab") as f:
        f.write(bytes(64 << 20))
    tracemalloc.start()
    seen = Collected()
    agg._check_new(gm, reference, seen)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "more than" in seen.rejected["honest-a"], seen.rejected
    assert peak < 4 << 20  # no more than the bound was read of 64 MiB


def test_the_default_norm_bound_does_not_grow_with_the_global(data: Path) -> None:
    """Derived from round 0's global: an update at the bound cannot raise the next round's bound."""
    spec = spec_for(data, ["honest-a", "honest-b"])
    store = open_store("memory://bound/run")
    parties = Parties(spec)
    agg = parties.aggregator(store)
    gm = agg.publish_global(0, adapter_state(agg.model), {})
    bound = agg.norm_bound()
    state, _ = agg.load_global(gm)
    big = {k: torch.full_like(state[k], 1.0) for k in agg.trainable}
    scale = 0.99 * bound / float(torch.sqrt(sum((v.double() ** 2).sum() for v in big.values())))
    for name in gm.selected:
        submit_update(parties.client(store, name), gm, name, encode({k: v * scale for k, v in big.items()}))
    agg.close_round(gm)
    summary = agg.ledger.summary(0)
    assert summary is not None and summary.participants == ["honest-a", "honest-b"]
    assert agg.norm_bound() == bound
