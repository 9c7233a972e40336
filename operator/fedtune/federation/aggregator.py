"""The aggregator loop: publish a global, collect and validate updates, aggregate, commit the next global.

All state lives in storage, so a restarted aggregator picks up at the highest committed global and
never redoes or rewrites a committed round.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from fedtune import metrics
from fedtune.aggregation import ClientUpdate, State, make_strategy
from fedtune.aggregation.encoding import decode, load_state, save_state
from fedtune.aggregation.validation import update_norm, validate_update
from fedtune.api import FederatedFineTuneSpec
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.run_store import poll, publish_spec, read_spec
from fedtune.privacy import ClientLevelDP
from fedtune.storage import ObjectStore
from fedtune.training.model import adapter_state, build_model, load_adapter, trainable_keys
from fedtune.training.tokenizer import build_tokenizer

log = logging.getLogger("fedtune.aggregator")


@dataclass
class Collected:
    """What the aggregator knows about one round's updates so far."""

    accepted: dict[str, p.UpdateMarker] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)

    def resolved(self) -> set[str]:
        return set(self.accepted) | set(self.rejected)


class Aggregator:
    """Runs one federation from its store; `run()` returns once the final adapter is written."""

    def __init__(
        self, store: ObjectStore, spec: FederatedFineTuneSpec | None = None, run: tuple[str, str] = ("", "")
    ) -> None:
        self.store = store
        if spec is not None:
            publish_spec(store, spec)
        self.spec = read_spec(store)
        self.labels = run
        self.strategy = make_strategy(self.spec.aggregation)
        self.tokenizer = build_tokenizer(self.spec)
        self.model = build_model(self.spec, self.tokenizer)
        self.trainable = trainable_keys(self.model)
        self.rounds = self.spec.aggregation.rounds
        self.dp = self._privacy()

    def _privacy(self) -> ClientLevelDP | None:
        """Client-level DP for this run, or None (the spec guarantees a mean-based strategy with it)."""
        spec = self.spec
        if not spec.privacy.enabled:
            return None
        return ClientLevelDP(spec.privacy, spec.clients_per_round, len(spec.clients), spec.seed)

    def _last_round(self, rounds_done: int) -> bool:
        """Whether no further round may run: all are done, or one more would exceed targetEpsilon."""
        return rounds_done >= self.rounds or self._stop_reason(rounds_done) is not None

    def _stop_reason(self, rounds_done: int) -> str | None:
        """Why the run stops before its configured rounds (the privacy budget), or None."""
        if self.dp is None or rounds_done >= self.rounds or self.dp.within_budget(rounds_done + 1):
            return None
        return (
            f"privacy.targetEpsilon: round {rounds_done} would raise epsilon to "
            f"{self.dp.epsilon(rounds_done + 1):.4g} > {self.spec.privacy.target_epsilon:g} "
            f"(delta={self.spec.privacy.delta:g}); stopped after {rounds_done} of {self.rounds} rounds"
        )

    # --- publishing -------------------------------------------------------------------------------

    def publish_global(self, r: int, state: State, server_state: State, final: bool = False) -> p.GlobalMarker:
        """Write round r's global (and server state), then commit its marker; a no-op if committed."""
        existing = p.read_record(self.store, p.global_marker(r), p.GlobalMarker)
        if existing is not None:
            return existing
        data = save_state(state)
        self.store.put(p.global_data(r), data)
        state_sha = None
        if server_state:
            sdata = save_state(server_state)
            self.store.put(p.server_state(r), sdata)
            state_sha = p.sha256(sdata)
        names = [c.name for c in self.spec.clients]
        selected = names if final else p.select_clients(names, self.spec.clients_per_round, self.spec.seed, r)
        marker = p.GlobalMarker(
            round=r,
            sha256=p.sha256(data),
            selected=selected,
            deadline=time.time() + self.spec.aggregation.round_timeout_seconds,
            final=final,
            server_state_sha256=state_sha,
            created=time.time(),
        )
        if not self.store.put_if_absent(p.global_marker(r), p.dumps(marker)):
            return self.read_global_marker(r)
        log.info("round %d: global committed (%s)", r, "final" if final else f"selected {', '.join(selected)}")
        return marker

    def read_global_marker(self, r: int) -> p.GlobalMarker:
        marker = p.read_record(self.store, p.global_marker(r), p.GlobalMarker)
        if marker is None:
            raise FedtuneError(f"{self.store.url(p.global_marker(r))}: missing")
        return marker

    def load_global(self, marker: p.GlobalMarker) -> tuple[State, State]:
        state = load_state(p.read_verified(self.store, p.global_data(marker.round), marker.sha256))
        server: State = {}
        if marker.server_state_sha256:
            server = load_state(p.read_verified(self.store, p.server_state(marker.round), marker.server_state_sha256))
        return state, server

    # --- collecting -------------------------------------------------------------------------------

    def _read_update(self, r: int, client: str, marker: p.UpdateMarker, reference: State) -> State:
        """The decoded update, or FedtuneError with the reason it must be rejected."""
        data = p.read_verified(self.store, p.update_data(r, client), marker.sha256)
        try:
            delta = decode(data)
        except Exception as e:  # any undecodable payload is the client's fault, never the aggregator's
            raise FedtuneError(f"undecodable update: {e}") from None
        reason = validate_update(delta, reference, self.spec.aggregation.max_update_norm)
        if reason:
            raise FedtuneError(reason)
        return delta

    def _check_new(self, gm: p.GlobalMarker, reference: State, seen: Collected) -> None:
        for client in gm.selected:
            if client in seen.resolved():
                continue
            try:
                marker = p.read_record(self.store, p.update_marker(gm.round, client), p.UpdateMarker)
            except FedtuneError as e:
                seen.rejected[client] = str(e)
                continue
            if marker is None:
                continue
            try:
                delta = self._read_update(gm.round, client, marker, reference)
            except FedtuneError as e:
                seen.rejected[client] = str(e)
                log.warning("round %d: rejected update of %s: %s", gm.round, client, e)
                metrics.UPDATES_REJECTED.labels(*self.labels, client).inc()
                continue
            seen.accepted[client] = marker
            seen.norms[client] = update_norm(delta)

    def collect(self, gm: p.GlobalMarker, reference: State) -> Collected:
        """Wait until every selected client is resolved, or the deadline passed with minClients accepted."""
        seen = Collected()
        need = self.spec.aggregation.min_clients

        def done() -> bool | None:
            self._check_new(gm, reference, seen)
            if seen.resolved() >= set(gm.selected):
                return True
            if time.time() >= gm.deadline and len(seen.accepted) >= need:
                return True
            return None

        poll(done, what=f"updates of round {gm.round}")
        return seen

    def _stream(self, r: int, seen: Collected, reference: State) -> Iterator[ClientUpdate]:
        """Accepted updates, loaded one at a time so memory stays flat in the number of clients."""
        for client, marker in sorted(seen.accepted.items()):
            try:
                delta = self._read_update(r, client, marker, reference)
            except FedtuneError as e:
                seen.rejected[client] = str(e)
                continue
            weight = self.spec.client(client).weight or float(marker.examples)
            yield ClientUpdate(client, weight, delta)

    # --- one round --------------------------------------------------------------------------------

    def close_round(self, gm: p.GlobalMarker) -> None:
        """Aggregate round gm.round and commit the global of the next round."""
        r = gm.round
        state, server = self.load_global(gm)
        reference = {k: state[k] for k in self.trainable}
        seen = self.collect(gm, reference)
        accepted = dict(seen.accepted)
        if len(accepted) >= self.spec.aggregation.min_clients:
            updates: Iterator[ClientUpdate] = self._stream(r, seen, reference)
            if self.dp is not None:
                clipped = ((u.delta, seen.norms[u.client]) for u in updates)
                mean, server = self.dp.private_mean(clipped, r, server)
                updates = iter([ClientUpdate("dp-mean", 1.0, mean)])
            new_state, new_server = self.strategy.aggregate(state, updates, server)
        else:
            log.warning("round %d: %d valid updates, fewer than minClients; global kept", r, len(accepted))
            new_state, new_server = state, server
        participants = sorted(c for c in accepted if c not in seen.rejected)
        summary = self._summary(gm, seen, participants)
        self.store.put(p.summary(r), p.dumps(summary))
        self.publish_global(r + 1, new_state, new_server, final=self._last_round(r + 1))
        self._observe(summary, {c: accepted[c].bytes for c in participants})

    def _summary(self, gm: p.GlobalMarker, seen: Collected, participants: list[str]) -> p.RoundSummary:
        ms = {c: seen.accepted[c] for c in participants}
        weights = {c: float(m.examples) for c, m in ms.items()}
        train = [(m.metrics.train_loss, weights[c]) for c, m in ms.items() if m.metrics.train_loss is not None]
        evals = [
            (m.metrics.eval_loss, float(m.metrics.eval_examples))
            for m in ms.values()
            if m.metrics.eval_loss is not None
        ]
        return p.RoundSummary(
            round=gm.round,
            participants=participants,
            rejected=[p.Rejection(client=c, reason=why) for c, why in sorted(seen.rejected.items())],
            missing=sorted(set(gm.selected) - seen.resolved()),
            train_loss=_weighted(train),
            eval_loss=_weighted(evals),
            client_metrics={c: m.metrics for c, m in ms.items()},
            seconds=time.time() - gm.created,
            bytes=sum(m.bytes for m in ms.values()),
            update_norms={c: seen.norms[c] for c in participants},
            epsilon=self._epsilon(gm.round + 1),
        )

    def _epsilon(self, rounds_done: int) -> float | None:
        """Epsilon spent after `rounds_done` rounds; None without DP (or without noise: unbounded)."""
        if self.dp is None:
            return None
        eps = self.dp.epsilon(rounds_done)
        return eps if math.isfinite(eps) else None

    def _observe(self, s: p.RoundSummary, sizes: dict[str, int]) -> None:
        metrics.ROUNDS_COMPLETED.labels(*self.labels).set(s.round + 1)
        metrics.ROUND_SECONDS.labels(*self.labels).observe(s.seconds)
        for c, size in sizes.items():
            metrics.UPDATES_ACCEPTED.labels(*self.labels, c).inc()
            metrics.UPDATE_BYTES.labels(*self.labels, c).inc(size)
        if s.train_loss is not None:
            metrics.TRAIN_LOSS.labels(*self.labels).set(s.train_loss)
        if s.eval_loss is not None:
            metrics.EVAL_LOSS.labels(*self.labels).set(s.eval_loss)
        if s.epsilon is not None:
            metrics.EPSILON.labels(*self.labels).set(s.epsilon)
        log.info(
            "round %d closed: %d participants, train_loss=%s eval_loss=%s, %.1fs",
            s.round,
            len(sizes),
            _fmt(s.train_loss),
            _fmt(s.eval_loss),
            s.seconds,
        )

    # --- the end ----------------------------------------------------------------------------------

    def finalize(self, gm: p.GlobalMarker) -> p.FinalSummary:
        """Collect the clients' evaluation of the final global, then write the PEFT adapter and summary."""
        done = p.read_record(self.store, p.FINAL_SUMMARY, p.FinalSummary)
        if done is not None:
            return done
        evals = self._collect_evals(gm)
        state, _ = self.load_global(gm)
        load_adapter(self.model, state)
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            for name in ("adapter_model.safetensors", "adapter_config.json"):
                self.store.put(f"final/{name}", (Path(tmp) / name).read_bytes())
        total = sum(e.eval_examples for e in evals.values())
        final = p.FinalSummary(
            rounds=gm.round,
            eval_loss=sum(e.eval_loss * e.eval_examples for e in evals.values()) / total if total else None,
            client_eval_loss={c: e.eval_loss for c, e in sorted(evals.items())},
            adapter=self.store.url("final"),
            stopped_early=self._stop_reason(gm.round),
        )
        if final.stopped_early:
            log.warning("%s", final.stopped_early)
        self.store.put_if_absent(p.FINAL_SUMMARY, p.dumps(final))
        if final.eval_loss is not None:
            metrics.EVAL_LOSS.labels(*self.labels).set(final.eval_loss)
        log.info("final adapter written to %s", final.adapter)
        return final

    def _collect_evals(self, gm: p.GlobalMarker) -> dict[str, p.EvalMarker]:
        evals: dict[str, p.EvalMarker] = {}

        def done() -> bool | None:
            for c in gm.selected:
                if c not in evals:
                    e = p.read_record(self.store, p.eval_marker(gm.round, c), p.EvalMarker)
                    if e is not None:
                        evals[c] = e
            return True if len(evals) == len(gm.selected) or time.time() >= gm.deadline else None

        poll(done, what="final evaluations")
        return evals

    def run(self) -> p.FinalSummary:
        metrics.ROUNDS_TOTAL.labels(*self.labels).set(self.rounds)
        latest = p.latest_global(self.store)
        if latest is None:
            self.publish_global(0, adapter_state(self.model), {}, final=self._last_round(0))
            latest = 0
        else:
            log.info("resuming at round %d", latest)
        while True:
            gm = self.read_global_marker(latest)
            if gm.final:
                return self.finalize(gm)
            self.close_round(gm)
            latest += 1


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
