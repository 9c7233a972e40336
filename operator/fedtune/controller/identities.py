"""A run's signing identities: each party's pinned public key, generated once by the operator when the spec
names none, and kept by the operator once the run's ConfigMap pins them."""

from __future__ import annotations

from fedtune.api.spec import FederatedFineTune
from fedtune.controller import builders
from fedtune.controller.kube import Credentials, Kube
from fedtune.controller.names import key_secret_name, spec_config_map_name
from fedtune.errors import FedtuneError
from fedtune.federation.run_config import KEYS_FILE
from fedtune.federation.signing import (
    AGGREGATOR,
    KEY_FILE,
    Trust,
    client_party,
    encode_public,
    generate,
    parse_private,
    private_pem,
)


class KeyConflict(FedtuneError):
    """The name of a run's generated key Secret is taken by a Secret the run does not own."""


def identities(kube: Kube, res: FederatedFineTune, secrets: dict[str, Credentials]) -> Trust:
    """The run's pinned public keys: each party's own publicKey, or a key pair generated once for the run.

    Generated private keys go into one Secret per party (owned by the run, mounted into that party's pod
    only); a Secret that already exists (a restarted operator) is reused, never replaced.
    """
    spec, meta = res.spec, res.metadata
    keys: dict[str, str] = {}
    for party_name, party in [(AGGREGATOR, spec.aggregator), *((client_party(c.name), c) for c in spec.clients)]:
        if party.public_key:
            keys[party_name] = party.public_key
            continue
        name = key_secret_name(meta.name, party_name)
        found = secrets.get(name)
        if found is None:
            pem = private_pem(generate())
            if not kube.create(builders.key_secret(res, party_name, pem)):
                found = kube.credentials(meta.namespace, name).get(name)
        if found is not None:
            if found.runs != {meta.uid}:  # a Secret of that name this run did not create: never use its key
                raise KeyConflict(f"Secret {meta.namespace}/{name} exists and does not belong to this run")
            pem = found.data[KEY_FILE]
        keys[party_name] = encode_public(parse_private(pem, f"Secret {meta.namespace}/{name}").public_key())
    clients = {c.name: keys[client_party(c.name)] for c in spec.clients}
    return Trust(run=builders.run_id(res), aggregator=keys[AGGREGATOR], clients=clients)


class PinnedKeys:
    """Each run's keys as its ConfigMap pins them (what its pods verify with), by uid, read once: they never
    change while the ConfigMap exists. Kept in kopf's memo; a deleted run's are forgotten."""

    def __init__(self) -> None:
        self._by_uid: dict[str, Trust] = {}

    def of(self, kube: Kube, res: FederatedFineTune) -> Trust | None:
        uid = res.metadata.uid or ""
        if uid not in self._by_uid:
            name = spec_config_map_name(res.metadata.name)
            data = kube.config_map(res.metadata.namespace, name)
            if not data or KEYS_FILE not in data:
                return None
            self._by_uid[uid] = Trust.from_json(data[KEYS_FILE], f"ConfigMap {name}")
        return self._by_uid[uid]

    def forget(self, uid: str) -> None:
        self._by_uid.pop(uid, None)
