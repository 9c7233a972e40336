"""Faults end to end on the test cluster: killed pods, a restarted S3 server and operator, failing clients."""

from __future__ import annotations

import pytest

from fedtune.federation import protocol as p
from fedtune.federation.verify import verify_run
from tests.operator.conftest import Operator, Runs, run_ledger, running_pod, tiny_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
ROUNDS = 8


def committed(store: object) -> dict[str, bytes]:
    """The coordinator's committed records (leases change as aggregators come and go; markers never do)."""
    keys = store.list(p.COORDINATOR)  # type: ignore[attr-defined]
    return {k: store.get(k) for k in keys if k.endswith(".json") and not k.startswith(p.LEASES)}  # type: ignore[attr-defined]


def test_killed_pods_and_restarted_servers_cost_no_committed_round(
    operator: Operator, runs: Runs, tiny_data: str
) -> None:
    cluster, ns = operator.cluster, operator.namespace
    first = operator.start()
    # Rounds enough to outlast the four faults below.
    runs.create(tiny_run("faults", training={"localSteps": 12}, aggregation={"rounds": ROUNDS}))
    status = runs.wait(
        "faults", lambda s: s.get("completedRounds", 0) >= 1 and s.get("state") == "Running", 300, "round 1"
    )["status"]
    ledger = run_ledger(cluster, ns, "faults", status)
    store = ledger.store

    # The aggregator's process dies: the Job replaces the pod and the run resumes at the last commit.
    before = committed(store)
    cluster.kill_pod(ns, running_pod(cluster, ns, "fedtune.io/run=faults,app.kubernetes.io/component=aggregator"))
    runs.wait("faults", lambda s: s.get("aggregator", {}).get("restarts", 0) >= 1, 120, "aggregator restart seen")

    # A client's process dies mid-round: replaced, and the round completes with it.
    victim = running_pod(cluster, ns, "fedtune.io/client=beta")
    cluster.kill_pod(ns, victim)

    # The storage server restarts mid-run: every process rides it out with retries.
    cluster.stop_s3()
    cluster.start_s3()

    # The operator restarts mid-run: it adopts what exists and creates nothing twice.
    first.terminate()
    first.wait(timeout=30)
    operator.start()

    done = runs.wait_state("faults", "Succeeded", timeout=600)["status"]
    assert done["progress"] == f"{ROUNDS}/{ROUNDS}"
    after = committed(store)
    assert all(after[k] == v for k, v in before.items()), "a committed round was rewritten"
    assert verify_run(ledger).final is not None
    jobs = cluster.batch().list_namespaced_job(ns, label_selector="fedtune.io/run=faults").items
    assert sorted(j.metadata.name for j in jobs) == [
        "faults-aggregator",
        "faults-client-alpha",
        "faults-client-beta",
        "faults-client-gamma",
    ]
    beta = next(c for c in done["clients"] if c["name"] == "beta")
    assert beta["restarts"] >= 1
    for r in range(ROUNDS):
        summary = ledger.summary(r)
        assert summary is not None and summary.participants == ["alpha", "beta", "gamma"], (r, summary)


def test_a_client_failing_past_its_backoff_limit(operator: Operator, runs: Runs, tiny_data: str) -> None:
    operator.start()
    broken = tiny_run("goes-on", aggregation={"rounds": 2, "roundTimeoutSeconds": 15}, backoffLimit=1)
    broken["spec"]["clients"][2]["data"]["uri"] = "s3://fedtune/tiny/missing.jsonl"
    runs.create(broken)
    fatal = tiny_run("stops", aggregation={"rounds": 2, "minClients": 3}, backoffLimit=1)
    fatal["spec"]["clients"][2]["data"]["uri"] = "s3://fedtune/tiny/missing.jsonl"
    runs.create(fatal)

    failed = runs.wait_state("stops", "Failed", timeout=300)["status"]
    cond = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "ClientsFailed" and "gamma" in cond["message"]

    done = runs.wait_state("goes-on", "Succeeded", timeout=400)["status"]
    states = {c["name"]: c["state"] for c in done["clients"]}
    assert states["gamma"] == "Failed"
    assert done["lastRound"]["participants"] == ["alpha", "beta"]
