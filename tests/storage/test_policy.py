"""The run's bucket policy, enforced by a real S3 server: each party reaches only what is its own.

Every party is a versitygw account of its own (role "user"); the bucket belongs to root and has the
policy from `fedtune.federation.policy`, so a party's only access is what that policy grants it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
from botocore.exceptions import ClientError

from fedtune.federation import protocol as p
from fedtune.federation.policy import bucket_policy
from fedtune.storage import ObjectNotFound, StorageError
from fedtune.storage.s3 import S3Store
from tests.cluster.harness.s3 import S3Server

PREFIX = "ns/run-uid"
SPEC = f"{PREFIX}/{p.SPEC}"
BETA_UPDATE = f"{PREFIX}/{p.client_dir('beta')}/update.bin"
ALPHA_SEED = f"{PREFIX}/{p.client_dir('alpha')}/seed.bin"
OUTSIDE = "elsewhere/object.bin"


@dataclass
class Run:
    """A run root under a policy, the clients of its three parties, and a data bucket of beta's."""

    server: S3Server
    bucket: str
    data_bucket: str
    keys: dict[str, tuple[str, str]]
    root: Any
    aggregator: Any
    alpha: Any
    beta: Any

    def key(self, rel: str) -> str:
        return f"{PREFIX}/{rel}"

    def body(self, key: str, bucket: str | None = None) -> bytes:
        data: bytes = self.root.get_object(Bucket=bucket or self.bucket, Key=key)["Body"].read()
        return data

    def present(self, key: str) -> bool:
        return bool(self.root.list_objects_v2(Bucket=self.bucket, Prefix=key).get("KeyCount"))

    def all_keys(self) -> set[str]:
        return {o["Key"] for o in self.root.list_objects_v2(Bucket=self.bucket).get("Contents", [])}


def _apply(server: S3Server, bucket: str, data_bucket: str) -> Run:
    keys = {name: server.add_account(name) for name in ("aggregator", "alpha", "beta")}
    server.put_policy(
        bucket, bucket_policy(f"s3://{bucket}/{PREFIX}", "aggregator", {"alpha": "alpha", "beta": "beta"})
    )
    root = server.client()
    for key in (SPEC, BETA_UPDATE, ALPHA_SEED, OUTSIDE):
        root.put_object(Bucket=bucket, Key=key, Body=key.encode())
    return Run(
        server,
        bucket,
        data_bucket,
        keys,
        root,
        server.client(*keys["aggregator"]),
        server.client(*keys["alpha"]),
        server.client(*keys["beta"]),
    )


@pytest.fixture
def run(s3_server: S3Server, s3_bucket: str) -> Run:
    data_bucket = s3_server.create_bucket("d-" + secrets.token_hex(6))
    s3_server.add_account("beta")
    s3_server.put_policy(
        data_bucket,
        {
            "Version": "2012-10-17",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Principal": {"AWS": ["beta"]},
                    "Action": ["s3:GetObject", "s3:ListBucket"],
                    "Resource": [f"arn:aws:s3:::{data_bucket}", f"arn:aws:s3:::{data_bucket}/*"],
                }
            ],
        },
    )
    s3_server.client().put_object(Bucket=data_bucket, Key="train.jsonl", Body=b"beta's private data")
    return _apply(s3_server, s3_bucket, data_bucket)


def denied(call: Callable[[], object]) -> None:
    """The call is refused by the server's authorization, not for any other reason."""
    with pytest.raises(ClientError) as info:
        call()
    error = info.value.response["Error"]
    assert error.get("Code") == "AccessDenied", error
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403


def test_accounts_are_idempotent_and_named_by_their_access_key(run: Run) -> None:
    assert run.server.add_account("alpha") == run.keys["alpha"]
    assert run.keys["alpha"][0] == "alpha"
    assert run.server.accounts()["alpha"] == (run.keys["alpha"][1], "user")


def test_client_writes_and_reads_its_own_prefix_and_reads_the_coordinator(run: Run) -> None:
    own = run.key(f"{p.client_dir('alpha')}/update.bin")
    run.alpha.put_object(Bucket=run.bucket, Key=own, Body=b"alpha's update")
    assert run.alpha.get_object(Bucket=run.bucket, Key=own)["Body"].read() == b"alpha's update"
    assert run.alpha.get_object(Bucket=run.bucket, Key=SPEC)["Body"].read() == SPEC.encode()
    assert run.alpha.head_object(Bucket=run.bucket, Key=SPEC)["ContentLength"] == len(SPEC)
    assert run.body(own) == b"alpha's update"


@pytest.mark.parametrize(
    "what",
    [
        "put under another client's prefix",
        "put under the coordinator",
        "put outside the run",
        "put escaping its prefix with ..",
        "start a multipart upload under another client's prefix",
        "copy another client's object into its own prefix",
        "get another client's object",
        "get outside the run",
        "delete its own object",
        "delete the coordinator's object",
        "delete another client's object",
        "list the bucket",
        "list its own prefix",
        "list the run",
        "read another bucket",
        "list another bucket",
        "create a bucket",
        "replace the bucket policy",
        "delete the bucket policy",
        "open up the bucket's ACL",
    ],
)
def test_client_cannot_touch_what_is_not_its_own(run: Run, what: str) -> None:
    a, b = run.alpha, run.bucket
    calls: dict[str, Callable[[], object]] = {
        "put under another client's prefix": lambda: a.put_object(Bucket=b, Key=BETA_UPDATE, Body=b"forged"),
        "put under the coordinator": lambda: a.put_object(Bucket=b, Key=SPEC, Body=b"forged"),
        "put outside the run": lambda: a.put_object(Bucket=b, Key="elsewhere/alpha.bin", Body=b"x"),
        "put escaping its prefix with ..": lambda: a.put_object(
            Bucket=b, Key=run.key(f"{p.client_dir('alpha')}/../beta/update.bin"), Body=b"forged"
        ),
        "start a multipart upload under another client's prefix": lambda: a.create_multipart_upload(
            Bucket=b, Key=BETA_UPDATE
        ),
        "copy another client's object into its own prefix": lambda: a.copy_object(
            Bucket=b, Key=run.key(f"{p.client_dir('alpha')}/copy.bin"), CopySource={"Bucket": b, "Key": BETA_UPDATE}
        ),
        "get another client's object": lambda: a.get_object(Bucket=b, Key=BETA_UPDATE),
        "get outside the run": lambda: a.get_object(Bucket=b, Key=OUTSIDE),
        "delete its own object": lambda: a.delete_object(Bucket=b, Key=ALPHA_SEED),
        "delete the coordinator's object": lambda: a.delete_object(Bucket=b, Key=SPEC),
        "delete another client's object": lambda: a.delete_object(Bucket=b, Key=BETA_UPDATE),
        "list the bucket": lambda: a.list_objects_v2(Bucket=b),
        "list its own prefix": lambda: a.list_objects_v2(Bucket=b, Prefix=run.key(f"{p.client_dir('alpha')}/")),
        "list the run": lambda: a.list_objects_v2(Bucket=b, Prefix=f"{PREFIX}/"),
        "read another bucket": lambda: a.get_object(Bucket=run.data_bucket, Key="train.jsonl"),
        "list another bucket": lambda: a.list_objects_v2(Bucket=run.data_bucket),
        "create a bucket": lambda: a.create_bucket(Bucket="alpha-" + secrets.token_hex(4)),
        "replace the bucket policy": lambda: a.put_bucket_policy(Bucket=b, Policy='{"Statement": []}'),
        "delete the bucket policy": lambda: a.delete_bucket_policy(Bucket=b),
        "open up the bucket's ACL": lambda: a.put_bucket_acl(Bucket=b, ACL="public-read-write"),
    }
    denied(calls[what])
    assert run.all_keys() == {SPEC, BETA_UPDATE, ALPHA_SEED, OUTSIDE}  # nothing written, nothing removed
    for key in (SPEC, BETA_UPDATE, ALPHA_SEED, OUTSIDE):
        assert run.body(key) == key.encode()
    assert run.body("train.jsonl", run.data_bucket) == b"beta's private data"
    assert not run.root.list_multipart_uploads(Bucket=run.bucket).get("Uploads")


def test_a_batch_delete_is_refused_object_by_object(run: Run) -> None:
    """DeleteObjects answers 200 with per-key errors; the Deny must hold for every key in it."""
    keys = [ALPHA_SEED, BETA_UPDATE, SPEC]
    result = run.alpha.delete_objects(Bucket=run.bucket, Delete={"Objects": [{"Key": k} for k in keys]})
    assert not result.get("Deleted")
    assert {e["Key"]: e["Code"] for e in result["Errors"]} == dict.fromkeys(keys, "AccessDenied")
    assert all(run.present(k) for k in keys)


def test_the_other_bucket_is_really_readable_by_its_owner(run: Run) -> None:
    """So that alpha's refusal there is the policy at work, not a broken bucket."""
    assert run.beta.get_object(Bucket=run.data_bucket, Key="train.jsonl")["Body"].read() == b"beta's private data"
    denied(lambda: run.beta.get_object(Bucket=run.bucket, Key=run.key(f"{p.client_dir('alpha')}/seed.bin")))


def test_aggregator_runs_the_coordinator_and_collects_clients(run: Run) -> None:
    g, b = run.aggregator, run.bucket
    round_key = run.key(f"{p.round_dir(1)}/global.bin")
    g.put_object(Bucket=b, Key=round_key, Body=b"global")
    assert g.get_object(Bucket=b, Key=round_key)["Body"].read() == b"global"
    assert g.get_object(Bucket=b, Key=BETA_UPDATE)["Body"].read() == BETA_UPDATE.encode()
    listed = g.list_objects_v2(Bucket=b, Prefix=f"{PREFIX}/")
    assert [o["Key"] for o in listed["Contents"]] == sorted([round_key, SPEC, BETA_UPDATE, ALPHA_SEED])
    clients = g.list_objects_v2(Bucket=b, Prefix=run.key(f"{p.CLIENTS}/"), Delimiter="/")
    assert sorted(c["Prefix"] for c in clients["CommonPrefixes"]) == [
        run.key(f"{p.client_dir('alpha')}/"),
        run.key(f"{p.client_dir('beta')}/"),
    ]
    g.delete_object(Bucket=b, Key=round_key)
    g.delete_object(Bucket=b, Key=BETA_UPDATE)
    assert not run.present(round_key) and not run.present(BETA_UPDATE)


@pytest.mark.parametrize(
    "what",
    [
        "put under a client's prefix",
        "put outside the run",
        "get outside the run",
        "delete outside the run",
        "list the bucket",
        "list the run without its trailing slash",
        "list the run's parent",
        "read another bucket",
    ],
)
def test_aggregator_cannot_write_for_clients_or_leave_the_run(run: Run, what: str) -> None:
    g, b = run.aggregator, run.bucket
    calls: dict[str, Callable[[], object]] = {
        "put under a client's prefix": lambda: g.put_object(Bucket=b, Key=BETA_UPDATE, Body=b"forged"),
        "put outside the run": lambda: g.put_object(Bucket=b, Key="elsewhere/agg.bin", Body=b"x"),
        "get outside the run": lambda: g.get_object(Bucket=b, Key=OUTSIDE),
        "delete outside the run": lambda: g.delete_object(Bucket=b, Key=OUTSIDE),
        "list the bucket": lambda: g.list_objects_v2(Bucket=b),
        "list the run without its trailing slash": lambda: g.list_objects_v2(Bucket=b, Prefix=PREFIX),
        "list the run's parent": lambda: g.list_objects_v2(Bucket=b, Prefix="ns/"),
        "read another bucket": lambda: g.get_object(Bucket=run.data_bucket, Key="train.jsonl"),
    }
    denied(calls[what])
    assert run.all_keys() == {SPEC, BETA_UPDATE, ALPHA_SEED, OUTSIDE}
    for key in (SPEC, BETA_UPDATE, ALPHA_SEED, OUTSIDE):
        assert run.body(key) == key.encode()


def test_the_project_s_store_lists_the_run_for_the_aggregator_only(run: Run) -> None:
    def store(party: str) -> S3Store:
        return S3Store(run.bucket, PREFIX, endpoint=run.server.endpoint, retry_seconds=5, credentials=run.keys[party])

    assert store("aggregator").list(p.CLIENTS) == [
        p.client_dir("alpha") + "/seed.bin",
        p.client_dir("beta") + "/update.bin",
    ]
    with pytest.raises(StorageError, match="AccessDenied"):
        store("alpha").list(p.client_dir("alpha"))


def test_a_party_s_environment_carries_only_its_own_keys(run: Run, monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in run.server.env_for(*run.keys["alpha"]).items():
        monkeypatch.setenv(k, v)
    store = S3Store(run.bucket, PREFIX, retry_seconds=5)  # endpoint and keys from the environment
    assert store.get(p.SPEC) == SPEC.encode()
    # S3 denies a caller that may not list the bucket even a missing key's read, so a denied read is read
    # as absent: beta's update stays out of alpha's reach either way.
    with pytest.raises(ObjectNotFound):
        store.get(f"{p.client_dir('beta')}/update.bin")
    with pytest.raises(StorageError, match="AccessDenied"):
        store.put(f"{p.client_dir('beta')}/update.bin", b"forged")


def test_conditional_create_works_under_the_policy(run: Run) -> None:
    """The protocol's create-if-absent: a winner, then 412 (not 403) for the loser, 403 where not allowed."""
    own = run.key(f"{p.client_dir('alpha')}/once.bin")
    run.alpha.put_object(Bucket=run.bucket, Key=own, Body=b"first", IfNoneMatch="*")
    with pytest.raises(ClientError) as info:
        run.alpha.put_object(Bucket=run.bucket, Key=own, Body=b"second", IfNoneMatch="*")
    assert info.value.response["Error"]["Code"] == "PreconditionFailed"
    assert run.body(own) == b"first"
    denied(lambda: run.alpha.put_object(Bucket=run.bucket, Key=BETA_UPDATE, Body=b"x", IfNoneMatch="*"))

    def store(party: str) -> S3Store:
        return S3Store(run.bucket, PREFIX, endpoint=run.server.endpoint, retry_seconds=5, credentials=run.keys[party])

    lease = f"{p.LEASES}/000001"
    assert store("aggregator").put_if_absent(lease, b"aggregator") is True
    assert store("aggregator").put_if_absent(lease, b"again") is False
    assert store("alpha").get(lease) == b"aggregator"
    assert store("beta").put_if_absent(f"{p.client_dir('beta')}/once.bin", b"beta") is True
    with pytest.raises(StorageError, match="AccessDenied"):
        store("beta").put_if_absent(f"{p.client_dir('alpha')}/forged.bin", b"forged")


def test_policy_and_accounts_survive_a_restart(run: Run) -> None:
    policy = run.root.get_bucket_policy(Bucket=run.bucket)["Policy"]
    run.server.restart()
    assert run.server.accounts()["alpha"] == (run.keys["alpha"][1], "user")
    assert run.root.get_bucket_policy(Bucket=run.bucket)["Policy"] == policy
    alpha = run.server.client(*run.keys["alpha"])  # a fresh client: nothing cached on this side
    own = run.key(f"{p.client_dir('alpha')}/after-restart.bin")
    alpha.put_object(Bucket=run.bucket, Key=own, Body=b"after", IfNoneMatch="*")
    assert alpha.get_object(Bucket=run.bucket, Key=SPEC)["Body"].read() == SPEC.encode()
    denied(lambda: alpha.put_object(Bucket=run.bucket, Key=BETA_UPDATE, Body=b"forged"))
    denied(lambda: alpha.delete_object(Bucket=run.bucket, Key=own))
    denied(lambda: alpha.list_objects_v2(Bucket=run.bucket))
    denied(lambda: alpha.get_object(Bucket=run.data_bucket, Key="train.jsonl"))
    aggregator = run.server.client(*run.keys["aggregator"])
    listed = aggregator.list_objects_v2(Bucket=run.bucket, Prefix=f"{PREFIX}/")["Contents"]
    assert {o["Key"] for o in listed} == {SPEC, BETA_UPDATE, ALPHA_SEED, own}
    denied(lambda: aggregator.put_object(Bucket=run.bucket, Key=own, Body=b"forged"))
