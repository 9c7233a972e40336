"""A run's status, computed from what exists: its Jobs and pods, and its round records in storage.

Pure: observations in, status out. The operator recomputes it on every tick (level-based), so a
missed event or a restarted operator never leaves status wrong for long.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from fedtune.api.spec import FederatedFineTune
from fedtune.controller import builders
from fedtune.federation.protocol import FinalSummary, RoundSummary

Obj = dict[str, Any]

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = "Pending", "Running", "Succeeded", "Failed", "Suspended"
TERMINAL = (SUCCEEDED, FAILED)
CONDITION_TYPES = ("Ready", RUNNING, SUCCEEDED, FAILED, SUSPENDED)


@dataclass
class Progress:
    """What storage says about the run."""

    committed: int | None = None
    final: FinalSummary | None = None
    last: RoundSummary | None = None


@dataclass
class Observed:
    """Everything status is derived from."""

    resource: FederatedFineTune
    generation: int
    jobs: dict[str, Obj] = field(default_factory=dict)
    pods: list[Obj] = field(default_factory=list)
    progress: Progress = field(default_factory=Progress)
    blocked: tuple[str, str] | None = None  # (reason, message) that keeps pods from starting
    storage_error: str | None = None
    old: Obj = field(default_factory=dict)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


def _job_state(job: Obj | None, pods: list[Obj]) -> tuple[str, int]:
    """(state, failed pod count) of one Job."""
    if job is None:
        return PENDING, 0
    st = job.get("status") or {}
    failed = int(st.get("failed") or 0)
    for c in st.get("conditions") or []:
        if c.get("status") == "True" and c.get("type") in ("Complete", "SuccessCriteriaMet"):
            return SUCCEEDED, failed
        if c.get("status") == "True" and c.get("type") in ("Failed", "FailureTarget"):
            return FAILED, failed
    if any((p.get("status") or {}).get("phase") == "Running" for p in pods):
        return RUNNING, failed
    return PENDING, failed


def _pods_of(pods: list[Obj], job_name: str) -> list[Obj]:
    return [p for p in pods if (p["metadata"].get("labels") or {}).get("job-name") == job_name]


def _unschedulable(pods: list[Obj]) -> str | None:
    for p in pods:
        for c in (p.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return f"pod {p['metadata']['name']}: {c.get('message', 'unschedulable')}"
    return None


def _started(o: Observed) -> datetime | None:
    raw = o.old.get("startTime")
    return datetime.fromisoformat(raw) if raw else None


def _failure(o: Observed, clients: dict[str, Obj], agg_state: str) -> tuple[str, str] | None:
    spec = o.resource.spec
    if o.old.get("state") == FAILED:
        cond: Obj = next((c for c in o.old.get("conditions", []) if c.get("type") == FAILED), {})
        return cond.get("reason", "Failed"), cond.get("message", "")
    if agg_state == FAILED:
        return "AggregatorFailed", f"the aggregator failed more than backoffLimit={spec.backoff_limit} times"
    failed = sorted(n for n, c in clients.items() if c["state"] == FAILED)
    if failed and len(clients) - len(failed) < spec.aggregation.min_clients:
        return "ClientsFailed", (
            f"client {', '.join(failed)} failed past backoffLimit={spec.backoff_limit}; "
            f"fewer than minClients={spec.aggregation.min_clients} remain"
        )
    started = _started(o)
    deadline = spec.active_deadline_seconds
    if deadline and started and (o.now - started).total_seconds() > deadline:
        return "DeadlineExceeded", f"the run exceeded activeDeadlineSeconds={deadline}"
    return None


def _condition(o: Observed, type_: str, status: bool, reason: str, message: str) -> Obj:
    old = next((c for c in o.old.get("conditions", []) if c.get("type") == type_), None)
    value = "True" if status else "False"
    since = old["lastTransitionTime"] if old and old.get("status") == value else o.now.isoformat()
    return {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
        "observedGeneration": o.generation,
    }


def compute(o: Observed) -> Obj:
    """The status a run should have now."""
    res, spec = o.resource, o.resource.spec
    name = res.metadata.name
    agg_job = builders.aggregator_name(name)
    agg_state, agg_failures = _job_state(o.jobs.get(agg_job), _pods_of(o.pods, agg_job))
    clients: dict[str, Obj] = {}
    for c in spec.clients:
        job = builders.client_job_name(name, c.name)
        state, failures = _job_state(o.jobs.get(job), _pods_of(o.pods, job))
        clients[c.name] = {"name": c.name, "state": state, "restarts": failures}

    prog = o.progress
    total = spec.aggregation.rounds
    failed_rounds = prog.last.failed_total if prog.last else 0
    completed = prog.final.rounds if prog.final else max((prog.committed or 0) - failed_rounds, 0)
    if prog.final is not None and prog.final.failed:
        failure: tuple[str, str] | None = ("RoundsFailed", prog.final.failed)
    else:
        failure = None if prog.final else _failure(o, clients, agg_state)
    unschedulable = _unschedulable(o.pods)

    if prog.final is not None and failure is None:
        state, reason, message = SUCCEEDED, "RunSucceeded", f"{completed} rounds done; adapter at {prog.final.adapter}"
    elif failure is not None:
        state, (reason, message) = FAILED, failure
    elif spec.suspend:
        state, reason, message = SUSPENDED, "Suspended", f"suspended after {completed} committed rounds"
    elif o.blocked is not None:
        state, (reason, message) = PENDING, o.blocked
    elif agg_state == RUNNING:
        state, reason, message = RUNNING, "RoundsInProgress", f"round {completed + 1} of {total}"
    else:
        state, reason, message = (
            PENDING,
            "Unschedulable" if unschedulable else "PodsPending",
            (unschedulable or "waiting for the aggregator pod"),
        )

    ready_reason, ready_msg = "ChildrenReady", "Jobs created"
    if o.blocked:
        ready_reason, ready_msg = o.blocked
    elif o.storage_error:
        ready_reason, ready_msg = "StorageUnreachable", o.storage_error
    elif unschedulable:
        ready_reason, ready_msg = "Unschedulable", unschedulable
    ready = ready_reason == "ChildrenReady" and state in (RUNNING, PENDING)

    status: Obj = {
        "state": state,
        "observedGeneration": o.generation,
        "currentRound": min(completed, total - 1) if state != SUCCEEDED else total,
        "completedRounds": completed,
        "progress": f"{completed}/{total}",
        "clientsReady": f"{sum(c['state'] == RUNNING for c in clients.values())}/{len(clients)}",
        "gpus": builders.requested_gpus(res),
        "clients": list(clients.values()),
        "aggregator": {"state": agg_state, "restarts": agg_failures},
        "runRoot": builders.run_root(res),
        # The deadline clock stops while suspended and starts afresh on resume, as a Job's does.
        "startTime": None if state == SUSPENDED else o.old.get("startTime") or o.now.isoformat(),
        "conditions": [
            _condition(o, "Ready", ready, ready_reason, ready_msg),
            _condition(o, RUNNING, state == RUNNING, reason if state == RUNNING else "NotRunning", message),
            _condition(o, SUCCEEDED, state == SUCCEEDED, reason if state == SUCCEEDED else "NotSucceeded", message),
            _condition(o, FAILED, state == FAILED, reason if state == FAILED else "NotFailed", message),
            _condition(o, SUSPENDED, state == SUSPENDED, reason if state == SUSPENDED else "NotSuspended", message),
        ],
    }
    if prog.last is not None:
        status["lastRound"] = {
            "round": prog.last.round,
            "participants": prog.last.participants,
            "rejected": [r.client for r in prog.last.rejected],
            "trainLoss": prog.last.train_loss,
            "evalLoss": prog.last.eval_loss,
            "epsilon": prog.last.epsilon,
            "clientEpsilon": prog.last.client_epsilon or None,
            "seconds": round(prog.last.seconds, 3),
            "bytes": prog.last.bytes,
            "failed": prog.last.failed,
            "excluded": sorted(prog.last.excluded) or None,
        }
    if prog.final is not None:
        status["adapterURI"] = prog.final.adapter
        status["adapterSHA256"] = prog.final.adapter_sha256
        if prog.final.stopped_early:
            status["stoppedEarly"] = prog.final.stopped_early
        status["finalEvalLoss"] = prog.final.eval_loss
    if state in TERMINAL:
        status["completionTime"] = o.old.get("completionTime") or o.now.isoformat()
    return status


def message_of(status: Obj) -> tuple[str, str]:
    """(reason, message) of the condition that explains the state, for events."""
    for c in status["conditions"]:
        if c["type"] == status["state"] or (status["state"] == PENDING and c["type"] == "Ready"):
            return c["reason"], c["message"]
    return status["state"], ""


def invalid_spec(old: Obj, problems: list[str], generation: int | None, now: datetime) -> Obj:
    """The status of a resource that passed admission but fails the spec's checks; the transition time is
    kept while the problems stay the same, so the operator does not rewrite status on every tick."""
    message = "; ".join(problems)
    before: Obj = next((c for c in old.get("conditions") or [] if c.get("type") == FAILED), {})
    same = before.get("reason") == "InvalidSpec" and before.get("message") == message
    return {
        "state": FAILED,
        "observedGeneration": generation,
        "conditions": [
            {
                "type": FAILED,
                "status": "True",
                "reason": "InvalidSpec",
                "message": message,
                "lastTransitionTime": before["lastTransitionTime"] if same else now.isoformat(),
            }
        ],
    }
