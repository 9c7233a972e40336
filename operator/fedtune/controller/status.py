"""A run's status, computed from what exists: its Jobs and pods, and its round records in storage.

Pure: observations in, status out. The operator recomputes it on every tick (level-based), so a
missed event or a restarted operator never leaves status wrong for long.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from fedtune.api.spec import FederatedFineTune
from fedtune.api.status import (
    TERMINAL,
    ClientStatus,
    Condition,
    ConditionType,
    LastRound,
    PartyStatus,
    RunState,
    RunStatus,
)
from fedtune.controller import builders
from fedtune.controller.names import aggregator_name, client_job_name
from fedtune.federation.protocol import FinalSummary, RoundSummary

Obj = dict[str, Any]

PENDING, RUNNING, SUCCEEDED, FAILED, SUSPENDED = RunState
# Conditions that say whether the run is in one state; Ready says whether its children could be created.
STATE_CONDITIONS: tuple[ConditionType, ...] = ("Running", "Succeeded", "Failed", "Suspended")


@dataclass
class Progress:
    """What storage says about the run."""

    committed: int | None = None
    final: FinalSummary | None = None
    last: RoundSummary | None = None
    signed: dict[str, bool] = field(default_factory=dict)  # external client -> has a record it signed


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
    old: RunStatus = field(default_factory=RunStatus)
    now: datetime = field(default_factory=lambda: datetime.now(UTC))


def state_of_job(job: Obj | None, pods: list[Obj]) -> tuple[RunState, int]:
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


def _external(o: Observed, name: str) -> ClientStatus:
    """A client in another cluster, as storage shows it: Running once a round has taken its update, Pending
    while the aggregator leaves it out (it stopped answering), Succeeded with the run."""
    prog = o.progress
    before = next((c for c in o.old.clients or [] if c.name == name), None)
    last_round = prog.last.round if prog.last and name in prog.last.participants else None
    if last_round is None and before is not None:
        last_round = before.last_round
    # Once it has signed, it has: a storage read that fails later does not undo that.
    signed = bool(before and before.signed) or prog.signed.get(name, False) or last_round is not None
    left_out = prog.last is not None and name in prog.last.excluded
    if prog.final is not None or (before is not None and before.state == SUCCEEDED):
        state = SUCCEEDED
    else:
        state = RUNNING if last_round is not None and not left_out else PENDING
    # Unset, not null, while it has taken part in no round: the status is written as a merge patch.
    took_part = {} if last_round is None else {"last_round": last_round}
    return ClientStatus(name=name, state=state, restarts=0, external=True, signed=signed, **took_part)


def _pods_of(pods: list[Obj], job_name: str) -> list[Obj]:
    return [p for p in pods if (p["metadata"].get("labels") or {}).get("job-name") == job_name]


def _unschedulable(pods: list[Obj]) -> str | None:
    for p in pods:
        for c in (p.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return f"pod {p['metadata']['name']}: {c.get('message', 'unschedulable')}"
    return None


def _failure(o: Observed, clients: list[ClientStatus], agg_state: RunState) -> tuple[str, str] | None:
    spec = o.resource.spec
    if agg_state == FAILED:
        return "AggregatorFailed", f"the aggregator failed more than backoffLimit={spec.backoff_limit} times"
    failed = sorted(c.name for c in clients if c.state == FAILED)
    if failed and len(clients) - len(failed) < spec.aggregation.min_clients:
        return "ClientsFailed", (
            f"client {', '.join(failed)} failed past backoffLimit={spec.backoff_limit}; "
            f"fewer than minClients={spec.aggregation.min_clients} remain"
        )
    started = o.old.start_time
    deadline = spec.active_deadline_seconds
    if deadline and started and (o.now - started).total_seconds() > deadline:
        return "DeadlineExceeded", f"the run exceeded activeDeadlineSeconds={deadline}"
    return None


def _ended(old: RunStatus) -> tuple[str, str]:
    """(reason, message) of a run that has succeeded or failed, as its condition says."""
    cond = old.condition("Succeeded" if old.state == SUCCEEDED else "Failed")
    return (cond.reason, cond.message) if cond else (str(old.state), "")


def settled(old: RunStatus) -> bool:
    """Whether the run has ended for good: Succeeded, or Failed for a reason other than its spec (a fixed
    spec resumes a run that failed only its checks)."""
    return old.state in TERMINAL and not (old.state == FAILED and _ended(old)[0] == "InvalidSpec")


def _condition(o: Observed, type_: ConditionType, status: bool, reason: str, message: str) -> Condition:
    old = o.old.condition(type_)
    value = "True" if status else "False"
    return Condition(
        type=type_,
        status=value,
        reason=reason,
        message=message,
        last_transition_time=old.last_transition_time if old and old.status == value else o.now,
        observed_generation=o.generation,
    )


def _last_round(last: RoundSummary) -> LastRound:
    return LastRound(
        round=last.round,
        participants=last.participants,
        rejected=[r.client for r in last.rejected],
        train_loss=last.train_loss,
        eval_loss=last.eval_loss,
        epsilon=last.epsilon,
        client_epsilon=last.client_epsilon or None,
        seconds=round(last.seconds, 3),
        bytes=last.bytes,
        failed=last.failed,
        excluded=sorted(last.excluded) or None,
    )


def compute(o: Observed) -> RunStatus:
    """The status a run should have now; fields storage did not answer for are left unset (kept as stored)."""
    res, spec = o.resource, o.resource.spec
    name = res.metadata.name
    agg_job = aggregator_name(name)
    agg_state, agg_failures = state_of_job(o.jobs.get(agg_job), _pods_of(o.pods, agg_job))
    clients: list[ClientStatus] = []
    for c in spec.clients:
        if c.external:
            clients.append(_external(o, c.name))
            continue
        job = client_job_name(name, c.name)
        job_state, failures = state_of_job(o.jobs.get(job), _pods_of(o.pods, job))
        clients.append(ClientStatus(name=c.name, state=job_state, restarts=failures))

    prog = o.progress
    total = spec.aggregation.rounds
    failed_rounds = prog.last.failed_total if prog.last else 0
    if o.storage_error:  # the rounds are unknown for now, not undone
        completed = o.old.completed_rounds or 0
    else:
        completed = prog.final.rounds if prog.final else max((prog.committed or 0) - failed_rounds, 0)
    unschedulable = _unschedulable(o.pods)
    queued = o.blocked is not None and o.blocked[0] == "Queued"

    state: RunState
    failure = None if prog.final else _failure(o, clients, agg_state)
    if o.old.state is not None and settled(o.old):
        # Succeeded and Failed are final: a storage outage or a deadline passing later does not reopen a run.
        state, (reason, message) = o.old.state, _ended(o.old)
    elif prog.final is not None and prog.final.failed:
        state, reason, message = FAILED, "RoundsFailed", prog.final.failed
    elif prog.final is not None:
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

    status = RunStatus(
        state=state,
        observed_generation=o.generation,
        current_round=min(completed, total - 1) if state != SUCCEEDED else total,
        completed_rounds=completed,
        progress=f"{completed}/{total}",
        clients_ready=f"{sum(c.state == RUNNING for c in clients)}/{len(clients)}",
        gpus=builders.requested_gpus(res),
        clients=clients,
        aggregator=PartyStatus(state=agg_state, restarts=agg_failures),
        run_root=builders.run_root(res),
        # The deadline clock stops while suspended or queued and starts afresh on resume, as a Job's does.
        start_time=None if state == SUSPENDED or queued else o.old.start_time or o.now,
        conditions=[
            _condition(o, "Ready", ready, ready_reason, ready_msg),
            *(_condition(o, t, state == t, reason if state == t else f"Not{t}", message) for t in STATE_CONDITIONS),
        ],
    )
    if prog.last is not None:
        status.last_round = _last_round(prog.last)
    if prog.final is not None:
        status.adapter_uri = prog.final.adapter
        status.adapter_sha256 = prog.final.adapter_sha256
        if prog.final.stopped_early:
            status.stopped_early = prog.final.stopped_early
        status.final_eval_loss = prog.final.eval_loss
    if state in TERMINAL:
        status.completion_time = o.old.completion_time or o.now
    return status


def message_of(status: RunStatus) -> tuple[str, str]:
    """(reason, message) of the condition that explains the state, for events."""
    for c in status.conditions or []:
        if c.type == status.state or (status.state == PENDING and c.type == "Ready"):
            return c.reason, c.message
    return str(status.state), ""


def invalid_spec(old: RunStatus, problems: list[str], generation: int, now: datetime) -> RunStatus:
    """The status of a resource that passed admission but fails the spec's checks; the transition time is
    kept while the problems stay the same, so the operator does not rewrite status on every tick."""
    condition = invalid_spec_condition("Failed", "True", problems, old.condition("Failed"), generation, now)
    return RunStatus(state=FAILED, observed_generation=generation, conditions=[condition])


def invalid_spec_condition(
    type_: ConditionType,
    value: Literal["True", "False"],
    problems: list[str],
    before: Condition | None,
    generation: int,
    now: datetime,
) -> Condition:
    """The condition naming a spec's problems, its transition time kept while they stay the same."""
    message = "; ".join(problems)
    same = before is not None and (before.reason, before.message) == ("InvalidSpec", message)
    return Condition(
        type=type_,
        status=value,
        reason="InvalidSpec",
        message=message,
        last_transition_time=before.last_transition_time if before is not None and same else now,
        observed_generation=generation,
    )
