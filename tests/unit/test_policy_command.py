"""`fedtune policy`: the bucket policy of a run, for the accounts the parties use."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
