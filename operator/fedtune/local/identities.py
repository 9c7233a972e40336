"""Identities of a local run: one key pair per party, generated once and kept beside the run.

A local run is one machine and one user, so its private keys live in the run folder (`config/private/`,
mode 0600); what matters is that every process goes through the same signed code path as on a cluster.
Resuming keeps the keys; `--fresh` makes new ones.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from fedtune.api import FederatedFineTune
from fedtune.errors import FedtuneError
from fedtune.federation.records import Ledger
from fedtune.federation.run_config import RunConfig, resource_json
from fedtune.federation.signing import AGGREGATOR, Trust, encode_public, generate, private_pem
from fedtune.storage import open_store

CONFIG = "config"


def key_path(folder: Path, party: str) -> Path:
    return folder / CONFIG / "private" / f"{party.replace(' ', '-')}.pem"


def _new_key(path: Path) -> str:
    key = generate()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(private_pem(key))
    return encode_public(key.public_key())


def local_config(folder: Path, resource: FederatedFineTune) -> RunConfig:
    """The run's config in `folder/config`: written on first start, checked unchanged on a resume."""
    for path, party in resource.spec.parties():
        if party.public_key:
            raise FedtuneError(
                f"{path}.publicKey: a local run generates its own keys; remove publicKey and signingKeySecretRef"
            )
    config_dir = folder / CONFIG
    if (config_dir / "keys.json").exists():
        existing = RunConfig.load(config_dir)
        if resource_json(existing.resource) != resource_json(resource):
            raise FedtuneError(f"{folder}: this run folder holds a different spec; use another run name or --fresh")
        return existing
    clients = {c.name: _new_key(key_path(folder, f"client {c.name}")) for c in resource.spec.clients}
    aggregator = _new_key(key_path(folder, AGGREGATOR))
    trust = Trust(run=f"local/{resource.metadata.name}/{secrets.token_hex(8)}", aggregator=aggregator, clients=clients)
    config = RunConfig(resource, trust)
    config.write(config_dir)
    return config


def local_ledger(folder: Path) -> Ledger:
    """A read-only view of a local run's records, verified with the keys kept in its folder."""
    return Ledger(open_store(str(folder)), RunConfig.load(folder / CONFIG).trust)
