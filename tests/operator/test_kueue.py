"""Kueue admits a run as one gang: a queue with room for part of the run starts none of it, says why, and
starts all of it once quota frees; the quota goes back when the run ends."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client

from fedtune.controller.names import workload_name
from tests.cluster.harness.cluster import Cluster
from tests.cluster.harness.kueue import Kueue
from tests.cluster.harness.procs import wait_for
from tests.operator.conftest import Operator, Runs, tiny_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

GROUP, VERSION = "kueue.x-k8s.io", "v1beta2"
RESOURCES = ("cpu", "memory", "nvidia.com/gpu")


@pytest.fixture(scope="module")
def kueue(crds: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    running = Kueue(crds, tmp_path_factory.mktemp("kueue")).start()
    try:
        yield running
    finally:
        running.stop()


def _pod(gpus: int) -> dict[str, Any]:
    requests = {"cpu": "1", "memory": "1Gi", "nvidia.com/gpu": str(gpus)}
    return {"spec": {"containers": [{"name": "main", "image": "none", "resources": {"requests": requests}}]}}


def test_a_queued_run_waits_whole_and_starts_whole_when_quota_frees(
    kueue: Kueue, operator: Operator, runs: Runs, tiny_data: str, namespace: str
) -> None:
    cluster = kueue.cluster
    custom, batch = client.CustomObjectsApi(cluster.api_client()), client.BatchV1Api(cluster.api_client())
    queue = f"cq-{namespace}"[:63]
    quota = {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "3"}
    cluster_queue = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "ClusterQueue",
        "metadata": {"name": queue},
        "spec": {
            "namespaceSelector": {},
            "resourceGroups": [
                {
                    "coveredResources": list(RESOURCES),
                    "flavors": [
                        {"name": "default", "resources": [{"name": r, "nominalQuota": quota[r]} for r in RESOURCES]}
                    ],
                }
            ],
        },
    }
    flavor = {"apiVersion": f"{GROUP}/{VERSION}", "kind": "ResourceFlavor", "metadata": {"name": "default"}}
    local = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "LocalQueue",
        "metadata": {"name": "gpus"},
        "spec": {"clusterQueue": queue},
    }
    try:
        custom.create_cluster_custom_object(GROUP, VERSION, "resourceflavors", flavor)
    except client.ApiException as exc:
        if exc.status != 409:
            raise
    custom.create_cluster_custom_object(GROUP, VERSION, "clusterqueues", cluster_queue)
    try:
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "localqueues", local)
        # Another team's workload holds one of the queue's three GPUs.
        holder = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "Workload",
            "metadata": {"name": "holder"},
            "spec": {"queueName": "gpus", "podSets": [{"name": "main", "count": 1, "template": _pod(1)}]},
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "workloads", holder)

        def admitted(name: str) -> bool:
            wl = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, "workloads", name)
            conditions = (wl.get("status") or {}).get("conditions") or []
            return any(c["type"] == "Admitted" and c["status"] == "True" for c in conditions)

        wait_for(lambda: admitted("holder"), 60, "Kueue to admit the holder")
        operator.start()
        # Three clients with a GPU each, and the aggregator: two GPUs free would start half of it.
        runs.create(tiny_run("gang", queueName="gpus", aggregation={"rounds": 2}))

        def queued_for_quota(status: dict[str, Any]) -> bool:
            ready = next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})
            return ready.get("reason") == "Queued" and "insufficient" in ready.get("message", "")

        status = runs.wait("gang", queued_for_quota, 90, "the run to wait for quota, saying so")["status"]
        assert status["state"] == "Pending" and "startTime" not in status
        jobs = batch.list_namespaced_job(namespace, label_selector="fedtune.io/run=gang").items
        assert len(jobs) == 4 and all(j.spec.suspend for j in jobs), "every Job exists, held"
        assert cluster.core().list_namespaced_pod(namespace, label_selector="fedtune.io/run=gang").items == []

        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, "workloads", "holder")
        runs.wait_state("gang", "Succeeded", timeout=400)
        pods = cluster.core().list_namespaced_pod(namespace, label_selector="fedtune.io/run=gang").items
        assert {p.metadata.labels.get("fedtune.io/client", "aggregator") for p in pods} == {
            "aggregator",
            "alpha",
            "beta",
            "gamma",
        }

        def quota_returned() -> bool:
            cq = custom.get_cluster_custom_object(GROUP, VERSION, "clusterqueues", queue)
            return (cq.get("status") or {}).get("reservingWorkloads") == 0

        wait_for(quota_returned, 60, "the run's quota to go back to the queue")
        workloads = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "workloads")["items"]
        assert workload_name("gang") not in {w["metadata"]["name"] for w in workloads}
    finally:
        for plural, name in (("localqueues", "gpus"), ("workloads", "holder")):
            with contextlib.suppress(client.ApiException):
                custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, plural, name)
        custom.delete_cluster_custom_object(GROUP, VERSION, "clusterqueues", queue)
