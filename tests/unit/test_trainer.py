"""Local training: packing, gradient accumulation, the run-long learning-rate schedule, kept AdamW state."""

from __future__ import annotations

import json
import logging
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest
import torch
from prometheus_client import REGISTRY

from fedtune import metrics
from fedtune.api import FederatedFineTuneSpec, parse_resource
from fedtune.api.spec import DataSpec, LrSchedule, TrainingSpec
from fedtune.errors import FedtuneError
from fedtune.federation import client as client_module
from fedtune.federation import optimizer_state
from fedtune.federation import protocol as p
from fedtune.federation.client import Client
from fedtune.federation.signing import client_party
from fedtune.storage.memory import MemoryStore
from fedtune.training import data as d
from fedtune.training.distributed import check_batch, check_devices
from fedtune.training.model import adapter_state, build_model, load_adapter
from fedtune.training.schedule import learning_rate, lr_factor
from fedtune.training.tokenizer import build_tokenizer
from fedtune.training.trainer import Options, enable_checkpointing, train
from tests.federation.conftest import tiny_resource, write_data
from tests.federation.parties import Parties

TEXTS = [f"example {i}: " + "word " * (i % 7) for i in range(24)]


def tiny_spec(data: Path, **training: Any) -> FederatedFineTuneSpec:
    return parse_resource(tiny_resource(data, training=training)).spec


@pytest.fixture
def spec(tmp_path: Path) -> FederatedFineTuneSpec:
    write_data(tmp_path)
    return tiny_spec(tmp_path)


def examples(tok: Any, max_length: int = 48) -> list[d.Example]:
    records = [d.Record({"text": t}, f"line {i}") for i, t in enumerate(TEXTS)]
    return d.tokenize(records, DataSpec(uri="x.jsonl"), tok, max_length, "spec.clients[0].data")


def test_packing_keeps_every_token_in_full_blocks_with_no_padding(spec: FederatedFineTuneSpec) -> None:
    tok = build_tokenizer(spec)
    plain = examples(tok)
    packed = d.pack(plain, 16)
    stream = [t for e in plain for t in e.input_ids.tolist()]
    assert [t for e in packed for t in e.input_ids.tolist()] == stream  # same tokens, same order
    assert all(len(e.input_ids) == 16 for e in packed[:-1]) and 0 < len(packed[-1].input_ids) <= 16
    assert all((e.labels == e.input_ids).all() for e in packed)
    assert stream.count(tok.eos_token_id) == len(TEXTS)  # each example still ends with eos
    full = packed[:-1] if len(packed[-1].input_ids) < 16 else packed
    for (batch,) in d.train_batches(full, 4, 5, "seed", tok.pad_token_id):
        assert bool(batch["attention_mask"].all()) and tok.pad_token_id not in batch["input_ids"]


def perturbed(spec: FederatedFineTuneSpec, tok: Any) -> Any:
    """The model with a seeded nonzero adapter, so both LoRA factors get gradients from the first step."""
    model = build_model(spec, tok)
    gen = torch.Generator().manual_seed(3)
    load_adapter(model, {k: 0.1 * torch.randn(v.shape, generator=gen) for k, v in adapter_state(model).items()})
    return model


def test_accumulating_k_micro_batches_of_b_is_one_step_of_k_times_b(spec: FederatedFineTuneSpec) -> None:
    tok = build_tokenizer(spec)
    ex = examples(tok)
    results = []
    for batch, accumulation in [(12, 1), (4, 3), (3, 4)]:
        model = perturbed(spec, tok)
        steps = d.train_batches(ex, batch, 3, "seed", tok.pad_token_id, accumulation)
        trained = train(model, steps, Options(rate=lambda i: 0.01, max_grad_norm=1.0))
        results.append((adapter_state(model), trained))
    (one, first), *others = results
    for state, trained in others:
        assert trained.steps == first.steps == 3
        assert trained.loss == pytest.approx(first.loss, rel=1e-5)
        for k in one:  # the micro-batches are padded to other widths: only float summation order differs
            torch.testing.assert_close(state[k], one[k], rtol=1e-5, atol=1e-7)


def test_cosine_schedule_warms_up_peaks_and_reaches_zero_at_the_end_of_the_run() -> None:
    cos = LrSchedule.COSINE
    assert [lr_factor(s, 100, 4, cos) for s in range(5)] == [0.25, 0.5, 0.75, 1.0, 1.0]
    assert lr_factor(52, 100, 4, cos) == pytest.approx(0.5)  # halfway through the decay
    assert lr_factor(100, 100, 4, cos) == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(130, 100, 4, cos) == pytest.approx(0.0, abs=1e-12)  # rounds past the last
    assert [lr_factor(s, 100, 2, LrSchedule.CONSTANT) for s in (0, 1, 2, 99)] == [0.5, 1.0, 1.0, 1.0]


def test_the_schedule_continues_across_rounds_counted_from_zero() -> None:
    t = TrainingSpec(local_steps=5, learning_rate=0.1, lr_schedule="cosine", warmup_steps=3)
    rounds = 4
    run = [learning_rate(t, rounds, r, i) for r in range(rounds) for i in range(t.local_steps)]
    assert run[:3] == pytest.approx([0.1 / 3, 0.2 / 3, 0.1])
    assert run[3] == pytest.approx(0.1) and all(a > b for a, b in pairwise(run[3:]))
    assert learning_rate(t, rounds, 1, 0) == run[5] < run[4]  # round 1 picks up where round 0 stopped
    assert learning_rate(t, rounds, rounds, 0) == pytest.approx(0.0, abs=1e-12)


def test_training_steps_at_the_rate_it_is_given(spec: FederatedFineTuneSpec) -> None:
    tok = build_tokenizer(spec)
    model = perturbed(spec, tok)
    before = adapter_state(model)
    train(model, d.train_batches(examples(tok), 4, 2, "seed", tok.pad_token_id), Options(rate=lambda i: 0.0))
    after = adapter_state(model)
    assert all(torch.equal(after[k], before[k]) for k in before)


class Federation:
    """An aggregator publishing globals by hand, and client alpha restarted before every round."""

    def __init__(self, spec: FederatedFineTuneSpec, name: str) -> None:
        self.spec, self.store = spec, MemoryStore(name, "run")
        self.parties = Parties(spec)
        self.agg = self.parties.aggregator(self.store)
        self.globals = [self.agg.publish_global(0, adapter_state(self.agg.model), {})]
        self.ledger = self.parties.client(self.store, "alpha")

    def next_global(self) -> p.GlobalMarker:
        prev = self.globals[-1]
        state, _ = self.agg.load_global(prev)
        self.globals.append(self.agg.publish_global(prev.round + 1, state, {}, parent=prev))
        return self.globals[-1]

    def train(self, gm: p.GlobalMarker) -> Client:
        client = Client(self.ledger, self.spec, "alpha")
        task = client.prepare(gm, train=True)
        client.train_round(task)
        self.kept = task.kept
        return client

    def kept_after(self, r: int) -> dict[str, torch.Tensor]:
        state = optimizer_state.recall(self.ledger, "alpha", r)
        assert state is not None
        return state


def steps_of(state: dict[str, torch.Tensor]) -> set[float]:
    return {float(v) for k, v in state.items() if k.endswith(".step")}


def test_kept_optimizer_state_is_resumed_by_a_restarted_client(tmp_path: Path) -> None:
    write_data(tmp_path)
    spec = tiny_spec(tmp_path, keepOptimizerState=True)
    fed = Federation(spec, "kept")
    fed.train(fed.globals[0])
    assert fed.kept is None and steps_of(fed.kept_after(0)) == {4.0}
    fed.train(fed.next_global())
    assert fed.kept is not None and steps_of(fed.kept) == {4.0}
    assert all(bool(v.abs().sum() > 0) for k, v in fed.kept.items() if k.endswith("exp_avg_sq"))
    assert steps_of(fed.kept_after(1)) == {8.0}  # round 1 continued round 0's moments


def test_a_tampered_or_forged_optimizer_state_is_refused_and_training_starts_afresh(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_data(tmp_path)
    spec = tiny_spec(tmp_path, keepOptimizerState=True)
    fed = Federation(spec, "tampered")
    fed.train(fed.globals[0])
    marker = fed.ledger.read(p.optimizer_state_marker(0, "alpha"), p.OptimizerStateMarker, client_party("alpha"))
    assert marker is not None
    key = p.optimizer_state_data(0, "alpha", marker.sha256)
    raw = bytearray(fed.store.get(key))
    raw[-1] ^= 1
    fed.store.put(key, bytes(raw))
    with caplog.at_level(logging.WARNING, "fedtune.client"):
        fed.train(fed.next_global())
    assert fed.kept is None and "does not match its marker" in caplog.text
    assert steps_of(fed.kept_after(1)) == {4.0}  # afresh

    # Moments another party signed (where no bucket policy stops it writing here) are refused as well.
    beta = fed.parties.client(fed.store, "beta")
    fed.store.put(p.optimizer_state_marker(1, "alpha"), beta.signed(p.optimizer_state_marker(1, "alpha"), marker))
    caplog.clear()
    with caplog.at_level(logging.WARNING, "fedtune.client"):
        fed.train(fed.next_global())
    assert fed.kept is None and "refused" in caplog.text


def test_gradient_checkpointing_trains_to_the_same_adapter(spec: FederatedFineTuneSpec) -> None:
    tok = build_tokenizer(spec)
    states = []
    for checkpointing in (False, True):
        model = perturbed(spec, tok)
        if checkpointing:
            enable_checkpointing(model)
        train(model, d.train_batches(examples(tok), 4, 2, "seed", tok.pad_token_id), Options(rate=lambda i: 0.01))
        states.append(adapter_state(model))
    for k, v in states[0].items():
        torch.testing.assert_close(states[1][k], v, rtol=1e-5, atol=1e-7)


def test_a_batch_that_does_not_split_across_the_gpus_is_refused_naming_the_field() -> None:
    check_batch(8, 4)
    with pytest.raises(FedtuneError, match=r"^spec\.training\.batchSize: 6 does not split evenly across 4 GPUs$"):
        check_batch(6, 4)


def test_a_failed_round_does_not_advance_the_schedule(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Round 2 after one failed round trains at round 1's rates: the run's last rounds do not train at zero."""
    write_data(tmp_path)
    spec = tiny_spec(tmp_path, lrSchedule="cosine")
    fed = Federation(spec, "failed")
    fed.next_global()
    fed.agg.failed_total = 1  # round 1 failed: its global is round 0's, kept
    gm = fed.next_global()
    assert (gm.round, gm.failed) == (2, 1)
    rates: list[float] = []
    real_train = client_module.train

    def spy(model: Any, steps: Any, options: Options, kept: Any = None) -> Any:
        rates.append(options.rate(0))
        return real_train(model, steps, options, kept)

    monkeypatch.setattr(client_module, "train", spy)
    fed.train(gm)
    assert rates == [learning_rate(spec.training, spec.aggregation.rounds, 1, 0)]


def test_packing_keeps_the_tail_of_a_long_text_and_eval_stays_cut(tmp_path: Path) -> None:
    write_data(tmp_path)
    long_text = "a long clinical note " * 20  # 420 bytes: many 48-token blocks
    (tmp_path / "long.jsonl").write_text(json.dumps({"text": long_text}) + "\n")
    doc = tiny_resource(tmp_path, training={"packing": True})
    doc["spec"]["clients"][0]["data"] = {"uri": str(tmp_path / "long.jsonl"), "evalUri": str(tmp_path / "long.jsonl")}
    spec = parse_resource(doc).spec
    name = spec.clients[0].name
    client = Client(Parties(spec).client(MemoryStore("packing", "run"), name), spec, name)
    every = client.tokenizer(long_text, add_special_tokens=False)["input_ids"]
    tokens = [t for e in client.train_set for t in e.input_ids.tolist()]
    assert len(client.train_set) > 1 and all(len(e.input_ids) <= 48 for e in client.train_set)
    assert any(tokens[i : i + len(every)] == every for i in range(len(tokens)))  # all of it, tail included
    [held] = client.eval_set
    assert held.input_ids.tolist() == tokens[:48]  # eval is cut, not packed


def test_more_gpus_than_the_machine_has_is_refused_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(
        FedtuneError, match=r"^spec\.clients\[2\]\.resources\.gpus: 4 GPUs asked for, this machine has 1$"
    ):
        check_devices(4, "spec.clients[2].resources.gpus")
    check_devices(1, "spec.clients[2].resources.gpus")


def test_a_round_reports_its_tokens_step_times_and_bytes(
    spec: FederatedFineTuneSpec, monkeypatch: pytest.MonkeyPatch
) -> None:
    tok = build_tokenizer(spec)
    model = build_model(spec, tok)
    batches = list(d.train_batches(examples(tok), 4, 3, "seed", tok.pad_token_id, accumulation=2))
    trained = train(model, iter(batches), Options(rate=lambda i: 0.01))
    assert trained.tokens == sum(int(b["attention_mask"].sum()) for step in batches for b in step)
    assert len(trained.step_seconds) == trained.steps == 3 and all(s > 0 for s in trained.step_seconds)

    of = dict(zip(metrics.CLIENT, ("ns", "reported", "alpha"), strict=True))  # labels only this test uses
    names = ("sent_bytes_total", "steps_total", "step_duration_seconds_count")

    def counts() -> list[float]:
        return [REGISTRY.get_sample_value(f"fedtune_client_{n}", of) or 0.0 for n in names]

    before = counts()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    labels = ("ns", "reported", "alpha")
    client_module.report_training(labels, trained, 1234)
    client_module.report_training(labels, trained, 766)
    assert [a - b for a, b in zip(counts(), before, strict=True)] == [2000, 6, 6]
    rate = REGISTRY.get_sample_value("fedtune_client_tokens_per_second", of)
    assert rate == pytest.approx(trained.tokens / sum(trained.step_seconds))
    assert REGISTRY.get_sample_value("fedtune_client_gpu_memory_bytes", of) is None  # no GPU, no series
