"""The S3 bucket policy that gives each party of a run exactly the access the round protocol needs.

The aggregator writes `coordinator/` and reads `clients/`; client c reads `coordinator/` and writes only
`clients/c/`, may not delete and may not list. Only the coordinator deletes (storage.keep: false).
Principals are whatever names the storage server knows the parties' accounts by: IAM ARNs on AWS,
access key ids on versitygw's internal IAM (which the test harness makes equal to the account name).
Every construct used here (Principal {"AWS": [...]}, explicit Deny, the s3:prefix condition on
ListBucket) is enforced by versitygw v1.8.0 as on AWS; the Sids are informational only.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlparse

from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p

Policy = dict[str, Any]


def _statement(sid: str, effect: str, principal: str, actions: list[str], resources: list[str]) -> dict[str, Any]:
    return {
        "Sid": sid,
        "Effect": effect,
        "Principal": {"AWS": [principal]},
        "Action": actions,
        "Resource": resources,
    }


def _sid(name: str) -> str:
    return "".join(part.capitalize() for part in name.replace("_", "-").split("-"))


def bucket_policy(
    run_root: str,
    aggregator: str,
    clients: dict[str, str],
    model_uri: str | None = None,
    runs_uri: str | None = None,
) -> Policy:
    """The policy for the run rooted at `run_root` (s3://bucket/prefix); principals by party.

    A base model pushed to `model_uri` (spec.model.uri) in the same bucket is readable by every party: its
    manifest and the files it names, by key, with no listing. It must lie outside `runs_uri`
    (spec.storage.uri), where it would open other runs' objects to this run's parties.
    """
    parsed = urlparse(run_root)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise FedtuneError(f"{run_root}: a bucket policy needs an s3://bucket/prefix run root")
    bucket, prefix = parsed.netloc, parsed.path.strip("/")
    objects = f"arn:aws:s3:::{bucket}/{prefix + '/' if prefix else ''}"
    coordinator, all_clients = f"{objects}{p.COORDINATOR}/*", f"{objects}{p.CLIENTS}/*"
    statements = [
        _statement(
            "AggregatorWritesCoordinator",
            "Allow",
            aggregator,
            ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"],
            [coordinator],
        ),
        _statement("AggregatorReadsClients", "Allow", aggregator, ["s3:GetObject", "s3:DeleteObject"], [all_clients]),
        {
            **_statement("AggregatorListsRun", "Allow", aggregator, ["s3:ListBucket"], [f"arn:aws:s3:::{bucket}"]),
            **({"Condition": {"StringLike": {"s3:prefix": [f"{prefix}/*"]}}} if prefix else {}),
        },
    ]
    for name, principal in clients.items():
        own = f"{objects}{p.client_dir(name)}/*"
        statements += [
            _statement(f"Client{_sid(name)}ReadsCoordinator", "Allow", principal, ["s3:GetObject"], [coordinator]),
            _statement(
                f"Client{_sid(name)}WritesOwnPrefix", "Allow", principal, ["s3:GetObject", "s3:PutObject"], [own]
            ),
            _statement(
                f"Client{_sid(name)}NeverDeletesOrLists",
                "Deny",
                principal,
                ["s3:DeleteObject", "s3:ListBucket"],
                [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
            ),
        ]
    model = urlparse(model_uri or "")
    if model.scheme == "s3" and model.netloc == bucket:
        model_prefix = model.path.strip("/")
        model_objects = f"{model_prefix}/" if model_prefix else ""
        runs = urlparse(runs_uri or "")
        roots = [run_root] + ([runs_uri] if runs_uri and runs.scheme == "s3" and runs.netloc == bucket else [])
        for root in roots:
            root_prefix = urlparse(root).path.strip("/")
            root_objects = f"{root_prefix}/" if root_prefix else ""
            if root_objects.startswith(model_objects) or model_objects.startswith(root_objects):
                # Every party may read the model: overlapping runs would let a client read other clients.
                raise FedtuneError(f"spec.model.uri: {model_uri} overlaps the runs at {root}; push the model elsewhere")
        statements.append(
            {
                "Sid": "EveryPartyReadsModel",
                "Effect": "Allow",
                "Principal": {"AWS": [aggregator, *clients.values()]},
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{bucket}/{model_prefix}/*"],
            }
        )
    return {"Version": "2012-10-17", "Statement": statements}
