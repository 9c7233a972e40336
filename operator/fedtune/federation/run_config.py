"""The config every party reads at start: the resource it runs and the run's pinned public keys.

The operator mounts it from a ConfigMap (the local runner writes the same files to a folder), so no
party takes its spec or its peers' keys from the bucket, where another party might have written them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedtune.api import FederatedFineTune, parse_resource
from fedtune.errors import FedtuneError
from fedtune.federation.signing import AGGREGATOR, Signer, Trust, check_pair, client_party, load_private

RESOURCE_FILE = "resource.json"
KEYS_FILE = "keys.json"


@dataclass(frozen=True)
class RunConfig:
    resource: FederatedFineTune
    trust: Trust

    @classmethod
    def load(cls, folder: Path) -> RunConfig:
        paths = {name: folder / name for name in (RESOURCE_FILE, KEYS_FILE)}
        try:
            texts = {name: path.read_text() for name, path in paths.items()}
        except OSError as e:
            raise FedtuneError(f"run config {folder}: cannot read {e.filename}: {e.strerror}") from None
        try:
            doc = json.loads(texts[RESOURCE_FILE])
        except json.JSONDecodeError as e:
            raise FedtuneError(f"{paths[RESOURCE_FILE]}: not JSON: {e}") from None
        resource = parse_resource(doc, str(paths[RESOURCE_FILE]))
        return cls(resource, Trust.from_json(texts[KEYS_FILE], str(paths[KEYS_FILE])))

    def write(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / RESOURCE_FILE).write_text(resource_json(self.resource))
        (folder / KEYS_FILE).write_text(self.trust.to_json())

    def key_field(self, party: str) -> str:
        """Where a party's public key is pinned, for messages that must name it."""
        spec = self.resource.spec
        if party == AGGREGATOR:
            return "spec.aggregator.publicKey" if spec.aggregator.public_key else f"{KEYS_FILE}: aggregator"
        name = party.removeprefix("client ")
        i = [c.name for c in spec.clients].index(name)
        return f"spec.clients[{i}].publicKey" if spec.clients[i].public_key else f"{KEYS_FILE}: clients.{name}"

    def signer(self, party: str, key_file: Path) -> Signer:
        """This party's signing key, checked against the public key pinned for it."""
        key = load_private(key_file, f"{party}'s signing key")
        check_pair(key, self.trust.public_key(party), self.key_field(party), str(key_file))
        return Signer(self.trust.run, party, key)

    def client_signer(self, name: str, key_file: Path) -> Signer:
        names = [c.name for c in self.resource.spec.clients]
        if name not in names:
            raise FedtuneError(f"client {name!r} is not in spec.clients ({', '.join(names)})")
        return self.signer(client_party(name), key_file)


def resource_json(resource: FederatedFineTune) -> str:
    doc = resource.model_dump(mode="json", by_alias=True, exclude_none=True, exclude={"status"})
    return json.dumps(doc, indent=2, sort_keys=True)
