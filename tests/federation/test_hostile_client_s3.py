"""A malicious client holding only its own credentials, on a real S3 server with the run's bucket
policy enforced and one account per party: every attack is refused by storage, and the honest run ends
with exactly the adapter a run without the attacker gives."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError

from fedtune.federation import protocol as p
from fedtune.federation.policy import bucket_policy
from fedtune.federation.records import Ledger
from fedtune.federation.verify import verify_run
from fedtune.local.identities import local_ledger
from fedtune.storage import open_store
from tests.cluster.harness.s3 import S3Server
from tests.federation.conftest import TOPICS, tiny_resource, write_data
from tests.federation.test_kill_and_resume import Fleet, wait

pytestmark = pytest.mark.slow
PARTIES = ("aggregator", *TOPICS)


def federation(tmp_path: Path, server: S3Server, name: str, silo: str) -> tuple[Fleet, Ledger, dict[str, Any]]:
    """A run in a bucket of its own, the policy applied; each party with its own account."""
    bucket = server.create_bucket(f"{name}-{secrets.token_hex(4)}")
    accounts = {party: server.add_account(f"{bucket}-{party}") for party in PARTIES}
    run_root = f"s3://{bucket}/runs/tiny"
    principals = {party: keys[0] for party, keys in accounts.items()}
    aggregator = principals.pop("aggregator")
    server.put_policy(bucket, bucket_policy(run_root, aggregator, principals))
    # beta's private data in its own silo bucket, readable by beta's account alone
    server.put_policy(
        silo,
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": [accounts["beta"][0]]},
                    "Action": ["s3:GetObject"],
                    "Resource": [f"arn:aws:s3:::{silo}/*"],
                }
            ],
        },
    )
    doc = tiny_resource(tmp_path / "data", storage={"uri": f"s3://{bucket}/runs", "endpoint": server.endpoint})
    doc["spec"]["clients"][1]["data"]["uri"] = f"s3://{silo}/beta.jsonl"
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(doc))
    (tmp_path / f"{name}-logs").mkdir()
    env = {party: {**server.env_for(*accounts[party]), "FEDTUNE_STORAGE_RETRY_SECONDS": "10"} for party in PARTIES}
    fleet = Fleet(spec, tmp_path / name, tmp_path / f"{name}-logs", store=run_root, env=env)
    agg_keys = accounts["aggregator"]
    store = open_store(run_root, endpoint=server.endpoint, credentials=agg_keys)
    ledger = Ledger(store, local_ledger(fleet.root).trust)
    alpha = server.client(*accounts["alpha"])
    return fleet, ledger, {"bucket": bucket, "alpha": alpha}


def run(fleet: Fleet, attack: Any = None) -> None:
    try:
        fleet.start("aggregator")
        for client in TOPICS:
            fleet.start(client)
        if attack is not None:
            attack()
        fleet.wait_all(timeout=300)
    finally:
        fleet.stop()


def refused(call: Any, **kwargs: Any) -> str:
    """The error code storage answers with; the attack must not succeed."""
    try:
        call(**kwargs)
    except ClientError as e:
        return str(e.response["Error"]["Code"])
    raise AssertionError(f"storage allowed {call.__name__}({kwargs})")


def test_every_attack_of_a_client_is_refused_by_storage(tmp_path: Path, s3_server: S3Server) -> None:
    write_data(tmp_path / "data")
    silo = s3_server.create_bucket(f"silo-{secrets.token_hex(4)}")
    s3_server.client().put_object(Bucket=silo, Key="beta.jsonl", Body=(tmp_path / "data" / "beta.jsonl").read_bytes())

    clean, clean_ledger, _ = federation(tmp_path, s3_server, "clean", silo)
    run(clean)
    attacked, ledger, ctx = federation(tmp_path, s3_server, "attacked", silo)
    bucket, alpha = ctx["bucket"], ctx["alpha"]
    root = "runs/tiny/"
    outcomes: dict[str, str] = {}

    def attack() -> None:
        wait(lambda: ledger.store.exists(p.global_marker(1)), 240, "round 0 to close")
        beta_marker = root + p.update_marker(0, "beta")
        forged = b'{"client": "beta", "examples": 1000000000}'
        attempts = {
            "overwrite beta's update marker": (alpha.put_object, {"Key": beta_marker, "Body": forged}),
            "write an update into beta's prefix": (
                alpha.put_object,
                {"Key": root + p.update_data(1, "beta", "0" * 64), "Body": b"x"},
            ),
            "pre-commit the next global as final": (
                alpha.put_object,
                {"Key": root + p.global_marker(5), "Body": b'{"final": true}'},
            ),
            "forge the final summary": (
                alpha.put_object,
                {"Key": root + p.FINAL_SUMMARY, "Body": b'{"adapter": "s3://elsewhere"}'},
            ),
            "rewrite the spec": (alpha.put_object, {"Key": root + p.SPEC, "Body": b"{}"}),
            "delete a committed global marker": (alpha.delete_object, {"Key": root + p.global_marker(0)}),
            "delete beta's marker": (alpha.delete_object, {"Key": beta_marker}),
            "read beta's update": (alpha.get_object, {"Key": beta_marker}),
            "list the run": (alpha.list_objects_v2, {"Prefix": root}),
        }
        for what, (call, kwargs) in attempts.items():
            outcomes[what] = refused(call, Bucket=bucket, **kwargs)
        outcomes["read beta's private data"] = refused(alpha.get_object, Bucket=silo, Key="beta.jsonl")

    run(attacked, attack)
    assert outcomes and set(outcomes.values()) == {"AccessDenied"}, outcomes
    assert len(outcomes) == 10
    final, clean_final = verify_run(ledger).final, verify_run(clean_ledger).final
    assert final is not None and clean_final is not None and final.failed is None
    assert final.adapter_sha256 == clean_final.adapter_sha256
    summary = ledger.summary(0)
    assert summary is not None and summary.participants == sorted(TOPICS) and not summary.rejected
