"""Two operator replicas (only one acts; the other takes over when it dies) and a failed node."""

from __future__ import annotations

import signal
import time

import pytest

from tests.operator.conftest import Operator, Runs, running_pod, tiny_run, wait_until

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def peers(runs: Runs, ns: str) -> set[int]:
    """Priorities of the operator replicas registered in the peering object."""
    obj = runs.api.get_namespaced_custom_object("kopf.dev", "v1", ns, "kopfpeerings", "fedtune")
    return {int(p["priority"]) for p in (obj.get("status") or {}).values()}


def test_only_one_replica_acts_and_the_other_takes_over(operator: Operator, runs: Runs, tiny_data: str) -> None:
    ns = operator.namespace
    runs.api.create_namespaced_custom_object(
        "kopf.dev",
        "v1",
        ns,
        "kopfpeerings",
        {"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "fedtune"}},
    )
    # The leader is up and registered before the standby starts, and the standby has registered
    # before the run exists: replicas that start at the same instant may both act for a moment, which
    # level-based reconciliation makes harmless but would make this test's claim untestable.
    leader_log = operator.log
    leader = operator.start("--priority", "100", "--peering-lifetime", "20")
    wait_until(lambda: peers(runs, ns) == {100}, 60, "the leader's entry in the peering object")
    operator.log = leader_log.with_name("standby.log")
    standby = operator.start("--priority", "50", "--peering-lifetime", "20")
    # A replica starts paused and resumes only once it sees no live peer of higher priority.
    wait_until(lambda: peers(runs, ns) == {100, 50}, 60, "the standby's entry in the peering object")

    runs.create(tiny_run("ha", training={"localSteps": 12}, aggregation={"rounds": 3}))
    runs.wait_state("ha", "Running", timeout=120)
    assert "created Job" in leader_log.read_text()
    assert "created Job" not in operator.log.read_text(), "the standby replica acted while the leader lived"

    # With the leader gone, only the standby can carry the status on to the end.
    leader.send_signal(signal.SIGKILL)
    leader.wait()
    done = runs.wait_state("ha", "Succeeded", timeout=400)
    assert done["status"]["progress"] == "3/3"
    assert standby.poll() is None


def test_a_client_on_a_failed_node_is_rescheduled_in_its_pool(operator: Operator, runs: Runs, tiny_data: str) -> None:
    cluster, ns = operator.cluster, operator.namespace
    operator.start()
    # Enough rounds that the run outlasts the eviction (30 s of toleration after the node fails).
    runs.create(tiny_run("nodes", training={"localSteps": 12}, aggregation={"rounds": 25, "roundTimeoutSeconds": 300}))
    pod = running_pod(cluster, ns, "fedtune.io/client=alpha")
    node = cluster.core().read_namespaced_pod(pod, ns).spec.node_name
    assert node.startswith("gpu-a100")
    cluster.make_node_not_ready(node)
    try:
        deadline = time.monotonic() + 180
        while True:
            pods = cluster.core().list_namespaced_pod(ns, label_selector="fedtune.io/client=alpha").items
            moved = [p for p in pods if p.spec.node_name and p.spec.node_name != node and p.status.phase == "Running"]
            if moved:
                break
            phases = [(p.metadata.name, p.spec.node_name, p.status.phase) for p in pods]
            assert time.monotonic() < deadline, f"alpha was not rescheduled off the failed node: {phases}"
            assert runs.get("nodes")["status"].get("state") != "Succeeded", "the run ended before the eviction"
            time.sleep(0.5)
        assert moved[0].spec.node_name.startswith("gpu-a100")
    finally:
        cluster.make_node_ready(node)
    runs.wait_state("nodes", "Succeeded", timeout=400)
