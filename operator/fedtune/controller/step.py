"""One operator pass over a run, in three parts: decide what the pass does from the resource alone, act on
the cluster, then report what came of it (status in one merge patch, an Event, the run's metrics).

`decide` is pure; `act` is the only part that writes to the cluster; `report` writes status only when it
changed, so a pass over a run that did not move costs no write at all.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf

from fedtune import metrics
from fedtune.api import SpecError, parse_resource
from fedtune.api.spec import FederatedFineTune
from fedtune.api.status import TERMINAL, RunState, RunStatus, merged
from fedtune.controller.identities import PinnedKeys
from fedtune.controller.kube import Kube, Obj
from fedtune.controller.reconcile import reconcile
from fedtune.controller.status import compute, invalid_spec, message_of, settled


@dataclass(frozen=True)
class Invalid:
    """The spec fails its checks: say which, and touch nothing."""

    problems: list[str]


@dataclass(frozen=True)
class Expire:
    """The run finished ttlSecondsAfterFinished ago: delete it."""

    res: FederatedFineTune


@dataclass(frozen=True)
class Reconcile:
    """Make the run's children match its state, and observe them."""

    res: FederatedFineTune


Plan = Invalid | Expire | Reconcile


def resource_of(body: Mapping[str, Any]) -> Obj:
    """The resource as the spec model reads it: status and kopf's own fields left out."""
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": dict(body["metadata"]),
        "spec": dict(body["spec"]),
    }


def decide(resource: Obj, old: RunStatus, now: datetime) -> Plan:
    """What this pass does, from the resource and its stored status alone."""
    meta = resource["metadata"]
    try:
        res = parse_resource(resource, f"{meta['namespace']}/{meta['name']}")
    except SpecError as e:
        return Invalid(e.problems)
    ttl, done = res.spec.ttl_seconds_after_finished, old.completion_time
    if old.state in TERMINAL and ttl is not None and done is not None and (now - done).total_seconds() >= ttl:
        return Expire(res)
    return Reconcile(res)


def act(plan: Plan, kube: Kube, keys: PinnedKeys, generation: int, old: RunStatus, now: datetime) -> RunStatus | None:
    """Carry the plan out; the status the run should have now, or None when it is being deleted."""
    if isinstance(plan, Invalid):
        # A run that ended keeps its result; an edit that breaks its spec changes nothing it did.
        return old if settled(old) else invalid_spec(old, plan.problems, generation, now)
    if isinstance(plan, Expire):
        kube.delete_run(plan.res.metadata.namespace, plan.res.metadata.name)
        return None
    return compute(reconcile(kube, keys, plan.res, generation, old, now))


def report(body: kopf.Body, patch: kopf.Patch, kube: Kube, plan: Plan, old: RunStatus, new: RunStatus) -> None:
    """Status in one merge patch, written only when it would change what is stored; an Event when the state
    moved; the run's condition and info metrics."""
    stored = dict(body.get("status") or {})
    changes = new.patch()
    if merged(stored, changes) != stored:
        patch.status.update(changes)
    if new.state != old.state:
        reason, message = message_of(new)
        kube.event(body, new.state == RunState.FAILED, reason, message or reason)
    ns, name = body["metadata"]["namespace"], body["metadata"]["name"]
    for state in RunState:
        metrics.RUN_CONDITION.labels(ns, name, state).set(1 if new.state == state else 0)
    if isinstance(plan, Reconcile):
        spec = plan.res.spec
        metrics.RUN_INFO.labels(ns, name, spec.aggregation.strategy, str(len(spec.clients))).set(1)


def step(body: kopf.Body, patch: kopf.Patch, kube: Kube, keys: PinnedKeys, now: datetime | None = None) -> None:
    """One pass over the run in `body`: decide, act, report."""
    now = now or datetime.now(UTC)
    old = RunStatus.read(body.get("status"))
    plan = decide(resource_of(body), old, now)
    new = act(plan, kube, keys, int(body["metadata"].get("generation") or 0), old, now)
    if new is not None:
        report(body, patch, kube, plan, old, new)
