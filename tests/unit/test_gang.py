"""Kueue gang admission: a queued run is one Workload whose admission starts every Job of the run at once,
and whose eviction stops them all; no Job is ever visible to Kueue on its own."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import pytest

from fedtune.api import SpecError
from fedtune.api.spec import FederatedFineTune
from fedtune.api.status import RunStatus
from fedtune.controller import builders, gang
from fedtune.controller.identities import PinnedKeys
from fedtune.controller.kube import NotServed
from fedtune.controller.names import workload_name
from fedtune.controller.reconcile import job_names, reconcile
from fedtune.controller.status import compute
from tests.unit.fake_kube import FakeKube, storage_secrets
from tests.unit.runs import TRUST, run

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
PARTIES = ("fedtune-aggregator", "fedtune-clinic", "fedtune-bank", "fedtune-devops")
WORKLOAD = workload_name("quickstart")
QUOTA = "couldn't assign flavors to pod set clients-0: insufficient quota for nvidia.com/gpu in flavor gpu"


def queued(**spec: Any) -> FederatedFineTune:
    return run(**{"storage": {"uri": f"memory://gang-{secrets.token_hex(4)}"}, "queueName": "gpus", **spec})


def once(kube: FakeKube, res: FederatedFineTune, old: RunStatus | None = None) -> RunStatus:
    return compute(reconcile(kube, PinnedKeys(), res, 1, old or RunStatus(), NOW))


def kueue_says(kube: FakeKube, **conditions: tuple[str, str]) -> None:
    """Kueue's verdict on the run's Workload: condition type -> (status, message)."""
    kube.objects["Workload", WORKLOAD]["status"] = {
        "conditions": [{"type": t, "status": s, "reason": t, "message": m} for t, (s, m) in conditions.items()]
    }


def suspended(kube: FakeKube) -> dict[str, bool]:
    return {name: bool(job["spec"].get("suspend")) for name, job in kube.jobs("team-a", "quickstart").items()}


def test_the_workload_holds_every_pod_of_the_run_in_pod_sets_by_shape() -> None:
    res = queued()
    wl = gang.workload(res)
    assert (wl["apiVersion"], wl["kind"], wl["spec"]["queueName"]) == ("kueue.x-k8s.io/v1beta2", "Workload", "gpus")
    assert wl["metadata"]["ownerReferences"][0]["uid"] == res.metadata.uid
    sets = {s["name"]: s for s in wl["spec"]["podSets"]}
    # clinic and bank ask for the same pool and resources; devops for another pool.
    assert {n: s["count"] for n, s in sets.items()} == {"aggregator": 1, "clients-0": 2, "clients-1": 1}
    gpus = sets["clients-1"]["template"]["spec"]["containers"][0]["resources"]["requests"]["nvidia.com/gpu"]
    assert gpus == "1" and sets["clients-1"]["template"]["spec"]["nodeSelector"] == {"fedtune.io/pool": "gpu-h100"}


def test_queued_jobs_are_created_suspended_and_carry_no_queue_label() -> None:
    for res, suspend in ((queued(), True), (run(), None)):
        for manifest in builders.children(res, TRUST):
            if manifest["kind"] == "Job":
                assert manifest["spec"].get("suspend") is suspend
                assert not any(k.startswith("kueue.x-k8s.io/") for k in manifest["metadata"]["labels"])


def test_a_run_waits_whole_until_kueue_admits_it_then_starts_whole() -> None:
    kube, res = FakeKube(storage_secrets(*PARTIES)), queued()
    status = once(kube, res)
    order = [c for c in kube.created if c.split("/")[0] in ("Workload", "Job")]
    assert order[0] == f"Workload/{WORKLOAD}", "the Workload exists before any Job it admits"
    assert set(suspended(kube).values()) == {True}
    ready = status.condition("Ready")
    assert status.state == "Pending" and ready is not None and ready.reason == "Queued"
    kueue_says(kube, QuotaReserved=("False", QUOTA), Admitted=("False", "The workload has not all checks ready"))
    status = once(kube, res, status)
    ready = status.condition("Ready")
    assert ready is not None and QUOTA in ready.message and "LocalQueue gpus" in ready.message
    assert kube.suspended == []
    kueue_says(kube, QuotaReserved=("True", ""), Admitted=("True", ""))
    status = once(kube, res, status)
    assert sorted(kube.suspended) == sorted((n, False) for n in job_names(res))
    assert set(suspended(kube).values()) == {False} and status.condition("Ready").reason == "ChildrenReady"  # type: ignore[union-attr]


def test_a_deleted_workload_is_made_again_and_the_run_waits_for_it() -> None:
    kube, res = FakeKube(storage_secrets(*PARTIES)), queued()
    status = once(kube, res)
    kube.delete_workload("team-a", WORKLOAD)
    kube.created.clear()
    once(kube, res, status)
    assert kube.created == [f"Workload/{WORKLOAD}"] and set(suspended(kube).values()) == {True}


def test_suspending_or_failing_removes_the_pods_and_gives_the_quota_back() -> None:
    for old, res in ((RunStatus(), queued(suspend=True)), (RunStatus(state="Failed"), queued())):
        kube = FakeKube(storage_secrets(*PARTIES))
        once(kube, queued().model_copy(update={"metadata": res.metadata}))
        kube.deleted.clear()
        once(kube, res, old)
        assert sorted(kube.deleted) == sorted([f"Workload/{WORKLOAD}", *(f"Job/{n}" for n in job_names(res))])


def test_a_run_that_failed_before_its_jobs_existed_gives_its_quota_back() -> None:
    kube, res = FakeKube(storage_secrets(*PARTIES)), queued()
    kube.create(gang.workload(res))
    once(kube, res, RunStatus(state="Failed"))
    assert kube.deleted == [f"Workload/{WORKLOAD}"]


def test_an_eviction_stops_every_job_then_queues_the_run_afresh() -> None:
    kube, res = FakeKube(storage_secrets(*PARTIES)), queued()
    status = once(kube, res)
    kueue_says(kube, QuotaReserved=("True", ""), Admitted=("True", ""))
    status = once(kube, res, status)
    kube.suspended.clear()
    # Kueue leaves an evicted Workload Admitted until its owner has stopped the pods.
    kueue_says(kube, QuotaReserved=("True", ""), Admitted=("True", ""), Evicted=("True", "Preempted"))
    for name in job_names(res):
        kube.objects["Job", name]["status"] = {"active": 1}
    status = once(kube, res, status)
    assert sorted(kube.suspended) == sorted((n, True) for n in job_names(res))
    ready = status.condition("Ready")
    assert ready is not None and ready.message == "evicted by Kueue: Preempted"
    assert ("Workload", WORKLOAD) in kube.objects, "kept while its pods still run"
    for name in job_names(res):
        kube.objects["Job", name]["status"] = {}
    status = once(kube, res, status)
    assert f"Workload/{WORKLOAD}" in kube.deleted, "its pods gone, the run is queued afresh"
    kube.created.clear()
    once(kube, res, status)
    assert kube.created == [f"Workload/{WORKLOAD}"] and set(suspended(kube).values()) == {True}


def test_a_workload_the_run_did_not_make_cannot_start_it() -> None:
    kube, res = FakeKube(storage_secrets(*PARTIES)), queued()
    forged = gang.workload(res)
    forged["metadata"]["ownerReferences"] = []
    forged["status"] = {"conditions": [{"type": "Admitted", "status": "True"}]}
    kube.objects["Workload", WORKLOAD] = forged
    status = once(kube, res)
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == "WorkloadConflict" and "spec.queueName" in ready.message
    assert kube.suspended == [] and set(suspended(kube).values()) == {True}


def test_admitted_jobs_start_on_the_nodes_of_the_flavors_kueue_chose() -> None:
    kube, res = FakeKube(storage_secrets(*PARTIES)), queued()
    status = once(kube, res)
    toleration = {"key": "reserved", "operator": "Exists", "effect": "NoSchedule"}
    kube.objects["ResourceFlavor", "a100-spot"] = {
        "spec": {"nodeLabels": {"spot": "true"}, "tolerations": [toleration]}
    }
    kueue_says(kube, QuotaReserved=("True", ""), Admitted=("True", ""))
    assignments = [{"name": "clients-0", "flavors": {"nvidia.com/gpu": "a100-spot", "cpu": "a100-spot"}}]
    kube.objects["Workload", WORKLOAD]["status"]["admission"] = {"podSetAssignments": assignments}
    once(kube, res, status)
    pods = {n: kube.objects["Job", n]["spec"]["template"]["spec"] for n in job_names(res)}
    for client, spot in (("clinic", True), ("bank", True), ("devops", False)):
        pod = pods[f"quickstart-client-{client}"]
        assert (pod["nodeSelector"].get("spot") == "true") is spot
        assert (toleration in pod["tolerations"]) is spot
    assert pods["quickstart-client-clinic"]["nodeSelector"]["fedtune.io/pool"] == "gpu-a100", "the run's own kept"


def test_time_in_the_queue_does_not_count_against_the_deadline() -> None:
    kube, res = FakeKube(storage_secrets(*PARTIES)), queued(activeDeadlineSeconds=60)
    status = once(kube, res)
    assert status.start_time is None and status.state == "Pending"


def test_a_cluster_without_kueue_holds_the_run_with_a_condition_naming_the_field() -> None:
    class NoKueue(FakeKube):
        def create(self, manifest: dict[str, Any]) -> bool:
            if manifest["kind"] == "Workload":
                raise NotServed("the cluster serves no kueue.x-k8s.io/v1beta2 Workload: is it installed?")
            return super().create(manifest)

    kube = NoKueue(storage_secrets(*PARTIES))
    status = once(kube, queued())
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == "KueueNotInstalled" and ready.message.startswith("spec.queueName:")
    assert kube.jobs("team-a", "quickstart") == {}, "no Job may start outside the queue"


def test_more_client_shapes_than_kueue_has_pod_sets_is_refused() -> None:
    clients = [
        {"name": f"c{i}", "data": {"uri": f"s3://b/{i}.jsonl"}, "resources": {"gpus": 1, "cpu": str(i + 1)}}
        for i in range(8)
    ]
    res = queued(clients=clients)
    why = gang.too_many_shapes(res)
    assert why is not None and why.startswith("spec.queueName:") and "make 9" in why
    kube = FakeKube(storage_secrets("fedtune-aggregator"))
    ready = once(kube, res).condition("Ready")
    assert ready is not None and ready.reason == "TooManyPodSets" and kube.created == []


def test_a_queue_name_must_be_a_dns_label() -> None:
    with pytest.raises(SpecError, match="queueName"):
        queued(queueName="Not A Queue")
