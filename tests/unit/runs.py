"""A parsed FederatedFineTune as the operator sees it, for the pure controller tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from fedtune.api import FederatedFineTune, parse_resource
from fedtune.federation.signing import AGGREGATOR, Signer, Trust, encode_public

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "cluster" / "quickstart.yaml"
UID = "0b7f5c8e-6a1d-4f2e-9c3b-5d8e7f6a1b2c"


def run(name: str = "quickstart", labels: dict[str, str] | None = None, **spec: Any) -> FederatedFineTune:
    """The cluster quickstart (three clients on GPU pools, an S3 secret) with spec fields replaced."""
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"].update(spec)
    doc["metadata"] = {"name": name, "namespace": "team-a", "uid": UID, "labels": labels or {}}
    return parse_resource(doc)


def _private(seed: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([seed]) * 32)


def _public(seed: int) -> str:
    return encode_public(_private(seed).public_key())


def _trust() -> Trust:
    return Trust(
        run=f"team-a/quickstart/{UID}",
        aggregator=_public(1),
        clients={name: _public(i + 2) for i, name in enumerate(("clinic", "bank", "devops"))},
    )


TRUST = _trust()
# The aggregator's private half of TRUST, to sign records in tests.
AGGREGATOR_SIGNER = Signer(TRUST.run, AGGREGATOR, _private(1))
