"""The aggregator loop: publish a global, collect and validate updates, aggregate, commit the next global.

All state lives in storage, so a restarted aggregator picks up at the highest committed global and
never redoes or rewrites a committed round.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from fedtune import metrics
from fedtune.aggregation import ClientUpdate, State, Strategy, make_strategy
from fedtune.aggregation.ahead import ahead, share_one_heap
from fedtune.aggregation.encoding import load_state, save_state
from fedtune.aggregation.fedavg import MeanStrategy
from fedtune.aggregation.spool import Spool, SpooledDelta
from fedtune.aggregation.validation import all_finite, update_norm
from fedtune.api import FederatedFineTune, FederatedFineTuneSpec
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation import update_check
from fedtune.federation.lease import Lease, LeaseLost
from fedtune.federation.polling import poll
from fedtune.federation.private_strategy import PrivateStrategy
from fedtune.federation.records import Ledger
from fedtune.federation.run_config import resource_json
from fedtune.federation.signing import AGGREGATOR, SignatureError
from fedtune.federation.update_check import Rejected, Rules
from fedtune.privacy import ClientLevelDP
from fedtune.storage import ObjectNotFound, StorageError
from fedtune.training.adapter_only import build_adapter_only
from fedtune.training.model import adapter_state, load_adapter, trainable_keys
from fedtune.training.tokenizer import build_tokenizer

log = logging.getLogger("fedtune.aggregator")

# Without maxUpdateNorm, an update may be at most this many times the global's norm (at least 1).
DEFAULT_NORM_FACTOR = 100.0


class Changed(FedtuneError):
    """An accepted update whose object no longer holds the bytes that were checked."""

    def __init__(self, client: str, reason: str) -> None:
        super().__init__(reason)
        self.client = client


@dataclass(frozen=True)
class Accepted:
    """An update that passed every check: its marker, its L2 norm, and its bytes on local disk if spooled."""

    marker: p.UpdateMarker
    norm: float
    spooled: SpooledDelta | None


@dataclass(frozen=True)
class Failed:
    """Why an update is not accepted, or not yet: the error's type and message, not the error itself,
    whose frames would keep the update's bytes alive."""

    error: type[Exception]
    message: str


@dataclass
class Collected:
    """What the aggregator knows about one round's updates so far."""

    accepted: dict[str, p.UpdateMarker] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)
    norms: dict[str, float] = field(default_factory=dict)
    # For a strategy that needs all updates at once: each accepted update's checked bytes, on local disk.
    spooled: dict[str, SpooledDelta] = field(default_factory=dict)
    spool: Spool | None = None
    # Markers whose signature fails: unresolved until the deadline, since the owner may still replace them.
    unsigned: dict[str, str] = field(default_factory=dict)
    # Whether the round closed because its time ran out (not on its target of valid updates).
    timed_out: bool = False

    def resolved(self) -> set[str]:
        return set(self.accepted) | set(self.rejected)

    def close(self) -> None:
        """Remove the spooled updates from local disk."""
        self.spooled.clear()
        if self.spool is not None:
            self.spool.close()
            self.spool = None


class Aggregator:
    """Runs one federation from its store; `run()` returns once the final adapter is written."""

    def __init__(
        self,
        ledger: Ledger,
        spec: FederatedFineTuneSpec,
        run: tuple[str, str] = ("", ""),
        resource: FederatedFineTune | None = None,
    ) -> None:
        self.ledger, self.store = ledger, ledger.store
        self.spec = spec
        self.resource = resource
        self.lease = Lease(ledger)
        self.labels = run
        share_one_heap()  # the pool's threads read updates into reused pages, as the main thread does
        self.dp = self._privacy()
        self.strategy = self._strategy()
        self.tokenizer = build_tokenizer(self.spec)
        self.model = build_adapter_only(self.spec, len(self.tokenizer))  # the adapter alone: no base weights
        self.trainable = trainable_keys(self.model)
        self.rounds = self.spec.aggregation.rounds
        # Carried from round summary to round summary, so a restarted aggregator picks them up.
        self.taken_part: dict[str, int] = {}  # under DP: rounds each client has taken part in
        self.failed_streak = 0
        self.failed_total = 0
        self.excluded: dict[str, str] = {}  # clients that did not answer -> their ready nonce then
        self._selected: dict[int, list[str]] = {}  # each round's sample, computed once
        self._initial_norm: float | None = None

    def _privacy(self) -> ClientLevelDP | None:
        """Client-level DP for this run, or None (the spec guarantees a mean-based strategy with it)."""
        spec = self.spec
        if not spec.privacy.enabled:
            return None
        return ClientLevelDP(spec.privacy)

    def _strategy(self) -> Strategy:
        """The spec's strategy; under DP, wrapped to step on the noised mean of the clipped updates."""
        inner = make_strategy(self.spec.aggregation)
        if self.dp is None:
            return inner
        if not isinstance(inner, MeanStrategy):  # the spec refuses this combination already
            raise FedtuneError(f"spec.privacy.enabled: {inner.name} is not a mean-based strategy")
        return PrivateStrategy(inner, self.dp)

    def _carry(self, r: int) -> None:
        """Take what round summaries carry forward from the record of the round that produced global r."""
        last = self.ledger.summary(r - 1) if r else None
        if last is not None:
            self.taken_part = dict(last.taken_part)
            self.failed_streak, self.failed_total = last.failed_streak, last.failed_total
            self.excluded = dict(last.excluded)

    def _eligible(self) -> list[str]:
        """Clients that may be sampled: all but those that stopped answering and have not restarted since."""
        for client, nonce in list(self.excluded.items()):
            if self.ledger.ready_nonce(client) != nonce:
                log.info("client %s is back (a new ready record); sampled again", client)
                del self.excluded[client]
        return [c.name for c in self.spec.clients if c.name not in self.excluded]

    def _selection(self, r: int) -> list[str]:
        """Round r's sample, seeded by the run: clientsPerRound plus overSelection of the eligible clients.

        Computed once, so the privacy budget is checked against exactly the sample that is published.
        """
        if r not in self._selected:
            eligible = self._eligible()
            k = min(self.spec.clients_per_round + self.spec.aggregation.over_selection, len(eligible))
            self._selected[r] = p.select_clients(eligible, k, self.spec.seed, r)
        return self._selected[r]

    def _last_round(self, rounds_done: int) -> bool:
        """Whether no further round may run: all are done, too many failed, or one more would exceed
        targetEpsilon. `rounds_done` counts closed rounds, failed ones included."""
        return (
            rounds_done - self.failed_total >= self.rounds
            or self._failure() is not None
            or self._stop_reason(rounds_done) is not None
        )

    def _failure(self) -> str | None:
        """Why the run fails: more failed rounds in a row than maxFailedRounds allows."""
        limit = self.spec.aggregation.max_failed_rounds
        if self.failed_streak <= limit:
            return None
        return f"aggregation.maxFailedRounds: {self.failed_streak} rounds in a row failed (the limit is {limit})"

    def _stop_reason(self, rounds_done: int) -> str | None:
        """Why the run stops before its configured rounds (the privacy budget), or None.

        The next round is refused if any client it selects would exceed targetEpsilon by taking part.
        """
        if self.dp is None or rounds_done - self.failed_total >= self.rounds:
            return None
        selected = self._selection(rounds_done)
        if not selected:
            return None
        worst = max(selected, key=lambda c: self.taken_part.get(c, 0))
        if self.dp.within_budget(self.taken_part.get(worst, 0) + 1):
            return None
        return (
            f"privacy.targetEpsilon: round {rounds_done} would raise client {worst}'s epsilon to "
            f"{self.dp.client_epsilon(self.taken_part.get(worst, 0) + 1):.4g} > "
            f"{self.spec.privacy.target_epsilon:g} (delta={self.spec.privacy.delta:g}); "
            f"stopped after {rounds_done} of {self.rounds} rounds"
        )

    # --- publishing -------------------------------------------------------------------------------

    def publish_global(
        self,
        r: int,
        state: State,
        server_state: State,
        final: bool = False,
        parent: p.GlobalMarker | None = None,
        summary_sha256: str | None = None,
    ) -> p.GlobalMarker:
        """Write round r's global (and server state), then commit its marker; a no-op if committed."""
        if self.ledger.verifies(r):
            return self.read_global_marker(r)
        data = save_state(state)
        digest = p.sha256(data)
        self.ledger.put_data(p.global_data(r, digest), data)
        state_sha = None
        if server_state:
            sdata = save_state(server_state)
            state_sha = p.sha256(sdata)
            self.ledger.put_data(p.server_state(r, state_sha), sdata)
        selected = [c.name for c in self.spec.clients] if final else self._selection(r)
        marker = p.GlobalMarker(
            round=r,
            sha256=digest,
            parent_sha256=parent.sha256 if parent else None,
            summary_sha256=summary_sha256,
            selected=selected,
            deadline=time.time() + self.spec.aggregation.round_timeout_seconds,
            final=final,
            server_state_sha256=state_sha,
            epoch=self.lease.epoch,
            failed=self.failed_total,
            created=time.time(),
        )
        self.lease.check()
        if not self.ledger.commit_own(p.global_marker(r), marker, p.GlobalMarker):
            return self._lost_race(r)
        if r == 0:  # the norm bound derives from it: no need to read it back
            self._initial_norm = update_norm({k: state[k] for k in self.trainable})
        log.info("round %d: global committed (%s)", r, "final" if final else f"selected {', '.join(selected)}")
        return marker

    def _lost_race(self, r: int) -> p.GlobalMarker:
        """Another aggregator committed round r first: continue from its marker unless it holds a later lease."""
        theirs = self.read_global_marker(r)
        if theirs.epoch > self.lease.epoch:
            raise LeaseLost(f"round {r} was committed under lease epoch {theirs.epoch} > {self.lease.epoch}; stopping")
        log.warning("round %d: committed first by a stale aggregator (epoch %d); continuing from it", r, theirs.epoch)
        return theirs

    def read_global_marker(self, r: int) -> p.GlobalMarker:
        marker = self.ledger.global_marker(r)
        if marker is None:
            raise FedtuneError(f"{self.store.url(p.global_marker(r))}: missing")
        return marker

    def load_global(self, marker: p.GlobalMarker) -> tuple[State, State]:
        state = load_state(self.ledger.global_bytes(marker))
        raw = self.ledger.server_state_bytes(marker)
        return state, (load_state(raw) if raw is not None else {})

    # --- collecting -------------------------------------------------------------------------------

    def _rules(self, reference: State) -> Rules:
        """What this round's updates must be; under DP clipping bounds every update, so no norm bound."""
        private = self.dp is not None
        encoding = str(self.spec.aggregation.encoding)
        return Rules(reference, encoding, None if private else self.norm_bound(), reveal=not private)

    def _check(self, gm: p.GlobalMarker, client: str, rules: Rules, spool: Spool | None) -> Accepted | None:
        """The client's update, checked; None if it has none yet. Rejected with the reason it is the
        client's fault, StorageError if it is not.

        Cheap checks come first: lineage and the weight from the marker, then the object's (see
        `update_check`).
        """
        marker = self.ledger.update_marker(gm.round, client)
        if marker is None:
            return None
        if marker.global_sha256 != gm.sha256:
            raise Rejected(f"trained on global {marker.global_sha256[:12]}…, not round {gm.round}'s {gm.sha256[:12]}…")
        cap = self.spec.client(client).data.max_examples
        if not 1 <= marker.examples <= cap:
            raise Rejected(f"examples {marker.examples} outside 1..{cap} (spec.clients[].data.maxExamples)")
        key = p.update_data(gm.round, client, marker.sha256)
        checked = update_check.check(self.store, key, marker.sha256, rules, spool, client)
        return Accepted(marker, checked.norm, checked.spooled)

    def norm_bound(self) -> float:
        """maxUpdateNorm, or a bound derived from the round-0 global: no finite update may overflow the
        average. Round 0's, not the current global's, so updates cannot grow the bound round after round."""
        explicit = self.spec.aggregation.max_update_norm
        if explicit is not None:
            return explicit
        if self._initial_norm is None:
            state, _ = self.load_global(self.read_global_marker(0))
            self._initial_norm = update_norm({k: state[k] for k in self.trainable})
        return DEFAULT_NORM_FACTOR * max(self._initial_norm, 1.0)

    def _reject(self, gm: p.GlobalMarker, client: str, reason: str, seen: Collected) -> None:
        """Record a rejection once, signed, so a restarted aggregator never reads that update again."""
        seen.rejected[client] = reason
        log.warning("round %d: rejected update of %s: %s", gm.round, client, reason)
        metrics.UPDATES_REJECTED.labels(*self.labels, client).inc()
        self.ledger.commit(p.rejection(gm.round, client), p.Rejection(client=client, reason=reason, round=gm.round))

    def _recorded_rejections(self, gm: p.GlobalMarker, seen: Collected) -> None:
        for client in gm.selected:
            try:
                rec = self.ledger.read(p.rejection(gm.round, client), p.Rejection, AGGREGATOR)
            except SignatureError as e:  # not ours: the update is judged afresh
                log.warning("ignoring %s", e)
                continue
            if rec is not None:
                seen.rejected[client] = rec.reason

    def _check_new(self, gm: p.GlobalMarker, reference: State, seen: Collected) -> None:
        """Check the updates of the clients not yet resolved, a few ahead at a time, and record each
        outcome in client order. A strategy that needs all updates at once gets each accepted update's
        checked bytes spooled to local disk, so that nothing needs reading from storage again."""
        pending = [c for c in gm.selected if c not in seen.resolved()]
        if not pending:
            return
        rules = self._rules(reference)
        if not self.strategy.single_pass and seen.spool is None:
            seen.spool = Spool()
        spool = seen.spool

        def attempt(client: str) -> Accepted | Failed | None:
            try:
                return self._check(gm, client, rules, spool)
            except Exception as e:  # one client's failure is that client's outcome, recorded in order below
                return Failed(type(e), str(e))

        # closing: should recording fail, the pool is stopped before the round's spool can be removed
        with contextlib.closing(ahead(pending, attempt)) as outcomes:
            for client, outcome in zip(pending, outcomes, strict=True):
                self._record(gm, client, outcome, seen)

    def _record(self, gm: p.GlobalMarker, client: str, outcome: Accepted | Failed | None, seen: Collected) -> None:
        """Note one client's outcome; a rejection is signed and stored at once."""
        match outcome:
            case None:
                pass
            case Failed(error=e) if issubclass(e, ObjectNotFound):
                pass
            case Failed(error=e) if issubclass(e, SignatureError):
                if client not in seen.unsigned:
                    log.warning("round %d: update of %s does not verify (yet): %s", gm.round, client, outcome.message)
                seen.unsigned[client] = outcome.message
            case Failed(error=e) if issubclass(e, StorageError):
                # The aggregator's side: retried on the next poll, never the client's fault.
                log.warning(
                    "round %d: storage error reading the update of %s (retrying): %s", gm.round, client, outcome.message
                )
            case Failed(error=e) if issubclass(e, FedtuneError):  # Rejected, or a marker that is not a valid record
                self._reject(gm, client, outcome.message, seen)
            case Failed(error=e):  # whatever else one client's objects provoke is that client's, not a crash
                self._reject(gm, client, f"unreadable update ({e.__name__}: {outcome.message[:200]})", seen)
            case Accepted():
                seen.accepted[client] = outcome.marker
                seen.norms[client] = outcome.norm
                if outcome.spooled is not None:
                    seen.spooled[client] = outcome.spooled

    def collect(self, gm: p.GlobalMarker, reference: State) -> Collected:
        """Wait until clientsPerRound updates are accepted, every selected client is resolved, or the round's
        time is up; every wait ends. With fewer than minClients valid updates the round then fails.

        The round's time runs on this process's monotonic clock from when it began collecting: a wall
        clock that jumps, or a run resumed after a long outage, does not close a round early.
        """
        seen = Collected()
        self._recorded_rejections(gm, seen)
        need = self.spec.aggregation.min_clients
        opened = time.monotonic()
        timeout = self.spec.aggregation.round_timeout_seconds

        target = min(self.spec.clients_per_round, len(gm.selected))

        def done() -> bool | None:
            self._check_new(gm, reference, seen)
            if seen.resolved() >= set(gm.selected) or len(seen.accepted) >= target:
                return True
            if time.monotonic() - opened >= timeout:
                seen.timed_out = True
                if len(seen.accepted) < need:
                    log.warning(
                        "round %d: time is up with %d of minClients=%d valid updates",
                        gm.round,
                        len(seen.accepted),
                        need,
                    )
                return True
            return None

        try:
            poll(done, what=f"updates of round {gm.round}")
            for client, why in seen.unsigned.items():
                if client not in seen.resolved():
                    self._reject(gm, client, why, seen)
        except BaseException:
            seen.close()
            raise
        return seen

    def _weight(self, client: str, marker: p.UpdateMarker) -> float:
        return self.spec.client(client).weight or float(marker.examples)

    def _updates(self, gm: p.GlobalMarker, seen: Collected, rules: Rules) -> Iterable[ClientUpdate]:
        """The accepted updates in client order: lazily from the spool for a strategy that needs them all
        at once; read again from storage a few ahead of a single-pass one, as it adds the current one."""
        clients = sorted(seen.accepted)
        if not self.strategy.single_pass:
            return [ClientUpdate(c, self._weight(c, seen.accepted[c]), seen.spooled[c], seen.norms[c]) for c in clients]

        def reread(client: str) -> ClientUpdate:
            marker = seen.accepted[client]
            key = p.update_data(gm.round, client, marker.sha256)
            try:
                delta = update_check.load(self.store, key, marker.sha256, rules)
            except Rejected as e:
                raise Changed(client, f"changed after it was accepted: {e}") from None
            return ClientUpdate(client, self._weight(client, marker), delta, seen.norms[client])

        return ahead(clients, reread)

    def _aggregate(
        self, gm: p.GlobalMarker, state: State, server: State, seen: Collected, rules: Rules
    ) -> tuple[State, State] | str:
        """The next global and server state from the accepted updates, or why the round failed.

        Every rejection is decided and recorded before the strategy starts, and it sees accepted updates
        only. Should an accepted update's object change before it is read again, that update is rejected
        and the aggregate computed afresh without it.
        """
        need = self.spec.aggregation.min_clients
        while len(seen.accepted) >= need:
            try:
                new_state, new_server = self.strategy.aggregate(state, self._updates(gm, seen, rules), server)
            except Changed as e:
                self._reject(gm, e.client, str(e), seen)
                del seen.accepted[e.client]
                continue
            if not (all_finite(new_state) and all_finite(new_server)):
                return "the aggregate is not finite"
            return new_state, new_server
        return f"{len(seen.accepted)} valid updates, fewer than minClients={need}"

    # --- one round --------------------------------------------------------------------------------

    def close_round(self, gm: p.GlobalMarker) -> None:
        """Aggregate round gm.round and commit the global of the next round (the same one if the round failed)."""
        r = gm.round
        state, server = self.load_global(gm)
        reference = {k: state[k] for k in self.trainable}
        seen = self.collect(gm, reference)
        # Only a round whose time ran out shows who stopped answering; over-selected stragglers did not.
        answered = seen.resolved() | set(self.excluded) if seen.timed_out else set(gm.selected)
        # With over-selection, the first clientsPerRound valid updates win; later ones are left out.
        winners = list(seen.accepted)[: self.spec.clients_per_round]
        seen.accepted = {c: seen.accepted[c] for c in winners}
        try:
            outcome = self._aggregate(gm, state, server, seen, self._rules(reference))
        finally:
            seen.close()
        failed: str | None = None
        if isinstance(outcome, str):
            failed = outcome
            log.warning("round %d failed, global kept: %s", r, failed)
            new_state, new_server = state, server
        else:
            new_state, new_server = outcome
        accepted = seen.accepted
        participants = [] if failed else sorted(accepted)
        for client in sorted(set(gm.selected) - answered):
            self.excluded[client] = self.ledger.ready_nonce(client)
            log.warning("round %d: %s did not answer; left out of sampling until it announces itself again", r, client)
        self.failed_streak = self.failed_streak + 1 if failed else 0
        self.failed_total += 1 if failed else 0
        summary = self._summary(gm, seen, participants)
        summary.failed = failed
        summary.failed_streak, summary.failed_total = self.failed_streak, self.failed_total
        summary.excluded = dict(sorted(self.excluded.items()))
        self.lease.check()
        digest = self.ledger.put_summary(summary)
        final = self._last_round(r + 1)
        committed = self.publish_global(r + 1, new_state, new_server, final=final, parent=gm, summary_sha256=digest)
        if committed.summary_sha256 != digest:  # another aggregator closed this round: its record stands
            self._carry(r + 1)
            return
        self._observe(summary, {c: accepted[c].bytes for c in participants})

    def _summary(self, gm: p.GlobalMarker, seen: Collected, participants: list[str]) -> p.RoundSummary:
        ms = {c: seen.accepted[c] for c in participants}
        summary = p.RoundSummary(
            round=gm.round,
            participants=participants,
            rejected=[p.Rejection(client=c, reason=why) for c, why in sorted(seen.rejected.items())],
            missing=sorted(set(gm.selected) - seen.resolved()),
            seconds=time.time() - gm.created,
            bytes=sum(m.bytes for m in ms.values()),
            updates={c: m.sha256 for c, m in ms.items()},
        )
        if self.dp is not None:
            # Only noised outputs are released: no single client's norm or loss, just what each has spent.
            for c in participants:
                self.taken_part[c] = self.taken_part.get(c, 0) + 1
            eps = {c.name: self.dp.client_epsilon(self.taken_part.get(c.name, 0)) for c in self.spec.clients}
            finite = {c: e for c, e in eps.items() if math.isfinite(e)}
            summary.client_epsilon = finite
            summary.epsilon = max(finite.values(), default=None)
            summary.taken_part = dict(sorted(self.taken_part.items()))
            return summary
        weights = {c: float(m.examples) for c, m in ms.items()}
        train = [(m.metrics.train_loss, weights[c]) for c, m in ms.items() if m.metrics.train_loss is not None]
        evals = [
            (m.metrics.eval_loss, float(m.metrics.eval_examples))
            for m in ms.values()
            if m.metrics.eval_loss is not None
        ]
        summary.train_loss = _weighted(train)
        summary.eval_loss = _weighted(evals)
        summary.client_metrics = {c: m.metrics for c, m in ms.items()}
        summary.update_norms = {c: seen.norms[c] for c in participants}
        return summary

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
        for c, eps in s.client_epsilon.items():
            metrics.CLIENT_EPSILON.labels(*self.labels, c).set(eps)
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
        if self.ledger.finished():
            return self.ledger.final()  # type: ignore[return-value]
        evals = self._collect_evals(gm)
        state, _ = self.load_global(gm)
        load_adapter(self.model, state)
        files: dict[str, bytes] = {}
        with tempfile.TemporaryDirectory() as tmp:
            self.model.save_pretrained(tmp)
            for key in (p.FINAL_ADAPTER, p.FINAL_CONFIG):
                files[key] = (Path(tmp) / key.rsplit("/", 1)[1]).read_bytes()
        self.lease.check()
        for key, data in files.items():
            # The same final global always saves to the same bytes, so a racing writer cannot make them differ.
            self.store.put(key, data)
        total = sum(e.eval_examples for e in evals.values())
        released = self.dp is None  # under DP no client's own loss is released, nor their average
        final = p.FinalSummary(
            rounds=gm.round - self.failed_total,
            failed=self._failure(),
            eval_loss=sum(e.eval_loss * e.eval_examples for e in evals.values()) / total
            if total and released
            else None,
            client_eval_loss={c: e.eval_loss for c, e in sorted(evals.items())} if released else {},
            adapter=self.store.url(p.FINAL),
            adapter_sha256=p.sha256(files[p.FINAL_ADAPTER]),
            config_sha256=p.sha256(files[p.FINAL_CONFIG]),
            chain=self._chain(gm),
            stopped_early=self._stop_reason(gm.round),
            epoch=self.lease.epoch,
        )
        if final.stopped_early:
            log.warning("%s", final.stopped_early)
        self.lease.check()
        if not self.ledger.commit_own(p.FINAL_SUMMARY, final, p.FinalSummary):
            final = self.ledger.final() or final
        if final.eval_loss is not None:
            metrics.EVAL_LOSS.labels(*self.labels).set(final.eval_loss)
        log.info("final adapter written to %s (sha256 %s)", final.adapter, final.adapter_sha256)
        return final

    def _chain(self, last: p.GlobalMarker) -> list[str]:
        """sha256 of every global from round 0 to `last`, checking each parent link on the way."""
        chain = [last.sha256]
        marker = last
        while marker.round > 0:
            parent = self.read_global_marker(marker.round - 1)
            if marker.parent_sha256 != parent.sha256:
                raise FedtuneError(f"{self.store.url(p.global_marker(marker.round))}: parent link broken")
            chain.append(parent.sha256)
            marker = parent
        return chain[::-1]

    def _collect_evals(self, gm: p.GlobalMarker) -> dict[str, p.EvalMarker]:
        evals: dict[str, p.EvalMarker] = {}
        evals_rejected: set[str] = set()
        opened, timeout = time.monotonic(), self.spec.aggregation.round_timeout_seconds

        def done() -> bool | None:
            for c in gm.selected:
                if c not in evals:
                    try:
                        e = self.ledger.eval_marker(gm.round, c)
                    except FedtuneError as err:
                        log.warning("final evaluation of %s rejected: %s", c, err)
                        evals_rejected.add(c)
                        continue
                    if e is not None and e.global_sha256 == gm.sha256:
                        evals[c] = e
            answered = len(evals) + len(evals_rejected) == len(gm.selected)
            return True if answered or time.monotonic() - opened >= timeout else None

        poll(done, what="final evaluations")
        return evals

    def run(self) -> p.FinalSummary | None:
        """Aggregate under the lease until the final adapter is written; None if another aggregator finished."""
        metrics.ROUNDS_TOTAL.labels(*self.labels).set(self.rounds)
        for c in self.spec.clients:  # every client's series exists from the start: a panel shows 0, not "no data"
            for counter in (metrics.UPDATES_ACCEPTED, metrics.UPDATES_REJECTED, metrics.UPDATE_BYTES):
                counter.labels(*self.labels, c.name)
        if not self.lease.acquire(done=self.ledger.finished):
            log.info("the run was finished by another aggregator; nothing to do")
            return None
        try:
            return self._rounds()
        finally:
            self.lease.release()

    def _spec_record(self) -> p.SpecRecord:
        """The spec, and where the aggregator knows its resource, what a client in another cluster joins by."""
        record = p.SpecRecord(spec=_spec_doc(self.spec))
        if self.resource is not None:
            record.resource = _json_doc(resource_json(self.resource))
            record.keys = _json_doc(self.ledger.trust.to_json())
        return record

    def _rounds(self) -> p.FinalSummary:
        self.lease.check()
        self.ledger.store.put(p.SPEC, self.ledger.signed(p.SPEC, self._spec_record()))
        latest = self.ledger.latest_global()
        if latest is None:
            self.publish_global(0, adapter_state(self.model), {}, final=self._last_round(0))
            latest = 0
        else:
            log.info("resuming at round %d", latest)
            self._carry(latest)
        while True:
            gm = self.read_global_marker(latest)
            if gm.final:
                return self.finalize(gm)
            self.close_round(gm)
            latest += 1


def _json_doc(text: str) -> dict[str, object]:
    doc: dict[str, object] = json.loads(text)
    return doc


def _spec_doc(spec: FederatedFineTuneSpec) -> dict[str, object]:
    doc: dict[str, object] = spec.model_dump(mode="json", by_alias=True)
    return doc


def _weighted(pairs: list[tuple[float, float]]) -> float | None:
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
