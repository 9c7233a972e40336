"""The few Kubernetes calls the operator makes (and RBAC grants), behind one interface.

Handlers find the client in kopf's memo (set up in the startup handler), so tests hand them a fake that keeps
objects in dicts and need no cluster.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import kopf
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from fedtune.api.spec import API_GROUP, API_VERSION, CREDENTIALS_LABEL, KIND, PLURAL
from fedtune.controller.builders import RUN_LABEL
from fedtune.controller.gang import FLAVORS, KUEUE_GROUP, KUEUE_VERSION, WORKLOADS
from fedtune.errors import FedtuneError

Obj = dict[str, Any]
KUEUE = (KUEUE_GROUP, KUEUE_VERSION)


class NotServed(FedtuneError):
    """The cluster does not serve a kind the run needs (Kueue's Workload where Kueue is not installed)."""


@dataclass(frozen=True)
class Credentials:
    """A labelled Secret's data, and the runs (uids) that own it: a run's generated keys are its own."""

    data: dict[str, str]
    runs: frozenset[str] = frozenset()


class Kube(Protocol):
    def create(self, manifest: Obj) -> bool:
        """Create the object unless one of its name exists; True if created. NotServed if its kind is not."""

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and its pods; one already gone is fine."""

    def delete_run(self, namespace: str, name: str) -> None:
        """Delete the FederatedFineTune itself."""

    def patch_job(self, namespace: str, name: str, patch: Obj) -> None:
        """Merge-patch a Job: suspend it (its pods go), or start it where Kueue placed it."""

    def workload(self, namespace: str, name: str) -> Obj | None:
        """A Kueue Workload; None if there is none of that name."""

    def resource_flavor(self, name: str) -> Obj | None:
        """A Kueue ResourceFlavor (cluster-scoped); None if there is none of that name."""

    def delete_workload(self, namespace: str, name: str) -> None:
        """Delete a Kueue Workload, giving its quota back; one already gone is fine."""

    def jobs(self, namespace: str, run: str) -> dict[str, Obj]:
        """The Jobs labelled with the run's name, by name."""

    def pods(self, namespace: str, run: str) -> list[Obj]:
        """The pods labelled with the run's name."""

    def credentials(self, namespace: str, only: str | None = None) -> dict[str, Credentials]:
        """The Secrets labelled for fedtune (or the one named `only`), by name.

        Selected by label on the server, so the operator never receives an unlabelled Secret's data.
        """

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        """A ConfigMap's data; None if there is none of that name."""

    def event(self, body: kopf.Body, warning: bool, reason: str, message: str) -> None:
        """Record an Event on the run."""


class KubeClient(Kube):
    """Kube over the kubernetes client; events go through kopf, which batches and retries them."""

    def __init__(self, api: k8s.ApiClient | None = None) -> None:
        self.api = api or k8s.ApiClient()
        self.core = k8s.CoreV1Api(self.api)
        self.batch = k8s.BatchV1Api(self.api)
        self.custom = k8s.CustomObjectsApi(self.api)

    def create(self, manifest: Obj) -> bool:
        ns = manifest["metadata"]["namespace"]
        kind = manifest["kind"]
        try:
            if kind == "Job":
                self.batch.create_namespaced_job(ns, manifest)
            elif kind == "ConfigMap":
                self.core.create_namespaced_config_map(ns, manifest)
            elif kind == "Service":
                self.core.create_namespaced_service(ns, manifest)
            elif kind == "Secret":
                self.core.create_namespaced_secret(ns, manifest)
            elif kind == "Workload":
                self.custom.create_namespaced_custom_object(*KUEUE, ns, WORKLOADS, manifest)
            else:
                raise FedtuneError(f"cannot create a {kind}")
        except ApiException as e:
            if e.status == 409:
                return False
            if e.status == 404:  # a create into an existing namespace: it is the kind that is missing
                raise NotServed(f"the cluster serves no {manifest['apiVersion']} {kind}: is it installed?") from e
            raise
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_run(self, namespace: str, name: str) -> None:
        self.custom.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name)

    def patch_job(self, namespace: str, name: str, patch: Obj) -> None:
        self.batch.patch_namespaced_job(name, namespace, patch)

    def workload(self, namespace: str, name: str) -> Obj | None:
        return _found(lambda: self.custom.get_namespaced_custom_object(*KUEUE, namespace, WORKLOADS, name))

    def resource_flavor(self, name: str) -> Obj | None:
        return _found(lambda: self.custom.get_cluster_custom_object(*KUEUE, FLAVORS, name))

    def delete_workload(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(*KUEUE, namespace, WORKLOADS, name)
        except ApiException as e:
            if e.status != 404:
                raise

    def jobs(self, namespace: str, run: str) -> dict[str, Obj]:
        found = self.batch.list_namespaced_job(namespace, label_selector=f"{RUN_LABEL}={run}", _preload_content=False)
        return {j["metadata"]["name"]: j for j in _items(found)}

    def pods(self, namespace: str, run: str) -> list[Obj]:
        found = self.core.list_namespaced_pod(namespace, label_selector=f"{RUN_LABEL}={run}", _preload_content=False)
        return _items(found)

    def credentials(self, namespace: str, only: str | None = None) -> dict[str, Credentials]:
        fields = f"metadata.name={only}" if only else None
        found = self.core.list_namespaced_secret(namespace, label_selector=CREDENTIALS_LABEL, field_selector=fields)
        return {
            s.metadata.name: Credentials(
                data={k: base64.b64decode(v).decode() for k, v in (s.data or {}).items()},
                runs=frozenset(o.uid for o in s.metadata.owner_references or [] if o.kind == KIND),
            )
            for s in found.items
        }

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        try:
            return dict(self.core.read_namespaced_config_map(name, namespace).data or {})
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def event(self, body: kopf.Body, warning: bool, reason: str, message: str) -> None:
        kopf.event(body, type="Warning" if warning else "Normal", reason=reason, message=message)


def _items(response: Any) -> list[Obj]:
    """A list's items as the API server's JSON: decoding them into the client's model objects and back
    would cost most of a pass's CPU for a run of many clients."""
    return list(json.loads(response.data)["items"])


def _found(read: Callable[[], Any]) -> Obj | None:
    """A custom object as a dict; None if it does not exist."""
    try:
        return dict(read())
    except ApiException as e:
        if e.status == 404:
            return None
        raise
