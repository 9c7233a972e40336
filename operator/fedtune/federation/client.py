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
from fedtune.training.trainer import Options, autocast_dtype, enable_checkpointing, evaluate, train

log = logging.getLogger("fedtune.client")


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
        self.labels = (*run, name)
        self.spec = spec
        self.group = group or Group()
        names = [c.name for c in self.spec.clients]
        if name not in names:
            raise FedtuneError(f"client {name!r} is not in spec.clients ({', '.join(names)})")
        check_batch(spec.training.batch_size, self.group.world)
        self.index = names.index(name)
        self.data_credentials = data_credentials
        self.tokenizer = build_tokenizer(self.spec)
        self.train_set, self.eval_set = self._load_data()
        if spec.training.packing:
            self.train_set = d.pack(self.train_set, spec.training.max_length)
        self.model = build_model(self.spec, self.tokenizer)
        if spec.training.gradient_checkpointing:
            enable_checkpointing(self.model)
        self.trainable = trainable_keys(self.model)
        self.wrapped = self.group.wrap(self.model)
        self.autocast = autocast_dtype(base_dtype(spec.model.dtype))
        self.last_trained: int | None = None  # the last round this process trained (None: look it up)

    def _load_data(self) -> tuple[list[d.Example], list[d.Example]]:
        cs = self.spec.client(self.name)
        where = f"spec.clients[{self.index}].data"
        endpoint = self.spec.storage.endpoint
        max_len = self.spec.training.max_length
        creds = self.data_credentials

        def load(uri: str, field: str) -> list[d.Example]:
            records = d.read_jsonl(uri, cs.data, f"{where}.{field}", endpoint, creds)
            return d.tokenize(records, cs.data, self.tokenizer, max_len, where)

        examples = load(cs.data.uri, "uri")
        if cs.data.eval_uri:
            return examples, load(cs.data.eval_uri, "evalUri")
        return d.split(examples, cs.data.eval_fraction, self.spec.seed)

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def _evaluate(self) -> tuple[float, int]:
        t = self.spec.training
        batches = d.eval_batches(self.eval_set, t.batch_size, t.eval_batches, self.pad_id)
        return evaluate(self.model, batches, self.autocast, self.group)

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
        options = Options(
            rate=partial(learning_rate, t, agg.rounds, gm.round - gm.failed),  # failed rounds trained nothing
            weight_decay=t.weight_decay,
            max_grad_norm=t.max_grad_norm,
            proximal_mu=agg.proximal_mu if agg.strategy == StrategyName.FEDPROX else 0.0,
            autocast=self.autocast,
            group=self.group,
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
        metrics.CLIENT_STEPS.labels(*self.labels).inc(trained.steps)
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
            # A new nonce on every start tells the aggregator this client is back if it had stopped answering.
            ready = p.ReadyRecord(client=self.name, nonce=uuid.uuid4().hex, started=time.time())
            self.store.put(p.ready(self.name), self.ledger.signed(p.ready(self.name), ready))
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
                continue
            if gm.final:
                return None if self._committed(self.ledger.eval_marker, gm.round) else self.prepare(gm, train=False)
            if not self._committed(self.ledger.update_marker, gm.round):
                return self.prepare(gm, train=True)

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
