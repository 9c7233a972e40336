"""One level-based pass over a run: make its children match the spec, then observe what exists.

Called from every handler (create, resume, update, timer), so it must be idempotent: children are
created only if absent, and removed only when the spec says so (suspend) or the run has ended.
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from fedtune.api.spec import FederatedFineTune
from fedtune.controller import builders
from fedtune.controller.status import TERMINAL, Observed, Progress
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.storage import ObjectStore, open_store

log = logging.getLogger("fedtune.operator")

Obj = dict[str, Any]
# The operator only reads status from storage: a short retry keeps one slow bucket from stalling a tick.
STORAGE_RETRY_SECONDS = 5.0


class Kube:
    """The few API calls the operator makes (and RBAC grants)."""

    def __init__(self, api: k8s.ApiClient | None = None) -> None:
        self.api = api or k8s.ApiClient()
        self.core = k8s.CoreV1Api(self.api)
        self.batch = k8s.BatchV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    def create(self, manifest: Obj) -> bool:
        """Create the object unless one of its name exists; True if created."""
        ns = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        try:
            if kind == "Job":
                self.batch.create_namespaced_job(ns, manifest)
            elif kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, manifest)
            elif kind == "Service":
                self.core.create_namespaced_service(ns, manifest)
            else:
                raise FedtuneError(f"cannot create a {kind}")
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def jobs(self, namespace: str, run: str) -> dict[str, Obj]:
        found = self.batch.list_namespaced_job(namespace, label_selector=f"{builders.RUN_LABEL}={run}")
        return {j.metadata.name: self.api.sanitize_for_serialization(j) for j in found.items}

    def pods(self, namespace: str, run: str) -> list[Obj]:
        found = self.core.list_namespaced_pod(namespace, label_selector=f"{builders.RUN_LABEL}={run}")
        return [self.api.sanitize_for_serialization(pod) for pod in found.items]

    def secret(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            s = self.core.read_namespaced_secret(name, namespace)
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        return {k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()}


def run_store(res: FederatedFineTune, secret: dict[str, str] | None) -> ObjectStore:
    """The run's root in storage, reached with the credentials of the run's Secret."""
    storage = res.spec.storage
    creds = None
    if secret and "AWS_ACCESS_KEY_ID" in secret and "AWS_SECRET_ACCESS_KEY" in secret:
        creds = (secret["AWS_ACCESS_KEY_ID"], secret["AWS_SECRET_ACCESS_KEY"])
    endpoint = storage.endpoint or (secret or {}).get("AWS_ENDPOINT_URL")
    return open_store(
        builders.run_root(res),
        endpoint=endpoint,
        region=storage.region,
        credentials=creds,
        retry_seconds=STORAGE_RETRY_SECONDS,
    )


def read_progress(store: ObjectStore, hint: int | None = None) -> Progress:
    """The run's committed rounds, last summary and final summary; `hint`: rounds known committed."""
    committed = p.latest_global(store, hint)
    final = p.read_record(store, p.FINAL_SUMMARY, p.FinalSummary)
    last = p.read_record(store, p.summary(committed - 1), p.RoundSummary) if committed else None
    return Progress(committed=committed, final=final, last=last)


def forget(kube: Kube, res: FederatedFineTune) -> int:
    """Delete every object under the run's root (spec.storage.keep: false); returns how many."""
    secret = kube.secret(res.metadata.namespace, res.spec.storage.secret_ref) if res.spec.storage.secret_ref else None
    store = run_store(res, secret)
    keys = store.list()
    for key in keys:
        store.delete(key)
    return len(keys)


def reconcile(kube: Kube, res: FederatedFineTune, generation: int, old_status: Obj) -> Observed:
    """Ensure children for the spec's desired state and return the observations status is built from."""
    meta, spec = res.metadata, res.spec
    ns, name = meta.namespace, meta.name
    observed = Observed(resource=res, generation=generation, old=old_status)

    secret: dict[str, str] | None = None
    if spec.storage.secret_ref:
        secret = kube.secret(ns, spec.storage.secret_ref)
        if secret is None:
            observed.blocked = (
                "SecretNotFound",
                f"spec.storage.secretRef: Secret {ns}/{spec.storage.secret_ref} not found",
            )
        elif not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} <= set(secret):
            observed.blocked = (
                "SecretInvalid",
                f"spec.storage.secretRef: Secret {ns}/{spec.storage.secret_ref} needs keys "
                "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
            )

    try:
        observed.progress = read_progress(run_store(res, secret), old_status.get("completedRounds"))
    except FedtuneError as e:
        observed.storage_error = str(e)
    observed.jobs = kube.jobs(ns, name)
    if observed.storage_error and not observed.jobs and observed.blocked is None:
        # Pods that cannot reach their bucket would only crash-loop: wait for storage instead.
        observed.blocked = ("StorageUnreachable", observed.storage_error)

    finished = old_status.get("state") in TERMINAL or observed.progress.final is not None
    if spec.suspend or (finished and observed.progress.final is None):
        for job in (builders.aggregator_name(name), *(builders.client_job_name(name, c.name) for c in spec.clients)):
            kube.delete_job(ns, job)
    elif not finished and observed.blocked is None:
        for manifest in builders.children(res):
            if kube.create(manifest):
                log.info("created %s %s/%s", manifest["kind"], ns, manifest["metadata"]["name"])

    observed.jobs = kube.jobs(ns, name)
    observed.pods = kube.pods(ns, name)
    return observed
