"""kopf handlers: every trigger runs the same level-based reconcile, and a timer keeps status true.

Edge-triggered handlers (create, resume, spec update) only make the first reaction fast; the timer
alone would converge too, which is what makes a restarted operator or a missed event harmless.
"""

from __future__ import annotations

import contextlib
import logging
import os
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from fedtune import metrics
from fedtune.api import API_GROUP, API_VERSION, PLURAL, SpecError, parse_resource
from fedtune.controller import status as st
from fedtune.controller.reconcile import Kube, forget, forget_trust, reconcile

log = logging.getLogger("fedtune.operator")
RESOURCE = (API_GROUP, API_VERSION, PLURAL)
TICK_SECONDS = float(os.environ.get("FEDTUNE_RECONCILE_SECONDS", "3"))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = f"{API_GROUP}/finalizer"
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=API_GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=API_GROUP, key="last-handled-configuration"
    )
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    settings.posting.level = logging.INFO
    settings.execution.max_workers = 8
    # A run deleted by its own timer (ttlSecondsAfterFinished) waits for that timer to stop before its
    # finalizer goes; kopf re-checks a still-stopping timer after 60 s unless told otherwise.
    settings.background.instant_exit_timeout = 1.0
    settings.background.cancellation_polling = 1.0
    settings.peering.lifetime = int(os.environ.get("FEDTUNE_PEERING_LIFETIME", "60"))
    metrics.serve(int(os.environ.get("FEDTUNE_METRICS_PORT", "0")))


_kube: Kube | None = None


def kube() -> Kube:
    global _kube
    if _kube is None:
        _kube = Kube()
    return _kube


def _step(body: kopf.Body, patch: kopf.Patch) -> None:
    """Reconcile once and write status in one merge patch, only if it changed."""
    raw = _resource(body)
    old = dict(body.get("status") or {})
    meta = body["metadata"]
    try:
        res = parse_resource(raw, f"{meta['namespace']}/{meta['name']}")
    except SpecError as e:
        invalid = st.invalid_spec(old, e.problems, meta.get("generation"), datetime.now(UTC))
        if _differs(old, invalid):
            patch.status.update(invalid)
        return
    if old.get("state") in st.TERMINAL and _expired(res.spec.ttl_seconds_after_finished, old):
        kube().custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, meta["namespace"], PLURAL, meta["name"])
        return
    observed = reconcile(kube(), res, int(meta.get("generation") or 0), old)
    new = st.compute(observed)
    if _differs(old, new):
        patch.status.update(new)
    if new["state"] != old.get("state"):
        reason, message = st.message_of(new)
        event = kopf.warn if new["state"] == st.FAILED else kopf.info
        event(body, reason=reason or new["state"], message=message or new["state"])
    for state in (st.PENDING, st.RUNNING, st.SUCCEEDED, st.FAILED, st.SUSPENDED):
        metrics.RUN_CONDITION.labels(meta["namespace"], meta["name"], state).set(1 if new["state"] == state else 0)
    metrics.RUN_INFO.labels(
        meta["namespace"], meta["name"], res.spec.aggregation.strategy, str(len(res.spec.clients))
    ).set(1)


def _resource(body: kopf.Body) -> dict[str, Any]:
    return {
        "apiVersion": body["apiVersion"],
        "kind": body["kind"],
        "metadata": dict(body["metadata"]),
        "spec": dict(body["spec"]),
    }


def _expired(ttl: int | None, old: dict[str, Any]) -> bool:
    done = old.get("completionTime")
    if ttl is None or not done:
        return False
    return (datetime.now(UTC) - datetime.fromisoformat(done)).total_seconds() >= ttl


def _differs(old: dict[str, Any], new: dict[str, Any]) -> bool:
    return any(old.get(k) != v for k, v in new.items())


# kopf's default backoff after an unexpected error is 60 s; a failed step is simply retried on the next tick.
@kopf.on.resume(*RESOURCE, backoff=TICK_SECONDS)
@kopf.on.create(*RESOURCE, backoff=TICK_SECONDS)
@kopf.on.update(*RESOURCE, field="spec", backoff=TICK_SECONDS)
def react(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    _step(body, patch)


@kopf.timer(*RESOURCE, interval=TICK_SECONDS, sharp=True, backoff=TICK_SECONDS)
def tick(body: kopf.Body, patch: kopf.Patch, **_: Any) -> None:
    try:
        _step(body, patch)
    except ApiException as e:
        if e.status == 404:
            return
        raise kopf.TemporaryError(f"API error {e.status}: {e.reason}", delay=TICK_SECONDS) from None


def _discard_storage(spec: kopf.Spec, **_: Any) -> bool:
    return not bool((spec.get("storage") or {}).get("keep", True))


@kopf.on.delete(*RESOURCE, when=_discard_storage)
def delete_storage(body: kopf.Body, **_: Any) -> None:
    """Children go with the resource (ownerReferences); its storage only when the spec says so."""
    res = parse_resource(_resource(body))
    removed = forget(kube(), res)
    log.info("deleted %d objects of %s/%s from storage", removed, res.metadata.namespace, res.metadata.name)


@kopf.on.delete(*RESOURCE, optional=True)
def deleted(body: kopf.Body, **_: Any) -> None:
    """Drop what the operator kept about a run: its pinned keys and its metric series (a deleted failed run
    must not keep an alert firing)."""
    meta = body["metadata"]
    metrics.forget_run(meta["namespace"], meta["name"])
    with contextlib.suppress(SpecError):
        forget_trust(parse_resource(_resource(body)))
