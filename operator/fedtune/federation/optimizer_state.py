"""A client's AdamW moments kept from one round of training to its next, in its own prefix.

They are written like updates (content-addressed data, then a marker the client signs) and tied to the
update that same training produced, so a restarted client resumes them and no other party can put
moments of its choosing under it. Anything missing or not verifying means AdamW starts afresh.
"""

from __future__ import annotations

import logging

from fedtune.aggregation.encoding import load_state, save_state
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.federation.signing import client_party
from fedtune.training.moments import State

log = logging.getLogger("fedtune.client")


def keep(ledger: Ledger, client: str, r: int, update_sha256: str, state: State) -> None:
    """Store the moments after round r's training, whose committed update has `update_sha256`."""
    payload = save_state(state)
    digest = p.sha256(payload)
    ledger.put_data(p.optimizer_state_data(r, client, digest), payload)
    marker = p.OptimizerStateMarker(
        client=client, round=r, sha256=digest, update_sha256=update_sha256, bytes=len(payload)
    )
    ledger.commit_own(p.optimizer_state_marker(r, client), marker, p.OptimizerStateMarker)


def last_trained(ledger: Ledger, client: str, before: int) -> int | None:
    """The last round before `before` this client committed an update for (existence checks only)."""
    for r in range(before - 1, -1, -1):
        if ledger.store.exists(p.update_marker(r, client)):
            return r
    return None


def recall(ledger: Ledger, client: str, r: int) -> State | None:
    """The moments kept after this client's training of round r; None, logged, if missing or refused."""
    try:
        return _read(ledger, client, r)
    except FedtuneError as e:
        log.warning("the optimizer state kept after round %d is refused, AdamW starts afresh: %s", r, e)
        return None


def _read(ledger: Ledger, client: str, r: int) -> State | None:
    key = p.optimizer_state_marker(r, client)
    marker = ledger.read(key, p.OptimizerStateMarker, client_party(client))
    if marker is None:
        log.info("no optimizer state was kept after round %d; AdamW starts afresh", r)
        return None
    if (marker.client, marker.round) != (client, r):
        raise FedtuneError(f"{ledger.store.url(key)}: names client {marker.client} round {marker.round}")
    update = ledger.update_marker(r, client)
    if update is None or update.sha256 != marker.update_sha256:
        raise FedtuneError(f"{ledger.store.url(key)}: kept by a training whose update was not committed")
    return load_state(ledger.data(p.optimizer_state_data(r, client, marker.sha256), marker.sha256, marker.bytes))
