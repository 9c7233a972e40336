"""status.compute: the state a run is in, derived only from its Jobs, pods and round records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fedtune.api import FederatedFineTune
from fedtune.controller import builders
from fedtune.controller.status import Observed, Progress, compute, message_of
from fedtune.federation.protocol import FinalSummary, RoundSummary
from tests.unit.runs import run

T0 = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
CLIENTS = ("clinic", "bank", "devops")


def job(name: str, condition: str | None = None, failed: int = 0) -> dict[str, Any]:
    """A batch/v1 Job as the API returns it, with one True condition (Complete, Failed) or none."""
    status: dict[str, Any] = {"failed": failed} if failed else {}
    if condition:
        status["conditions"] = [{"type": condition, "status": "True", "reason": "Test"}]
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name}, "status": status}


def pod(job_name: str, phase: str = "Running", unschedulable: str | None = None) -> dict[str, Any]:
    """A Job's pod; unschedulable gives it the scheduler's PodScheduled=False condition."""
    conditions = (
        [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}]
        if unschedulable
        else [{"type": "PodScheduled", "status": "True"}]
    )
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{job_name}-x7k2p", "labels": {"job-name": job_name, "controller-uid": "u"}},
        "status": {"phase": phase, "conditions": conditions},
    }


def agg(res: FederatedFineTune) -> str:
    return builders.aggregator_name(res.metadata.name)


def cli(res: FederatedFineTune, name: str) -> str:
    return builders.client_job_name(res.metadata.name, name)


def all_running(res: FederatedFineTune) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Jobs and pods of a run whose aggregator and clients all have a running pod."""
    names = [agg(res), *(cli(res, c) for c in CLIENTS)]
    return {n: job(n) for n in names}, [pod(n) for n in names]


def observe(res: FederatedFineTune, old: dict[str, Any] | None = None, at: float = 0, **kw: Any) -> dict[str, Any]:
    """compute() at T0 + `at` seconds, from the previous status `old`."""
    return compute(Observed(resource=res, generation=1, old=old or {}, now=T0 + timedelta(seconds=at), **kw))


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def condition(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def round_summary(r: int) -> RoundSummary:
    return RoundSummary(
        round=r, participants=list(CLIENTS), train_loss=2.5, eval_loss=2.75, seconds=12.3456, bytes=4096
    )


def test_pending_then_running_then_succeeded() -> None:
    res = run()
    pending = observe(res)
    assert pending["state"] == "Pending"
    assert (pending["progress"], pending["clientsReady"], pending["gpus"]) == ("0/3", "0/3", 3)
    assert conditions(pending)["Running"] == ("False", "NotRunning")
    assert [c["state"] for c in pending["clients"]] == ["Pending"] * 3

    jobs, pods = all_running(res)
    running = observe(res, pending, 30, jobs=jobs, pods=pods, progress=Progress(committed=1, last=round_summary(0)))
    assert running["state"] == "Running"
    assert (running["progress"], running["currentRound"], running["clientsReady"]) == ("1/3", 1, "3/3")
    assert conditions(running)["Running"] == ("True", "RoundsInProgress")
    assert running["lastRound"]["participants"] == list(CLIENTS)
    assert running["lastRound"]["seconds"] == 12.346
    assert running["startTime"] == pending["startTime"] == T0.isoformat()
    assert "completionTime" not in running

    jobs = {n: job(n, "Complete") for n in jobs}
    final = FinalSummary(
        rounds=3,
        eval_loss=1.5,
        adapter="s3://fedtune/runs/x/final",
        adapter_sha256="ab" * 32,
        config_sha256="cd" * 32,
        chain=["00" * 32] * 4,
        epoch=1,
    )
    done = observe(res, running, 90, jobs=jobs, progress=Progress(committed=3, final=final, last=round_summary(2)))
    assert done["state"] == "Succeeded"
    assert (done["progress"], done["currentRound"]) == ("3/3", 3)
    assert done["adapterURI"] == "s3://fedtune/runs/x/final"
    assert done["adapterSHA256"] == "ab" * 32
    assert conditions(done)["Succeeded"] == ("True", "RunSucceeded")
    assert conditions(done)["Running"] == ("False", "NotRunning")
    assert done["completionTime"] == (T0 + timedelta(seconds=90)).isoformat()
    assert message_of(done)[0] == "RunSucceeded"


def test_last_transition_time_changes_only_when_a_condition_does() -> None:
    res = run()
    jobs, pods = all_running(res)
    first = observe(res, jobs=jobs, pods=pods)
    later = observe(res, first, 60, jobs=jobs, pods=pods, progress=Progress(committed=2))
    for type_ in ("Ready", "Running", "Failed", "Succeeded", "Suspended"):
        assert condition(later, type_)["lastTransitionTime"] == T0.isoformat(), type_
    # The message moved on with the rounds; the transition time did not.
    assert condition(later, "Running")["message"] != condition(first, "Running")["message"]

    suspended = observe(run(suspend=True), later, 120)
    moved = T0 + timedelta(seconds=120)
    assert condition(suspended, "Suspended")["lastTransitionTime"] == moved.isoformat()
    assert condition(suspended, "Running")["lastTransitionTime"] == moved.isoformat()
    assert condition(suspended, "Failed")["lastTransitionTime"] == T0.isoformat()


def test_a_failed_client_is_dropped_while_min_clients_remain() -> None:
    """minClients=2 of 3: one client past its backoffLimit leaves two, so the run goes on."""
    res = run()
    jobs, pods = all_running(res)
    jobs[cli(res, "bank")] = job(cli(res, "bank"), "Failed", failed=3)
    pods = [p for p in pods if p["metadata"]["labels"]["job-name"] != cli(res, "bank")]
    status = observe(res, jobs=jobs, pods=pods)
    assert status["state"] == "Running"
    assert {c["name"]: (c["state"], c["restarts"]) for c in status["clients"]}["bank"] == ("Failed", 3)
    assert status["clientsReady"] == "2/3"
    assert conditions(status)["Failed"] == ("False", "NotFailed")


def test_the_run_fails_when_fewer_than_min_clients_remain() -> None:
    res = run()
    jobs, pods = all_running(res)
    for name in ("devops", "bank"):
        jobs[cli(res, name)] = job(cli(res, name), "Failed", failed=3)
    status = observe(res, jobs=jobs, pods=pods)
    assert status["state"] == "Failed"
    assert conditions(status)["Failed"] == ("True", "ClientsFailed")
    message = condition(status, "Failed")["message"]
    assert "bank, devops" in message and "minClients=2" in message and "clinic" not in message
    assert status["completionTime"] == T0.isoformat()
    assert message_of(status) == ("ClientsFailed", message)

    # Failed is final: jobs that look healthy again do not revive the run.
    healthy, pods = all_running(res)
    again = observe(res, status, 10, jobs=healthy, pods=pods)
    assert again["state"] == "Failed" and conditions(again)["Failed"] == ("True", "ClientsFailed")
    assert again["completionTime"] == status["completionTime"]


def test_the_run_fails_with_its_aggregator() -> None:
    res = run()
    jobs, pods = all_running(res)
    jobs[agg(res)] = job(agg(res), "Failed", failed=3)
    status = observe(res, jobs=jobs, pods=pods)
    assert status["state"] == "Failed"
    assert conditions(status)["Failed"] == ("True", "AggregatorFailed")
    assert "backoffLimit=2" in condition(status, "Failed")["message"]
    assert status["aggregator"] == {"state": "Failed", "restarts": 3}


def test_active_deadline_counts_from_the_start_time() -> None:
    res = run(activeDeadlineSeconds=60)
    jobs, pods = all_running(res)
    first = observe(res, jobs=jobs, pods=pods)
    assert observe(res, first, 59, jobs=jobs, pods=pods)["state"] == "Running"
    late = observe(res, first, 61, jobs=jobs, pods=pods)
    assert late["state"] == "Failed"
    assert conditions(late)["Failed"] == ("True", "DeadlineExceeded")
    assert "activeDeadlineSeconds=60" in condition(late, "Failed")["message"]


def test_a_missing_secret_blocks_the_run() -> None:
    blocked = ("SecretNotFound", "spec.storage.secretRef: Secret team-a/fedtune-s3 not found")
    status = observe(run(), blocked=blocked)
    assert status["state"] == "Pending"
    ready = condition(status, "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "SecretNotFound")
    assert ready["message"].startswith("spec.storage.secretRef:")
    assert message_of(status)[0] == "SecretNotFound"


def test_a_suspended_run_says_so() -> None:
    res = run(suspend=True)
    status = observe(res, progress=Progress(committed=1))
    assert status["state"] == "Suspended"
    assert conditions(status)["Suspended"] == ("True", "Suspended")
    assert conditions(status)["Running"] == ("False", "NotRunning")
    assert "after 1 committed rounds" in condition(status, "Suspended")["message"]
    assert message_of(status)[0] == "Suspended"


def test_an_unschedulable_pod_is_reported() -> None:
    res = run()
    why = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    status = observe(res, jobs={agg(res): job(agg(res))}, pods=[pod(agg(res), "Pending", unschedulable=why)])
    assert status["state"] == "Pending"
    assert conditions(status)["Ready"] == ("False", "Unschedulable")
    assert why in condition(status, "Ready")["message"]


def test_status_describes_the_generation_it_saw() -> None:
    res = run()
    status = compute(Observed(resource=res, generation=7, now=T0))
    assert status["observedGeneration"] == 7
    assert {c["observedGeneration"] for c in status["conditions"]} == {7}
