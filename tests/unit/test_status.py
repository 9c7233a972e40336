"""status.compute: the state a run is in, derived only from its Jobs, pods and round records."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from fedtune.api import FederatedFineTune
from fedtune.api.crd import crd
from fedtune.api.status import Condition, RunStatus, merged
from fedtune.controller.names import aggregator_name, client_job_name
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
    return aggregator_name(res.metadata.name)


def cli(res: FederatedFineTune, name: str) -> str:
    return client_job_name(res.metadata.name, name)


def all_running(res: FederatedFineTune) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Jobs and pods of a run whose aggregator and clients all have a running pod."""
    names = [agg(res), *(cli(res, c) for c in CLIENTS)]
    return {n: job(n) for n in names}, [pod(n) for n in names]


def observe(res: FederatedFineTune, old: RunStatus | None = None, at: float = 0, **kw: Any) -> RunStatus:
    """compute() at T0 + `at` seconds, from the previous status `old`."""
    return compute(Observed(resource=res, generation=1, old=old or RunStatus(), now=T0 + timedelta(seconds=at), **kw))


def conditions(status: RunStatus) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions or []}


def condition(status: RunStatus, type_: str) -> Condition:
    return next(c for c in status.conditions or [] if c.type == type_)


def round_summary(r: int) -> RoundSummary:
    return RoundSummary(
        round=r, participants=list(CLIENTS), train_loss=2.5, eval_loss=2.75, seconds=12.3456, bytes=4096
    )


def test_pending_then_running_then_succeeded() -> None:
    res = run()
    pending = observe(res)
    assert pending.state == "Pending"
    assert (pending.progress, pending.clients_ready, pending.gpus) == ("0/3", "0/3", 3)
    assert conditions(pending)["Running"] == ("False", "NotRunning")
    assert [c.state for c in pending.clients or []] == ["Pending"] * 3

    jobs, pods = all_running(res)
    running = observe(res, pending, 30, jobs=jobs, pods=pods, progress=Progress(committed=1, last=round_summary(0)))
    assert running.state == "Running"
    assert (running.progress, running.current_round, running.clients_ready) == ("1/3", 1, "3/3")
    assert conditions(running)["Running"] == ("True", "RoundsInProgress")
    assert running.last_round is not None and running.last_round.participants == list(CLIENTS)
    assert running.last_round.seconds == 12.346
    assert running.start_time == pending.start_time == T0
    assert "completionTime" not in running.patch()

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
    assert done.state == "Succeeded"
    assert (done.progress, done.current_round) == ("3/3", 3)
    written = done.patch()
    assert written["adapterURI"] == "s3://fedtune/runs/x/final"
    assert written["adapterSHA256"] == "ab" * 32
    assert conditions(done)["Succeeded"] == ("True", "RunSucceeded")
    assert conditions(done)["Running"] == ("False", "NotRunning")
    assert done.completion_time == T0 + timedelta(seconds=90)
    assert written["completionTime"] == "2025-01-01T12:01:30Z"
    assert message_of(done)[0] == "RunSucceeded"


def test_last_transition_time_changes_only_when_a_condition_does() -> None:
    res = run()
    jobs, pods = all_running(res)
    first = observe(res, jobs=jobs, pods=pods)
    later = observe(res, first, 60, jobs=jobs, pods=pods, progress=Progress(committed=2))
    for type_ in ("Ready", "Running", "Failed", "Succeeded", "Suspended"):
        assert condition(later, type_).last_transition_time == T0, type_
    # The message moved on with the rounds; the transition time did not.
    assert condition(later, "Running").message != condition(first, "Running").message

    suspended = observe(run(suspend=True), later, 120)
    moved = T0 + timedelta(seconds=120)
    assert condition(suspended, "Suspended").last_transition_time == moved
    assert condition(suspended, "Running").last_transition_time == moved
    assert condition(suspended, "Failed").last_transition_time == T0


def test_a_failed_client_is_dropped_while_min_clients_remain() -> None:
    """minClients=2 of 3: one client past its backoffLimit leaves two, so the run goes on."""
    res = run()
    jobs, pods = all_running(res)
    jobs[cli(res, "bank")] = job(cli(res, "bank"), "Failed", failed=3)
    pods = [p for p in pods if p["metadata"]["labels"]["job-name"] != cli(res, "bank")]
    status = observe(res, jobs=jobs, pods=pods)
    assert status.state == "Running"
    assert {c.name: (c.state, c.restarts) for c in status.clients or []}["bank"] == ("Failed", 3)
    assert status.clients_ready == "2/3"
    assert conditions(status)["Failed"] == ("False", "NotFailed")


def test_the_run_fails_when_fewer_than_min_clients_remain() -> None:
    res = run()
    jobs, pods = all_running(res)
    for name in ("devops", "bank"):
        jobs[cli(res, name)] = job(cli(res, name), "Failed", failed=3)
    status = observe(res, jobs=jobs, pods=pods)
    assert status.state == "Failed"
    assert conditions(status)["Failed"] == ("True", "ClientsFailed")
    message = condition(status, "Failed").message
    assert "bank, devops" in message and "minClients=2" in message and "clinic" not in message
    assert status.completion_time == T0
    assert message_of(status) == ("ClientsFailed", message)

    # Failed is final: jobs that look healthy again do not revive the run.
    healthy, pods = all_running(res)
    again = observe(res, status, 10, jobs=healthy, pods=pods)
    assert again.state == "Failed" and conditions(again)["Failed"] == ("True", "ClientsFailed")
    assert again.completion_time == status.completion_time


def test_the_run_fails_with_its_aggregator() -> None:
    res = run()
    jobs, pods = all_running(res)
    jobs[agg(res)] = job(agg(res), "Failed", failed=3)
    status = observe(res, jobs=jobs, pods=pods)
    assert status.state == "Failed"
    assert conditions(status)["Failed"] == ("True", "AggregatorFailed")
    assert "backoffLimit=2" in condition(status, "Failed").message
    assert status.patch()["aggregator"] == {"state": "Failed", "restarts": 3}


def test_active_deadline_counts_from_the_start_time() -> None:
    res = run(activeDeadlineSeconds=60)
    jobs, pods = all_running(res)
    first = observe(res, jobs=jobs, pods=pods)
    assert observe(res, first, 59, jobs=jobs, pods=pods).state == "Running"
    late = observe(res, first, 61, jobs=jobs, pods=pods)
    assert late.state == "Failed"
    assert conditions(late)["Failed"] == ("True", "DeadlineExceeded")
    assert "activeDeadlineSeconds=60" in condition(late, "Failed").message


def test_a_missing_secret_blocks_the_run() -> None:
    blocked = ("SecretNotFound", "spec.storage.secretRef: Secret team-a/fedtune-s3 not found")
    status = observe(run(), blocked=blocked)
    assert status.state == "Pending"
    ready = condition(status, "Ready")
    assert (ready.status, ready.reason) == ("False", "SecretNotFound")
    assert ready.message.startswith("spec.storage.secretRef:")
    assert message_of(status)[0] == "SecretNotFound"


def test_a_suspended_run_says_so() -> None:
    res = run(suspend=True)
    status = observe(res, progress=Progress(committed=1))
    assert status.state == "Suspended"
    assert conditions(status)["Suspended"] == ("True", "Suspended")
    assert conditions(status)["Running"] == ("False", "NotRunning")
    assert "after 1 committed rounds" in condition(status, "Suspended").message
    assert message_of(status)[0] == "Suspended"


def test_an_unschedulable_pod_is_reported() -> None:
    res = run()
    why = "0/4 nodes are available: 4 Insufficient nvidia.com/gpu."
    status = observe(res, jobs={agg(res): job(agg(res))}, pods=[pod(agg(res), "Pending", unschedulable=why)])
    assert status.state == "Pending"
    assert conditions(status)["Ready"] == ("False", "Unschedulable")
    assert why in condition(status, "Ready").message


def test_status_describes_the_generation_it_saw() -> None:
    res = run()
    status = compute(Observed(resource=res, generation=7, now=T0))
    assert status.observed_generation == 7
    assert {c.observed_generation for c in status.conditions or []} == {7}


def test_a_settled_status_is_not_written_again() -> None:
    """Written as a merge patch, the same observations change nothing: losses left out under privacy are not
    rewritten on every tick, and a field set to None is removed from the stored status."""
    res = run()
    jobs, pods = all_running(res)
    private = round_summary(0).model_copy(update={"train_loss": None, "eval_loss": None, "epsilon": 0.5})
    seen = {"jobs": jobs, "pods": pods, "progress": Progress(committed=1, last=private)}
    stored = merged({}, observe(res, **seen).patch())
    assert "trainLoss" not in stored["lastRound"] and stored["lastRound"]["epsilon"] == 0.5
    assert merged(stored, observe(res, RunStatus.read(stored), 3, **seen).patch()) == stored
    suspended = merged(stored, observe(run(suspend=True), RunStatus.read(stored), 6).patch())
    assert "startTime" not in suspended and suspended["state"] == "Suspended"


def test_storage_out_of_reach_keeps_what_it_said_before() -> None:
    """Rounds unknown for a moment are not rounds undone, and a run that succeeded stays succeeded."""
    res = run(activeDeadlineSeconds=60)
    jobs, pods = all_running(res)
    stored = merged(
        {}, observe(res, jobs=jobs, pods=pods, progress=Progress(committed=2, last=round_summary(1))).patch()
    )
    blind = merged(stored, observe(res, RunStatus.read(stored), 3, jobs=jobs, pods=pods, storage_error="no").patch())
    assert (blind["completedRounds"], blind["progress"]) == (2, "2/3")
    assert blind["lastRound"] == stored["lastRound"]

    final = FinalSummary(
        rounds=3, adapter="s3://a", adapter_sha256="ab" * 32, config_sha256="cd" * 32, chain=[], epoch=1
    )
    done = observe(res, RunStatus.read(stored), 10, jobs=jobs, progress=Progress(committed=3, final=final))
    later = observe(res, done, 120, jobs={n: job(n, "Complete") for n in jobs}, storage_error="no")
    assert (later.state, condition(later, "Succeeded").reason) == ("Succeeded", "RunSucceeded")
    assert later.completion_time == done.completion_time


def test_everything_written_is_in_the_crds_status_schema() -> None:
    """The API server prunes what its schema lacks; a status with every field set loses nothing."""
    schema = crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["status"]
    res = run(suspend=False)
    jobs, pods = all_running(res)
    last = round_summary(2).model_copy(update={"failed": "late", "excluded": {"bank": "n"}, "client_epsilon": {"a": 1}})
    final = FinalSummary(
        rounds=3,
        adapter="s3://a",
        adapter_sha256="ab" * 32,
        config_sha256="cd" * 32,
        chain=[],
        epoch=1,
        stopped_early="privacy.targetEpsilon",
        eval_loss=1.0,
    )
    written = observe(res, jobs=jobs, pods=pods, progress=Progress(committed=3, final=final, last=last)).patch()

    def check(value: Any, node: dict[str, Any], path: str) -> None:
        if isinstance(value, dict) and "properties" in node:
            for key, child in value.items():
                assert key in node["properties"], f"{path}.{key} is not in the status schema"
                check(child, node["properties"][key], f"{path}.{key}")
        elif isinstance(value, list) and "items" in node:
            for item in value:
                check(item, node["items"], f"{path}[]")

    check(written, schema, "status")
    assert {"lastRound", "adapterSHA256", "stoppedEarly", "completionTime", "finalEvalLoss"} <= set(written)
