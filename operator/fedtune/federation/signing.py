"""Ed25519 identities of a run's parties, and records signed by them.

A signature covers the run id, the object's key in the run root and the record's canonical JSON, so a
record cannot be replayed in another run or moved to another key. Public keys are pinned outside the
bucket (in the resource, or in the config the operator mounts), never read from it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedtune.errors import FedtuneError

PREFIX = "ed25519:"
AGGREGATOR = "aggregator"
# The Secret key (and file name) that holds a party's private key in PEM.
KEY_FILE = "signing.key"
SIGNATURE = "signature"
_CONTEXT = b"fedtune-record-v1"


class InvalidKey(FedtuneError):
    """A key that cannot be parsed, or a private key that does not match its pinned public key."""


class SignatureError(FedtuneError):
    """A record that is unsigned, signed by another key, or altered after signing."""


def client_party(name: str) -> str:
    return f"client {name}"


def encode_public(key: Ed25519PublicKey) -> str:
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return PREFIX + base64.b64encode(raw).decode()


def parse_public(text: str, where: str) -> Ed25519PublicKey:
    """`ed25519:<base64 of 32 bytes>`; `where` names the field in errors."""
    if not text.startswith(PREFIX):
        raise InvalidKey(f"{where}: an Ed25519 public key starts with {PREFIX!r} (print one with `fedtune keygen`)")
    try:
        raw = base64.b64decode(text[len(PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidKey(f"{where}: the public key is not valid base64") from None
    if len(raw) != 32:
        raise InvalidKey(f"{where}: an Ed25519 public key has 32 bytes, this one {len(raw)}")
    return Ed25519PublicKey.from_public_bytes(raw)


def fingerprint(public: str) -> str:
    """A short, stable name for a public key in messages."""
    return f"{PREFIX}{hashlib.sha256(public.encode()).hexdigest()[:16]}"


def generate() -> Ed25519PrivateKey:
    return Ed25519PrivateKey.generate()


def private_pem(key: Ed25519PrivateKey) -> str:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()


def parse_private(pem: str | bytes, where: str) -> Ed25519PrivateKey:
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise InvalidKey(f"{where}: not a PEM private key (make one with `fedtune keygen`)") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidKey(f"{where}: the private key is not an Ed25519 key")
    return key


def load_private(path: Path, where: str) -> Ed25519PrivateKey:
    try:
        return parse_private(path.read_bytes(), where)
    except OSError as e:
        raise InvalidKey(f"{where}: cannot read {path}: {e.strerror}") from None


def canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _message(run: str, key: str, body: dict[str, Any]) -> bytes:
    return b"\n".join((_CONTEXT, run.encode(), key.encode(), canonical(body)))


@dataclass(frozen=True)
class Signer:
    """A party's private key, with the run it signs for."""

    run: str
    party: str
    key: Ed25519PrivateKey

    @property
    def public(self) -> str:
        return encode_public(self.key.public_key())

    def sign(self, key: str, body: dict[str, Any]) -> bytes:
        """The record's JSON with a signature over (run, key, body)."""
        value = base64.b64encode(self.key.sign(_message(self.run, key, body))).decode()
        signed = dict(body)
        signed[SIGNATURE] = {"signer": self.party, "key": fingerprint(self.public), "value": value}
        return json.dumps(signed, indent=2, sort_keys=True).encode()


@dataclass(frozen=True)
class Trust:
    """The pinned public keys of a run: whose signature each prefix of the run root needs."""

    run: str
    aggregator: str
    clients: dict[str, str] = field(default_factory=dict)

    def public_key(self, party: str) -> str:
        if party == AGGREGATOR:
            return self.aggregator
        name = party.removeprefix("client ")
        if name not in self.clients:
            raise SignatureError(f"{party}: no pinned public key (not a party of this run)")
        return self.clients[name]

    def verify(self, key: str, raw: bytes, party: str) -> dict[str, Any]:
        """The record's body if `party`'s pinned key signed it for this run and key; SignatureError if not."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError):  # bad JSON, bad UTF-8, 4300-digit numbers, deep nesting
            raise SignatureError(f"{key}: not a JSON record") from None
        if not isinstance(doc, dict):
            raise SignatureError(f"{key}: not a JSON record")
        sig = doc.pop(SIGNATURE, None)
        public = self.public_key(party)
        expected = fingerprint(public)
        if not isinstance(sig, dict) or not isinstance(sig.get("value"), str):
            raise SignatureError(f"{key}: not signed (needs {party}'s key {expected})")
        try:
            value = base64.b64decode(sig["value"], validate=True)
            parse_public(public, party).verify(value, _message(self.run, key, doc))
        except (InvalidSignature, binascii.Error, ValueError):
            claimed = sig.get("key")
            by = f" (signed with {claimed})" if isinstance(claimed, str) and claimed != expected else ""
            raise SignatureError(f"{key}: signature does not verify against {party}'s key {expected}{by}") from None
        return doc

    def to_json(self) -> str:
        return json.dumps({"run": self.run, "aggregator": self.aggregator, "clients": self.clients}, indent=2)

    @classmethod
    def from_json(cls, text: str, where: str) -> Trust:
        try:
            doc = json.loads(text)
            trust = cls(run=doc["run"], aggregator=doc["aggregator"], clients=dict(doc.get("clients") or {}))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise InvalidKey(f"{where}: not a keys document (run, aggregator, clients)") from None
        parse_public(trust.aggregator, f"{where}: aggregator")
        for name, public in trust.clients.items():
            parse_public(public, f"{where}: clients.{name}")
        return trust


def check_pair(key: Ed25519PrivateKey, public: str, where: str, source: str) -> None:
    """A private key must be the one its party's pinned public key names."""
    own = encode_public(key.public_key())
    if own != public:
        raise InvalidKey(
            f"{where}: {public[:20]}… does not match the private key in {source} (whose public key is {own})"
        )
