"""kopf handlers: every trigger runs the same level-based pass, and a timer keeps status true.

Edge-triggered handlers (create, resume, spec update) only make the first reaction fast; the timer
alone would converge too, which is what makes a restarted operator or a missed event harmless.
The Kubernetes client and the runs' pinned keys live in kopf's memo, set in the startup handler, so
tests call these handlers with a fake client.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from fedtune import metrics
from fedtune.api import API_GROUP, API_VERSION, PLURAL, parse_resource
from fedtune.api.fedclient import FEDCLIENT_PLURAL
from fedtune.controller import silo
from fedtune.controller.identities import PinnedKeys
from fedtune.controller.kube import Kube, KubeClient
from fedtune.controller.reconcile import erase_storage
from fedtune.controller.step import resource_of, step

log = logging.getLogger("fedtune.operator")
RESOURCE = (API_GROUP, API_VERSION, PLURAL)
FEDCLIENTS = (API_GROUP, API_VERSION, FEDCLIENT_PLURAL)
TICK_SECONDS = float(os.environ.get("FEDTUNE_RECONCILE_SECONDS", "3"))


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
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
    memo.kube = KubeClient()
    memo.pinned_keys = PinnedKeys()
    memo.passes = Passes()
    metrics.serve(int(os.environ.get("FEDTUNE_METRICS_PORT", "0")), os.environ.get("FEDTUNE_METRICS_ADDRESS", ""))


class Passes:
    """One pass per run at a time. kopf runs a run's timer beside its create, resume and update handlers;
    two passes at once would both post the missing children and could each write status from the same
    stale start. A handler waits for a pass in flight; a tick skips, as the pass in flight does its work."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, threading.Lock] = {}

    @contextmanager
    def of(self, uid: str, wait: bool) -> Iterator[bool]:
        """Hold the run's lock for a pass; yields whether it was taken."""
        with self._guard:
            lock = self._locks.setdefault(uid, threading.Lock())
        taken = lock.acquire(blocking=wait)
        try:
            yield taken
        finally:
            if taken:
                lock.release()

    def forget(self, uid: str) -> None:
        with self._guard:
            self._locks.pop(uid, None)


def _context(memo: kopf.Memo) -> tuple[Kube, PinnedKeys]:
    """The client and the pinned keys the startup handler put in the memo (kopf gives each run a copy)."""
    return memo.kube, memo.pinned_keys


# kopf's default backoff after an unexpected error is 60 s; a failed step is simply retried on the next tick.
@kopf.on.resume(*RESOURCE, backoff=TICK_SECONDS)
@kopf.on.create(*RESOURCE, backoff=TICK_SECONDS)
@kopf.on.update(*RESOURCE, field="spec", backoff=TICK_SECONDS)
def react(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    with memo.passes.of(body["metadata"].get("uid", ""), wait=True):
        step(body, patch, *_context(memo))


@kopf.timer(*RESOURCE, interval=TICK_SECONDS, sharp=True, backoff=TICK_SECONDS)
def tick(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    _unless_busy(body, memo, lambda: step(body, patch, *_context(memo)))


def _unless_busy(body: kopf.Body, memo: kopf.Memo, one_pass: Callable[[], None]) -> None:
    """A timer's pass, skipped while another pass over the object is in flight; an object deleted meanwhile
    ends it quietly, any other API error retries it on the next tick."""
    try:
        with memo.passes.of(body["metadata"].get("uid", ""), wait=False) as taken:
            if taken:
                one_pass()
    except ApiException as e:
        if e.status == 404:
            return
        raise kopf.TemporaryError(f"API error {e.status}: {e.reason}", delay=TICK_SECONDS) from None


@kopf.on.resume(*FEDCLIENTS, backoff=TICK_SECONDS)
@kopf.on.create(*FEDCLIENTS, backoff=TICK_SECONDS)
@kopf.on.update(*FEDCLIENTS, field="spec", backoff=TICK_SECONDS)
def react_client(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    """A client in this cluster of a run coordinated elsewhere: the same level-based pass as a run's."""
    with memo.passes.of(body["metadata"].get("uid", ""), wait=True):
        silo.step(body, patch, _context(memo)[0])


@kopf.timer(*FEDCLIENTS, interval=TICK_SECONDS, sharp=True, backoff=TICK_SECONDS)
def tick_client(body: kopf.Body, patch: kopf.Patch, memo: kopf.Memo, **_: Any) -> None:
    _unless_busy(body, memo, lambda: silo.step(body, patch, _context(memo)[0]))


@kopf.on.delete(*FEDCLIENTS, optional=True)
def client_deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    memo.passes.forget(body["metadata"].get("uid", ""))


def _discard_storage(spec: kopf.Spec, **_: Any) -> bool:
    return not bool((spec.get("storage") or {}).get("keep", True))


@kopf.on.delete(*RESOURCE, when=_discard_storage)
def delete_storage(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Children go with the resource (ownerReferences); its storage only when the spec says so."""
    kube = _context(memo)[0]
    res = parse_resource(resource_of(body))
    removed = erase_storage(kube, res)
    log.info("deleted %d objects of %s/%s from storage", removed, res.metadata.namespace, res.metadata.name)


@kopf.on.delete(*RESOURCE, optional=True)
def deleted(body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
    """Drop what the operator kept about a run: its pinned keys and its metric series (a deleted failed run
    must not keep an alert firing)."""
    pinned_keys = _context(memo)[1]
    meta = body["metadata"]
    metrics.forget_run(meta["namespace"], meta["name"])
    pinned_keys.forget(meta.get("uid", ""))
    memo.passes.forget(meta.get("uid", ""))
