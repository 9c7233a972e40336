"""Signed, verified access to a run root: the one way the protocol reads and writes its records.

Every read checks, in order: the signature against the pinned key of the party that owns the prefix,
the record's own claims (round, client) against where it was found, then the data's sha256. A writer
signs with its own key and can only write under its own prefix (the bucket policy enforces that).
"""

from __future__ import annotations

import logging
from typing import TypeVar

from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.signing import AGGREGATOR, SignatureError, Signer, Trust, client_party
from fedtune.storage import ObjectNotFound, ObjectStore

log = logging.getLogger("fedtune.records")

# Records are small: a larger one is refused unread. The coordinator's hold every client's name.
CLIENT_RECORD_BYTES = 1 << 20
COORDINATOR_RECORD_BYTES = 16 << 20

R = TypeVar("R", bound=p.Record)


class Ledger:
    """One run root seen through its pinned keys; `signer` is this process's own identity (None: read only)."""

    def __init__(self, store: ObjectStore, trust: Trust, signer: Signer | None = None) -> None:
        self.store, self.trust, self.signer = store, trust, signer

    # --- generic ---------------------------------------------------------------------------------

    def read(self, key: str, model: type[R], party: str) -> R | None:
        """The record at key signed by party, None if absent; SignatureError if forged or altered."""
        limit = COORDINATOR_RECORD_BYTES if party == AGGREGATOR else CLIENT_RECORD_BYTES
        try:
            raw = self.store.get_at_most(key, limit)
        except ObjectNotFound:
            return None
        return p.parse(model, self.trust.verify(key, raw, party), self.store.url(key))

    def signed(self, key: str, record: p.Record) -> bytes:
        if self.signer is None:
            raise FedtuneError(f"{self.store.url(key)}: this process holds no signing key")
        return self.signer.sign(key, p.dumps(record))

    def commit(self, key: str, record: p.Record) -> bool:
        """Create a signed marker only if absent; True if this call created it."""
        return self.store.put_if_absent(key, self.signed(key, record))

    def commit_own(self, key: str, record: p.Record, model: type[R]) -> bool:
        """Commit under this process's own prefix, replacing a record there that its owner never signed.

        Such a record can only exist where the bucket policy is missing and another party wrote into a
        prefix that is not its own; the owner's signature, not the first write, decides what stands.
        """
        if self.commit(key, record):
            return True
        assert self.signer is not None
        try:
            self.read(key, model, self.signer.party)
            return False
        except SignatureError as e:
            log.warning("replacing a record its owner did not sign: %s", e)
            self.store.put(key, self.signed(key, record))
            return True

    def data(self, key: str, expected_sha256: str, limit: int | None = None) -> bytes:
        """Object bytes whose sha256 matches the marker that named them (at most `limit` bytes are read)."""
        raw = self.store.get(key) if limit is None else self.store.get_at_most(key, limit)
        return p.check_digest(self.store.url(key), raw, expected_sha256)

    def put_data(self, key: str, data: bytes) -> None:
        """Write a content-addressed object (its key holds its digest): an existing one already has these bytes."""
        self.store.put_if_absent(key, data)

    # --- the coordinator's records ---------------------------------------------------------------

    def global_marker(self, r: int) -> p.GlobalMarker | None:
        gm = self.read(p.global_marker(r), p.GlobalMarker, AGGREGATOR)
        if gm is not None and gm.round != r:
            raise FedtuneError(f"{self.store.url(p.global_marker(r))}: names round {gm.round}, not {r}")
        return gm

    def latest_global(self, hint: int | None = None) -> int | None:
        """The highest round with a committed global marker that verifies.

        Globals are committed in order, so the candidate is found with existence checks alone (no listing,
        which a client's credentials do not allow): forward from a `hint` known to be committed, or by
        doubling then bisecting from round 0. A candidate that does not verify (a marker forged where the
        bucket policy is missing) is skipped: the answer is then the last verified marker stepping from
        the hint.
        """
        candidate = self._latest_existing(hint)
        # The hint is a round its caller already verified: an idle poller reads no marker at all.
        if candidate is None or candidate == hint or self.verifies(candidate):
            return candidate
        r = hint if hint is not None and hint >= 0 and self.verifies(hint) else -1
        while r + 1 < candidate and self.verifies(r + 1):
            r += 1
        return r if r >= 0 else None

    def verifies(self, r: int) -> bool:
        try:
            return self.global_marker(r) is not None
        except SignatureError as e:
            log.warning("ignoring %s", e)
            return False

    def _latest_existing(self, hint: int | None) -> int | None:
        exists = self.store.exists
        lo = hint if hint is not None and hint >= 0 and exists(p.global_marker(hint)) else -1
        if lo < 0 and not exists(p.global_marker(0)):
            return None
        lo, step = max(lo, 0), 1
        while exists(p.global_marker(lo + step)):
            lo, step = lo + step, step * 2
        hi = lo + step  # absent
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if exists(p.global_marker(mid)) else (lo, mid)
        return lo

    def global_bytes(self, gm: p.GlobalMarker) -> bytes:
        return self.data(p.global_data(gm.round, gm.sha256), gm.sha256)

    def server_state_bytes(self, gm: p.GlobalMarker) -> bytes | None:
        if not gm.server_state_sha256:
            return None
        return self.data(p.server_state(gm.round, gm.server_state_sha256), gm.server_state_sha256)

    def summary(self, r: int) -> p.RoundSummary | None:
        """Round r's record, as named by the global it produced (round r + 1)."""
        nxt = self.global_marker(r + 1)
        if nxt is None or nxt.summary_sha256 is None:
            return None
        key = p.summary(r, nxt.summary_sha256)
        raw = self.data(key, nxt.summary_sha256)
        return p.parse(p.RoundSummary, self.trust.verify(p.summary_name(r), raw, AGGREGATOR), self.store.url(key))

    def put_summary(self, s: p.RoundSummary) -> str:
        """Write round s.round's record, content-addressed; returns its sha256 for the next global's marker."""
        raw = self.signed(p.summary_name(s.round), s)
        digest = p.sha256(raw)
        self.put_data(p.summary(s.round, digest), raw)
        return digest

    def final(self) -> p.FinalSummary | None:
        return self.read(p.FINAL_SUMMARY, p.FinalSummary, AGGREGATOR)

    def finished(self) -> bool:
        """Whether a final summary signed by the aggregator exists (a forged one does not count)."""
        try:
            return self.final() is not None
        except SignatureError as e:
            log.warning("ignoring %s", e)
            return False

    # --- the clients' records --------------------------------------------------------------------

    def _client_record(self, key: str, model: type[R], client: str, r: int) -> R | None:
        rec = self.read(key, model, client_party(client))
        if rec is not None and (getattr(rec, "client", client), getattr(rec, "round", r)) != (client, r):
            raise FedtuneError(
                f"{self.store.url(key)}: names client {getattr(rec, 'client', '?')} round "
                f"{getattr(rec, 'round', '?')}, not {client} round {r}"
            )
        return rec

    def update_marker(self, r: int, client: str) -> p.UpdateMarker | None:
        return self._client_record(p.update_marker(r, client), p.UpdateMarker, client, r)

    def update_bytes(self, r: int, client: str, marker: p.UpdateMarker, limit: int) -> bytes:
        return self.data(p.update_data(r, client, marker.sha256), marker.sha256, limit)

    def ready_nonce(self, client: str) -> str:
        """The nonce of the client's latest ready record ('' if none, or if it does not verify)."""
        try:
            rec = self.read(p.ready(client), p.ReadyRecord, client_party(client))
        except FedtuneError:
            return ""
        return rec.nonce if rec is not None and rec.client == client else ""

    def eval_marker(self, r: int, client: str) -> p.EvalMarker | None:
        return self._client_record(p.eval_marker(r, client), p.EvalMarker, client, r)
