"""A client that writes where it should not (a bucket without the policy): its records never count.

Alpha holds its own genuine key and forges, in other parties' prefixes, everything the attack list
names: a victim's update marker with a huge weight, a pre-committed final global, a final summary
pointing elsewhere, a rewritten spec. Every reader checks the owner's signature, so each forgery is
rejected with a line naming the party and the key, its owner replaces it, and the run ends with the
adapter a run without the attacker gives, byte for byte.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from fedtune.federation import protocol as p
from fedtune.federation.signing import AGGREGATOR, Signer, client_party, fingerprint, load_private
from fedtune.federation.verify import verify_run
from fedtune.local.identities import key_path, local_ledger
from tests.federation.conftest import TOPICS, tiny_resource, write_data
from tests.federation.test_kill_and_resume import Fleet

pytestmark = pytest.mark.slow


def run_fleet(tmp_path: Path, name: str, attack: bool) -> tuple[bytes, Fleet]:
    write_data(tmp_path / "data")
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(yaml.safe_dump(tiny_resource(tmp_path / "data", aggregation={"rounds": 2})))
    (tmp_path / f"{name}-logs").mkdir()
    fleet = Fleet(spec, tmp_path / name, tmp_path / f"{name}-logs")
    ledger = local_ledger(fleet.root)
    if attack:
        forge_everything(fleet.root, ledger.trust.run)
    try:
        fleet.start("aggregator")
        for client in TOPICS:
            fleet.start(client)
        fleet.wait_all(timeout=300)
    finally:
        fleet.stop()
    final = ledger.final()
    assert final is not None
    verify_run(ledger)
    return ledger.store.get(p.FINAL_ADAPTER), fleet


def forge_everything(root: Path, run: str) -> None:
    """What alpha writes before the run starts, signed with alpha's own key."""
    alpha = Signer(run, client_party("alpha"), load_private(key_path(root, client_party("alpha")), "alpha"))
    store = local_ledger(root).store
    fake = "f" * 64
    marker = p.UpdateMarker(
        client="beta",
        round=0,
        sha256=fake,
        global_sha256=fake,
        examples=10**9,
        steps=1,
        bytes=1,
        metrics=p.ClientMetrics(),
    )
    forged = {
        p.update_marker(0, "beta"): marker,
        p.global_marker(1): p.GlobalMarker(
            round=1, sha256=fake, selected=["alpha"], deadline=0, final=True, epoch=99, created=time.time()
        ),
        p.FINAL_SUMMARY: p.FinalSummary(
            rounds=1, adapter="s3://elsewhere/adapter", adapter_sha256=fake, config_sha256=fake, chain=[], epoch=99
        ),
        p.SPEC: p.SpecRecord(spec={"clients": [{"name": "beta", "data": {"uri": "s3://attacker/data.jsonl"}}]}),
    }
    for key, record in forged.items():
        store.put(key, alpha.sign(key, p.dumps(record)))


def test_forged_records_are_rejected_and_the_run_ends_as_without_them(tmp_path: Path) -> None:
    clean, _ = run_fleet(tmp_path, "clean", attack=False)
    attacked, fleet = run_fleet(tmp_path, "attacked", attack=True)
    assert attacked == clean

    alpha_key = fingerprint(local_ledger(fleet.root).trust.clients["alpha"])
    agg_log, beta_log = fleet.log("aggregator"), fleet.log("beta")
    # The victim's marker: rejected while forged (naming beta's key and the key that signed it), then replaced.
    assert "update of beta does not verify (yet)" in agg_log
    assert "against client beta's key" in agg_log and f"(signed with {alpha_key})" in agg_log
    assert "replacing a record its owner did not sign" in beta_log
    # The pre-committed global and the forged final summary: replaced by the aggregator, its key named.
    assert f"{p.global_marker(1)}: signature does not verify against {AGGREGATOR}'s key" in agg_log
    ledger = local_ledger(fleet.root)
    final = ledger.final()
    assert final is not None and final.adapter.endswith(p.FINAL) and final.rounds == 2
    summary = ledger.summary(0)
    assert summary is not None and summary.participants == sorted(TOPICS) and not summary.rejected
