"""The aggregator's lease: at most one aggregator of a run commits, and a stale one commits nothing.

Epochs are claimed with create-if-absent (`coordinator/lease/NNNNNN.json`), so two aggregators started
together get different answers. The holder rewrites a heartbeat object every `seconds / 4`. Another
aggregator takes the next epoch only after it has seen the heartbeat unchanged for `seconds` by its own
monotonic clock: no wall clocks are compared, so a clock jump on any machine changes nothing. Before
each commit the holder checks that no later epoch exists and that its last heartbeat landed recently;
a marker that loses its create-if-absent race tells the loser the rest.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable

from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.storage import StorageError

log = logging.getLogger("fedtune.lease")

DEFAULT_SECONDS = 10.0
_CLAIM = re.compile(r"\d{6}\.json")


class LeaseLost(FedtuneError):
    """Another aggregator holds a later epoch: this one must stop without committing."""


def lease_seconds() -> float:
    return float(os.environ.get("FEDTUNE_LEASE_SECONDS", DEFAULT_SECONDS))


class Lease:
    """This process's hold on the run's aggregator lease."""

    def __init__(self, ledger: Ledger, seconds: float | None = None) -> None:
        self.ledger, self.store = ledger, ledger.store
        self.seconds = seconds if seconds is not None else lease_seconds()
        self.holder = f"{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"
        self.epoch = 0
        self._beats = 0
        self._last_beat = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- taking it ---------------------------------------------------------------------------------

    def _latest_epoch(self) -> int:
        """The highest epoch whose claim the aggregator signed (junk or forged claims do not count)."""
        names = (k.rsplit("/", 1)[1] for k in self.store.list(p.LEASES))
        epochs = sorted((int(n[:6]) for n in names if _CLAIM.fullmatch(n)), reverse=True)
        return next((e for e in epochs if self._claimed(e)), 0)

    def _claimed(self, epoch: int) -> bool:
        try:
            return self.ledger.read(p.lease_claim(epoch), p.LeaseClaim, "aggregator") is not None
        except FedtuneError as e:
            log.warning("ignoring %s", e)
            return False

    def acquire(self, done: Callable[[], bool]) -> bool:
        """Hold the lease (True), or return False once `done()` says the run needs no aggregator."""
        seen: dict[int, tuple[bytes | None, float]] = {}
        waiting = False
        while True:
            current = self._latest_epoch()
            if current == 0 or self._expired(current, seen):
                if self._claim(current + 1):
                    return True
                continue
            if done():
                return False
            if not waiting:
                claim = self.ledger.read(p.lease_claim(current), p.LeaseClaim, "aggregator")
                who = claim.holder if claim else "?"  # verified by _latest_epoch
                log.warning(
                    "another aggregator holds the lease (epoch %d, %s); standing by until its heartbeat stops for %gs",
                    current,
                    who,
                    self.seconds,
                )
                waiting = True
            time.sleep(self.seconds / 8)

    def _expired(self, epoch: int, seen: dict[int, tuple[bytes | None, float]]) -> bool:
        beat = self.store.get_or_none(p.lease_beat(epoch))
        now = time.monotonic()
        if epoch not in seen or seen[epoch][0] != beat:
            seen[epoch] = (beat, now)
            return False
        return now - seen[epoch][1] >= self.seconds

    def _claim(self, epoch: int) -> bool:
        claim = p.LeaseClaim(epoch=epoch, holder=self.holder, seconds=self.seconds)
        if not self.ledger.commit(p.lease_claim(epoch), claim):
            return False
        self.epoch = epoch
        self._beat()
        self._thread = threading.Thread(target=self._beating, name="lease-heartbeat", daemon=True)
        self._thread.start()
        log.info("holding the aggregator lease, epoch %d (%s)", epoch, self.holder)
        return True

    # --- keeping it --------------------------------------------------------------------------------

    def _beat(self) -> None:
        self._beats += 1
        body = {"epoch": self.epoch, "holder": self.holder, "beat": self._beats}
        self.store.put(p.lease_beat(self.epoch), json.dumps(body).encode())
        self._last_beat = time.monotonic()

    def _beating(self) -> None:
        while not self._stop.wait(self.seconds / 4):
            try:
                self._beat()
            except StorageError as e:  # the commit check notices a heartbeat that stopped landing
                log.warning("lease heartbeat failed: %s", e)

    def check(self) -> None:
        """Raise LeaseLost unless this process may still commit under its epoch."""
        if time.monotonic() - self._last_beat > self.seconds / 2:
            # Paused or cut off for a while: prove liveness again before trusting the epoch.
            self._beat()
        if self._claimed(self.epoch + 1):
            self.release()
            raise LeaseLost(
                f"aggregator lease epoch {self.epoch} was taken over by epoch {self.epoch + 1}: "
                "another aggregator runs this round; this one stops without committing"
            )

    def release(self) -> None:
        self._stop.set()
