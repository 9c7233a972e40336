"""Checking an update's object, and reading a checked one again: the storage path of the aggregator."""

from __future__ import annotations

import hashlib
import itertools
import tempfile
from pathlib import Path

import pytest
import torch

from fedtune.aggregation import ClientUpdate, State, make_strategy
from fedtune.aggregation.ahead import ahead
from fedtune.aggregation.encoding import ENCODINGS, decode, encode
from fedtune.aggregation.spool import Spool
from fedtune.aggregation.validation import update_norm
from fedtune.api.spec import AggregationSpec
from fedtune.federation import update_check
from fedtune.federation.update_check import Rejected, Rules
from fedtune.storage import ObjectStore, open_store

REFERENCE = {"l0.lora_A": torch.zeros(4, 64), "l0.lora_B": torch.zeros(64, 4), "l1.lora_A": torch.zeros(4, 64)}
_stores = itertools.count()


def deltas(n: int, seed: int = 0) -> list[State]:
    gen = torch.Generator().manual_seed(seed)
    return [{k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in REFERENCE.items()} for _ in range(n)]


def stored(payloads: list[bytes]) -> tuple[ObjectStore, list[str], list[str]]:
    store = open_store(f"memory://update-check-{next(_stores)}/run")
    keys = [f"clients/c{i}/update.safetensors" for i in range(len(payloads))]
    for key, data in zip(keys, payloads, strict=True):
        store.put(key, data)
    return store, keys, [hashlib.sha256(d).hexdigest() for d in payloads]


@pytest.mark.parametrize("enc", ENCODINGS)
def test_check_then_load_gives_the_decoded_update_and_its_norm(enc: str) -> None:
    (delta,) = deltas(1)
    data = encode(delta, enc)
    store, (key,), (digest,) = stored([data])
    rules = Rules(REFERENCE, enc, max_norm=None)
    checked = update_check.check(store, key, digest, rules, None, "c0")
    loaded = update_check.load(store, key, digest, rules)
    plain = decode(data)
    assert all(torch.equal(loaded[k], plain[k]) for k in REFERENCE)
    assert checked.norm == pytest.approx(update_norm(plain), rel=1e-12)
    assert checked.spooled is None


def test_a_checked_update_can_be_spooled() -> None:
    (delta,) = deltas(1)
    data = encode(delta)
    store, (key,), (digest,) = stored([data])
    spool = Spool()
    try:
        checked = update_check.check(store, key, digest, Rules(REFERENCE, "fp32", None), spool, "c0")
        assert checked.spooled is not None
        assert all(torch.equal(checked.spooled[k], delta[k]) for k in REFERENCE)
    finally:
        spool.close()


def test_a_rejected_update_is_not_spooled(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    (delta,) = deltas(1)
    data = encode({k: v * 1e6 for k, v in delta.items()})
    store, (key,), (digest,) = stored([data])
    spool = Spool()
    try:
        with pytest.raises(Rejected, match="exceeds the bound"):
            update_check.check(store, key, digest, Rules(REFERENCE, "fp32", max_norm=1.0), spool, "c0")
        (folder,) = tmp_path.glob("fedtune-spool-*")
        assert not list(folder.iterdir())
    finally:
        spool.close()


def test_reading_an_object_that_changed_since_its_check_is_rejected() -> None:
    first, second = deltas(2)
    store, (key,), (digest,) = stored([encode(first)])
    rules = Rules(REFERENCE, "fp32", None)
    update_check.check(store, key, digest, rules, None, "c0")
    store.put(key, encode(second))  # the same size: only the digest tells
    with pytest.raises(Rejected, match="does not match its marker"):
        update_check.load(store, key, digest, rules)


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_reading_ahead_gives_the_same_aggregate_as_one_at_a_time(strategy: str) -> None:
    ds = deltas(9, seed=3)
    store, keys, digests = stored([encode(d) for d in ds])
    rules = Rules(REFERENCE, "fp32", None)
    s = make_strategy(AggregationSpec(strategy=strategy))
    glob = {k: torch.ones_like(v) for k, v in REFERENCE.items()}

    def read(i: int) -> ClientUpdate:
        return ClientUpdate(f"c{i}", 1.0 + i, update_check.load(store, keys[i], digests[i], rules))

    one_at_a_time, _ = s.aggregate(glob, [ClientUpdate(f"c{i}", 1.0 + i, d) for i, d in enumerate(ds)], {})
    ahead_of_it, _ = s.aggregate(glob, ahead(range(len(ds)), read, depth=3), {})
    assert all(torch.equal(ahead_of_it[k], one_at_a_time[k]) for k in REFERENCE)
