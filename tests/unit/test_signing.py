"""Signed records: only the pinned key of the prefix's owner makes a record count, for this run and key."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from fedtune.federation import signing as s
from fedtune.federation.signing import AGGREGATOR, InvalidKey, SignatureError, Signer, Trust, client_party

RUN = "team-a/run/uid-1"


@pytest.fixture
def keys() -> dict[str, Signer]:
    return {party: Signer(RUN, party, s.generate()) for party in (AGGREGATOR, client_party("a"), client_party("b"))}


@pytest.fixture
def trust(keys: dict[str, Signer]) -> Trust:
    return Trust(RUN, keys[AGGREGATOR].public, {n: keys[client_party(n)].public for n in "ab"})


KEY = "clients/a/rounds/000001/update.json"
BODY = {"client": "a", "round": 1, "examples": 10, "metrics": {"loss": 0.5}}


def test_a_record_verifies_for_its_owner_only(keys: dict[str, Signer], trust: Trust) -> None:
    raw = keys[client_party("a")].sign(KEY, BODY)
    assert trust.verify(KEY, raw, client_party("a")) == BODY
    with pytest.raises(SignatureError, match=r"against client b's key ed25519:[0-9a-f]{16} \(signed with"):
        trust.verify(KEY, raw, client_party("b"))


def test_altered_moved_or_replayed_records_fail(keys: dict[str, Signer], trust: Trust) -> None:
    raw = keys[client_party("a")].sign(KEY, BODY)
    doc = json.loads(raw)
    doc["examples"] = 10**9
    with pytest.raises(SignatureError, match="does not verify"):
        trust.verify(KEY, json.dumps(doc).encode(), client_party("a"))
    with pytest.raises(SignatureError, match="does not verify"):
        trust.verify("clients/a/rounds/000002/update.json", raw, client_party("a"))
    other_run = Trust("team-a/run/uid-2", trust.aggregator, trust.clients)
    with pytest.raises(SignatureError, match="does not verify"):
        other_run.verify(KEY, raw, client_party("a"))


def test_unsigned_and_unknown_parties_are_named(keys: dict[str, Signer], trust: Trust) -> None:
    with pytest.raises(SignatureError, match=f"{KEY}: not signed"):
        trust.verify(KEY, json.dumps(BODY).encode(), client_party("a"))
    with pytest.raises(SignatureError, match="not a JSON record"):
        trust.verify(KEY, b"\x00garbage", client_party("a"))
    with pytest.raises(SignatureError, match="client z: no pinned public key"):
        trust.verify(KEY, keys[client_party("a")].sign(KEY, BODY), client_party("z"))


def test_a_forger_signing_in_anothers_name_fails(trust: Trust) -> None:
    forger = Signer(RUN, AGGREGATOR, s.generate())
    with pytest.raises(SignatureError, match="against aggregator's key"):
        trust.verify("coordinator/final/summary.json", forger.sign("coordinator/final/summary.json", BODY), AGGREGATOR)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("ssh-ed25519 AAAA", "starts with 'ed25519:'"),
        ("ed25519:not*base64", "not valid base64"),
        ("ed25519:" + "QUFB", "has 32 bytes, this one 3"),
    ],
)
def test_bad_public_keys_name_the_field(text: str, message: str) -> None:
    with pytest.raises(InvalidKey, match=rf"spec\.clients\[0\]\.publicKey: .*{message}"):
        s.parse_public(text, "spec.clients[0].publicKey")


def test_a_private_key_that_does_not_match_its_pinned_key_is_named(keys: dict[str, Signer]) -> None:
    with pytest.raises(InvalidKey, match=r"spec\.aggregator\.publicKey: .* does not match the private key in S"):
        s.check_pair(keys[client_party("a")].key, keys[AGGREGATOR].public, "spec.aggregator.publicKey", "S")
    with pytest.raises(InvalidKey, match="f: not a PEM private key"):
        s.parse_private("-----BEGIN PRIVATE KEY-----\nxx\n", "f")


def test_trust_round_trips_and_checks_its_keys(trust: Trust) -> None:
    assert Trust.from_json(trust.to_json(), "keys.json") == trust
    broken = json.loads(trust.to_json())
    broken["clients"]["b"] = "ed25519:short"
    with pytest.raises(InvalidKey, match=r"keys\.json: clients\.b"):
        Trust.from_json(json.dumps(broken), "keys.json")
    with pytest.raises(InvalidKey, match="not a keys document"):
        Trust.from_json("[]", "keys.json")


def test_keygen_prints_a_labelled_secret_and_its_public_key() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", "keygen", "hospital-a-key", "-n", "silo-a"],
        capture_output=True,
        text=True,
        check=True,
    )
    secret = yaml.safe_load(out.stdout)
    assert secret["kind"] == "Secret" and secret["metadata"]["labels"] == {"fedtune.io/credentials": "true"}
    public = out.stderr.strip().removeprefix("publicKey: ")
    assert out.stdout.startswith(f"# publicKey: {public}\n")
    key = s.parse_private(secret["stringData"][s.KEY_FILE], "secret")
    s.check_pair(key, public, "publicKey", "secret")


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a": ' + b"9" * 5000 + b"}", b"\xff\xfe", b"{" * 3])
def test_hostile_json_is_a_signature_error_never_a_crash(trust: Trust, raw: bytes) -> None:
    with pytest.raises(SignatureError, match="not a JSON record"):
        trust.verify(KEY, raw, client_party("a"))
