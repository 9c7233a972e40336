"""`fedtune policy`: the bucket policy of a run, for the accounts the parties use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fedtune.errors import FedtuneError
from fedtune.federation.policy import bucket_policy

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "cluster" / "quickstart.yaml"


def policy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedtune", "policy", str(EXAMPLE), *args], capture_output=True, text=True, timeout=60
    )


def test_each_party_gets_its_own_prefix_and_no_more() -> None:
    out = policy("--uid", "u-1", "--principal", "aggregator=coord", "--principal", "bank=bank-account")
    assert out.returncode == 0, out.stderr
    statements = json.loads(out.stdout)["Statement"]
    root = "arn:aws:s3:::fedtune/runs/default/quickstart-u-1/"
    by_sid = {s["Sid"]: s for s in statements}
    writes = by_sid["AggregatorWritesCoordinator"]
    assert writes["Principal"] == {"AWS": ["coord"]} and writes["Resource"] == [root + "coordinator/*"]
    bank = by_sid["ClientBankWritesOwnPrefix"]
    assert bank["Principal"] == {"AWS": ["bank-account"]} and bank["Resource"] == [root + "clients/bank/*"]
    assert by_sid["ClientClinicNeverDeletesOrLists"]["Effect"] == "Deny"
    # Every client statement names that client's prefix, or is a Deny: no client may write another's.
    for s in statements:
        if s["Sid"].startswith("Client") and s["Effect"] == "Allow" and "s3:PutObject" in s["Action"]:
            name = s["Sid"].removeprefix("Client").removesuffix("WritesOwnPrefix").lower()
            assert s["Resource"] == [f"{root}clients/{name}/*"]


def test_a_principal_for_no_party_is_refused() -> None:
    out = policy("--principal", "hospital-z=acct")
    assert out.returncode == 1
    assert out.stderr.strip().startswith("error: --principal hospital-z=acct: expected PARTY=NAME with PARTY one of")


def test_every_party_reads_a_model_pushed_to_the_runs_bucket(tmp_path: Path) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["model"] = {"uri": "s3://fedtune/models/tiny/", "sha256": "0" * 64}
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", "policy", str(spec), "--uid", "u-1", "--principal", "bank=bank-account"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    by_sid = {s["Sid"]: s for s in json.loads(out.stdout)["Statement"]}
    model = by_sid["EveryPartyReadsModel"]
    assert model["Principal"] == {"AWS": ["aggregator", "clinic", "bank-account", "devops"]}
    # Objects by key only: the loader reads the manifest and the files it names, never a listing.
    assert model["Action"] == ["s3:GetObject"] and model["Resource"] == ["arn:aws:s3:::fedtune/models/tiny/*"]


def test_a_model_prefix_overlapping_the_run_is_refused() -> None:
    for uri in ("s3://fedtune/", "s3://fedtune/runs", "s3://fedtune/runs/r/clients/a/model"):
        with pytest.raises(FedtuneError, match=re.escape(f"spec.model.uri: {uri} overlaps the runs at s3://fedtune/")):
            bucket_policy("s3://fedtune/runs/r", "agg", {"a": "a"}, uri)
    # Inside another run of the same store: this run's parties would read that run's objects.
    with pytest.raises(FedtuneError, match=re.escape("overlaps the runs at s3://fedtune/runs;")):
        bucket_policy("s3://fedtune/runs/r", "agg", {"a": "a"}, "s3://fedtune/runs/other/model", "s3://fedtune/runs")
    other_bucket = bucket_policy("s3://fedtune/runs/r", "agg", {"a": "a"}, "s3://models/tiny")
    assert "EveryPartyReadsModel" not in {s["Sid"] for s in other_bucket["Statement"]}


def test_a_run_with_its_own_run_root_needs_no_uid(tmp_path: Path) -> None:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["spec"]["storage"]["runRoot"] = "studies/cardio"
    spec = tmp_path / "run.yaml"
    spec.write_text(yaml.safe_dump(doc))
    out = subprocess.run(
        [sys.executable, "-m", "fedtune", "policy", str(spec)], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    writes = {s["Sid"]: s for s in json.loads(out.stdout)["Statement"]}["AggregatorWritesCoordinator"]
    assert writes["Resource"] == ["arn:aws:s3:::fedtune/runs/studies/cardio/coordinator/*"]
