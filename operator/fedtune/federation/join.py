"""Joining a run from another cluster: the silo pins only the coordinator's public key and the run's
location; the run's resource and every party's key come from the aggregator's signed spec record there.

The record is verified against the pinned key before anything in it is believed, the run id included (the
signature covers it), so a party with write access to the bucket cannot steer a silo into another run, a
forged spec or a forged set of keys.
"""

from __future__ import annotations

import json

from fedtune.api import parse_resource
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.records import COORDINATOR_RECORD_BYTES
from fedtune.federation.run_config import RunConfig
from fedtune.federation.signing import AGGREGATOR, SignatureError, Trust
from fedtune.storage import ObjectNotFound, ObjectStore


class JoinError(FedtuneError):
    """Why a silo cannot join (yet): a reason for its condition, and a message naming the field at fault."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def joined_run(store: ObjectStore, coordinator_key: str, client: str) -> RunConfig:
    """The run rooted at `store` that `client` takes part in from outside, as its coordinator signed it."""
    url = store.url(p.SPEC)
    try:
        raw = store.get_at_most(p.SPEC, COORDINATOR_RECORD_BYTES)
    except ObjectNotFound:
        raise JoinError(
            "RunNotFound", f"spec.runRoot: no run at {store.url('')} ({p.SPEC} not found; has its aggregator started?)"
        ) from None
    try:
        claimed = json.loads(raw)["keys"]["run"]
        body = Trust(run=str(claimed), aggregator=coordinator_key).verify(p.SPEC, raw, AGGREGATOR)
    except (KeyError, TypeError, ValueError, RecursionError, SignatureError) as e:
        message = f"spec.coordinatorPublicKey: {url} is not signed with this key: {e}"
        raise JoinError("CoordinatorKeyMismatch", message) from None
    try:
        record = p.parse(p.SpecRecord, body, url)
        if record.resource is None or record.keys is None:
            raise FedtuneError(f"{url}: written by an aggregator that publishes no resource and keys")
        trust = Trust.from_json(json.dumps(record.keys), url)
        resource = parse_resource(record.resource, url)
    except FedtuneError as e:
        raise JoinError("RunNotJoinable", str(e)) from None
    if trust.aggregator != coordinator_key:
        raise JoinError("CoordinatorKeyMismatch", f"spec.coordinatorPublicKey: {url} pins another aggregator key")
    names = [c.name for c in resource.spec.clients]
    found = next((c for c in resource.spec.clients if c.name == client), None)
    if found is None:
        raise JoinError(
            "ClientNotInRun", f"spec.clientName: {client!r} is not a client of this run ({', '.join(names)})"
        )
    if not found.external:
        raise JoinError(
            "ClientNotExternal",
            f"spec.clientName: {client!r} runs in the coordinator's cluster (its spec.clients entry is not external)",
        )
    return RunConfig(resource, trust)
