"""The client loop: wait for a global, train on private data when selected, publish the update.

A restarted client skips every round it already committed, so killing it costs only the round in
flight. Its data never leaves this process; only the adapter delta is uploaded.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from fedtune import metrics
from fedtune.aggregation.encoding import encode, load_state
from fedtune.api import FederatedFineTuneSpec
from fedtune.api.spec import StrategyName
from fedtune.errors import FedtuneError
from fedtune.federation import optimizer_state
from fedtune.federation import protocol as p
from fedtune.federation.polling import poll
from fedtune.federation.records import Ledger
from fedtune.federation.signing import SignatureError
from fedtune.training import data as d
from fedtune.training.distributed import Group, check_batch
from fedtune.training.model import adapter_state, base_dtype, build_model, load_adapter, trainable_keys
from fedtune.training.moments import State
from fedtune.training.schedule import learning_rate
from fedtune.training.tokenizer import build_tokenizer
from fedtune.training.trainer import Options, Trained, autocast_dtype, enable_checkpointing, evaluate, train

log = logging.getLogger("fedtune.client")


def load_splits(
    spec: FederatedFineTuneSpec, name: str, tokenizer: Any, credentials: tuple[str, str] | None = None
) -> tuple[list[d.Example], list[d.Example]]:
    """A client's training and held-out examples; the split is seeded by the run, so whoever computes it
    (the client, a baseline) scores on the very same held-out examples."""
    index = [c.name for c in spec.clients].index(name)
    cs = spec.clients[index]
    where = f"spec.clients[{index}].data"
    max_len = spec.training.max_length
    packing = spec.training.packing

    def load(uri: str, field: str, cut: int | None) -> list[d.Example]:
        records = d.read_jsonl(uri, cs.data, f"{where}.{field}", spec.storage.endpoint, credentials)
        return d.tokenize(records, cs.data, tokenizer, cut, where)

    # Packed, a long text runs on into the next blocks instead of losing its tail; eval is never packed.
    examples = load(cs.data.uri, "uri", None if packing else max_len)
    if cs.data.eval_uri:
        train, held = examples, load(cs.data.eval_uri, "evalUri", max_len)
    else:
        train, held = d.split(examples, cs.data.eval_fraction, spec.seed)
        held = d.truncate(held, max_len) if packing else held
    return (d.pack(train, max_len) if packing else train), held


def trainable_model(spec: FederatedFineTuneSpec, tokenizer: Any) -> Any:
    """The base with the run's seeded adapter (the round-0 global), set up for training as spec.training says."""
    model = build_model(spec, tokenizer)
    if spec.training.gradient_checkpointing:
        enable_checkpointing(model)
    return model


def held_out_loss(
    model: Any,
    spec: FederatedFineTuneSpec,
    examples: list[d.Example],
    pad_id: int,
    autocast: torch.dtype | None = None,
    group: Group | None = None,
) -> tuple[float, int]:
    """Mean per-token loss, and scored tokens, on the first spec.training.evalBatches batches of `examples`."""
    t = spec.training
    return evaluate(model, d.eval_batches(examples, t.batch_size, t.eval_batches, pad_id), autocast, group)


def local_options(
    spec: FederatedFineTuneSpec,
    rate: Callable[[int], float],
    autocast: torch.dtype | None,
    group: Group | None = None,
    proximal_mu: float = 0.0,
) -> Options:
    """AdamW's settings from spec.training, so every trainer of a run (client, baseline) steps alike."""
    t = spec.training
    return Options(
        rate=rate,
        weight_decay=t.weight_decay,
        max_grad_norm=t.max_grad_norm,
        proximal_mu=proximal_mu,
        autocast=autocast,
        group=group or Group(),
    )


def report_training(labels: tuple[str, str, str], trained: Trained, sent: int) -> None:
    """A round's training as the client's metrics: steps, their times, tokens per second, bytes sent, and the
    peak GPU memory of the round's training on this rank's GPU."""
    metrics.CLIENT_STEPS.labels(*labels).inc(trained.steps)
    metrics.CLIENT_SENT_BYTES.labels(*labels).inc(sent)
    for seconds in trained.step_seconds:
        metrics.CLIENT_STEP_SECONDS.labels(*labels).observe(seconds)
    if (busy := sum(trained.step_seconds)) > 0:
        metrics.CLIENT_TOKENS_PER_SECOND.labels(*labels).set(trained.tokens / busy)
    if torch.cuda.is_available():
        metrics.CLIENT_GPU_MEMORY.labels(*labels).set(torch.cuda.max_memory_allocated())


@dataclass(frozen=True)
class Task:
    """What rank 0 read from storage and every rank acts on: a global to train on or to evaluate."""

    gm: p.GlobalMarker
    state: State
    kept: State | None = None


class Client:
    """One silo's trainer; `run()` returns after it has evaluated the final global.

    With several ranks (`group`), every rank trains its share of each batch and rank 0 alone reads
    and writes storage, handing the others what it read.
    """

    def __init__(
        self,
        ledger: Ledger,
        spec: FederatedFineTuneSpec,
        name: str,
        run: tuple[str, str] = ("", ""),
        data_credentials: tuple[str, str] | None = None,
        group: Group | None = None,
    ) -> None:
        self.ledger, self.store, self.name = ledger, ledger.store, name
        self.nonce = ""  # of this client's latest ready record (see _announce)
        self.retried = 0  # the store's retries when it was written
        self.labels = (*run, name)
        self.spec = spec
        self.group = group or Group()
        names = [c.name for c in self.spec.clients]
        if name not in names:
            raise FedtuneError(f"client {name!r} is not in spec.clients ({', '.join(names)})")
        check_batch(spec.training.batch_size, self.group.world)
        self.tokenizer = build_tokenizer(self.spec)
        self.train_set, self.eval_set = load_splits(spec, name, self.tokenizer, data_credentials)
        self.model = trainable_model(spec, self.tokenizer)
        self.trainable = trainable_keys(self.model)
        self.wrapped = self.group.wrap(self.model)
        self.autocast = autocast_dtype(base_dtype(spec.model.dtype))
        self.last_trained: int | None = None  # the last round this process trained (None: look it up)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _evaluate(self) -> tuple[float, int]:
        return held_out_loss(self.model, self.spec, self.eval_set, self.pad_id, self.autocast, self.group)

    def prepare(self, gm: p.GlobalMarker, train: bool) -> Task:
        """The global's state, and under keepOptimizerState the moments of this client's last training."""
        state = load_state(self.ledger.global_bytes(gm))
        if not (train and self.spec.training.keep_optimizer_state):
            return Task(gm, state)
        previous = self.last_trained
        if previous is None:
            previous = optimizer_state.last_trained(self.ledger, self.name, gm.round)
        kept = optimizer_state.recall(self.ledger, self.name, previous) if previous is not None else None
        return Task(gm, state, kept)

    def train_round(self, task: Task) -> None:
        """Train on the task's global and (rank 0) commit the update: data first, marker last."""
        started = time.time()
        gm, state = task.gm, task.state
        load_adapter(self.model, state)
        eval_loss, eval_tokens = self._evaluate()
        t = self.spec.training
        agg = self.spec.aggregation
        batches = d.train_batches(
            self.train_set,
            t.batch_size,
            t.local_steps,
            f"{self.spec.seed}:{self.name}:{gm.round}",
            self.pad_id,
            t.gradient_accumulation,
            (self.group.rank, self.group.world),
        )
        options = local_options(
            self.spec,
            partial(learning_rate, t, agg.rounds, gm.round - gm.failed),  # failed rounds trained nothing
            self.autocast,
            self.group,
            proximal_mu=agg.proximal_mu if agg.strategy == StrategyName.FEDPROX else 0.0,
        )
        trained = train(self.wrapped, batches, options, task.kept)
        self.last_trained = gm.round
        if not self.group.main:
            return
        local = adapter_state(self.model)
        delta = {k: local[k].float() - state[k].float() for k in self.trainable}
        payload = encode(delta, str(agg.encoding))
        digest = p.sha256(payload)
        self.ledger.put_data(p.update_data(gm.round, self.name, digest), payload)
        marker = p.UpdateMarker(
            client=self.name,
            round=gm.round,
            sha256=digest,
            global_sha256=gm.sha256,
            examples=len(self.train_set),
            steps=trained.steps,
            encoding=str(agg.encoding),
            bytes=len(payload),
            metrics=p.ClientMetrics(
                train_loss=trained.loss,
                eval_loss=eval_loss,
                eval_examples=eval_tokens,
                seconds=time.time() - started,
            ),
        )
        committed = self.ledger.commit_own(p.update_marker(gm.round, self.name), marker, p.UpdateMarker)
        if t.keep_optimizer_state and committed:  # moments of an update that lost a race belong to no round
            optimizer_state.keep(self.ledger, self.name, gm.round, digest, trained.moments)
        if not self.spec.privacy.enabled:  # under DP no metric carries one client's un-noised loss
            metrics.CLIENT_TRAIN_LOSS.labels(*self.labels).set(trained.loss)
        report_training(self.labels, trained, len(payload))
        log.info(
            "round %d: trained %d steps, train_loss=%.4f eval_loss=%.4f",
            gm.round,
            trained.steps,
            trained.loss,
            eval_loss,
        )

    def evaluate_final(self, task: Task) -> None:
        load_adapter(self.model, task.state)
        loss, tokens = self._evaluate()
        if not self.group.main:
            return
        gm = task.gm
        record = p.EvalMarker(
            client=self.name, round=gm.round, global_sha256=gm.sha256, eval_loss=loss, eval_examples=tokens
        )
        self.ledger.commit_own(p.eval_marker(gm.round, self.name), record, p.EvalMarker)
        log.info("final global: eval_loss=%.4f", loss)

    def run(self) -> None:
        if self.group.main:
            self._announce()
        seen = -1
        while (task := self.group.share(self._next(seen) if self.group.main else None)) is not None:
            seen = task.gm.round
            if task.gm.final:
                self.evaluate_final(task)
                return
            self.train_round(task)

    def _next(self, seen: int) -> Task | None:
        """Rank 0: the next global after round `seen` this client has work on; None once all is done."""
        while True:
            latest = poll(partial(_newer, self.ledger, seen), what=f"the global of round {seen + 1} or later")
            gm = self.ledger.global_marker(latest)
            assert gm is not None
            seen = latest
            if self.name not in gm.selected:
                if self._left_out(latest):
                    log.info("left out of sampling while storage was out of reach; announcing this client again")
                    self._announce()
                continue
            if gm.final:
                return None if self._committed(self.ledger.eval_marker, gm.round) else self.prepare(gm, train=False)
            if not self._committed(self.ledger.update_marker, gm.round):
                return self.prepare(gm, train=True)

    def _announce(self) -> None:
        """A new ready record: a new nonce tells the aggregator this client is back if it had stopped answering."""
        self.nonce, self.retried = uuid.uuid4().hex, self.store.retried
        ready = p.ReadyRecord(client=self.name, nonce=self.nonce, started=time.time())
        self.store.put(p.ready(self.name), self.ledger.signed(p.ready(self.name), ready))

    def _left_out(self, r: int) -> bool:
        """Whether the round that made global r left this running client out as not answering because it could
        not reach storage (its retries outlived the round): a client that was merely slow stays left out."""
        if self.store.retried == self.retried:
            return False
        summary = self.ledger.summary(r - 1) if r else None
        return summary is not None and summary.excluded.get(self.name) == self.nonce

    def _committed(self, read: Callable[[int, str], p.Record | None], r: int) -> bool:
        """Whether this client's own signed record for round r exists (one it did not sign does not count)."""
        try:
            return read(r, self.name) is not None
        except SignatureError:
            return False


def _newer(ledger: Ledger, seen: int) -> int | None:
    """The latest verified global after round `seen`, or None: while there is none, one existence check."""
    if seen >= 0 and not ledger.store.exists(p.global_marker(seen + 1)):
        return None
    latest = ledger.latest_global(hint=seen)
    return latest if latest is not None and latest > seen else None
