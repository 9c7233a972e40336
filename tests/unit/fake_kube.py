"""Kube in dicts, for the controller's tests without a cluster: objects by (kind, name), Secrets as the
operator reads them, every write and Event recorded."""

from __future__ import annotations

import copy
from typing import Any

import kopf

from fedtune.controller.builders import RUN_LABEL
from fedtune.controller.kube import Credentials

Obj = dict[str, Any]
STORAGE = {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}


def storage_secrets(*names: str) -> dict[str, Credentials]:
    """Labelled storage Secrets of those names, as a run's parties reference them."""
    return {name: Credentials(dict(STORAGE)) for name in names}


class FakeKube:
    """Create-if-absent by (kind, name), listings by the run label, pods as the test sets them."""

    def __init__(self, secrets: dict[str, Credentials] | None = None) -> None:
        self.objects: dict[tuple[str, str], Obj] = {}
        self.secrets = dict(secrets or {})
        self.pod_list: list[Obj] = []
        self.created: list[str] = []
        self.refused: list[str] = []  # creates answered "already exists" (409 on a real API server)
        self.deleted: list[str] = []
        self.suspended: list[tuple[str, bool]] = []  # (Job, suspend) as patched
        self.events: list[tuple[str, str, str]] = []
        self.config_map_reads = 0

    def create(self, manifest: Obj) -> bool:
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        if (kind, name) in self.objects or (kind == "Secret" and name in self.secrets):
            self.refused.append(f"{kind}/{name}")
            return False
        self.objects[kind, name] = manifest
        if kind == "Secret":
            owners = frozenset(o["uid"] for o in manifest["metadata"]["ownerReferences"])
            self.secrets[name] = Credentials(dict(manifest["stringData"]), owners)
        self.created.append(f"{kind}/{name}")
        return True

    def delete_job(self, namespace: str, name: str) -> None:
        self.objects.pop(("Job", name), None)
        self.deleted.append(f"Job/{name}")

    def delete_run(self, namespace: str, name: str) -> None:
        self.deleted.append(f"FederatedFineTune/{name}")

    def patch_job(self, namespace: str, name: str, patch: Obj) -> None:
        job = self.objects["Job", name]
        job["spec"]["suspend"] = patch["spec"]["suspend"]
        job["spec"]["template"]["spec"].update((patch["spec"].get("template") or {}).get("spec") or {})
        self.suspended.append((name, patch["spec"]["suspend"]))

    def workload(self, namespace: str, name: str) -> Obj | None:
        found = self.objects.get(("Workload", name))
        return copy.deepcopy(found) if found else None

    def resource_flavor(self, name: str) -> Obj | None:
        return self.objects.get(("ResourceFlavor", name))

    def delete_workload(self, namespace: str, name: str) -> None:
        if self.objects.pop(("Workload", name), None) is not None:
            self.deleted.append(f"Workload/{name}")

    def jobs(self, namespace: str, run: str) -> dict[str, Obj]:
        return {
            name: copy.deepcopy(job)
            for (kind, name), job in self.objects.items()
            if kind == "Job" and job["metadata"]["labels"].get(RUN_LABEL) == run
        }

    def pods(self, namespace: str, run: str) -> list[Obj]:
        return list(self.pod_list)

    def credentials(self, namespace: str, only: str | None = None) -> dict[str, Credentials]:
        return {k: v for k, v in self.secrets.items() if only is None or k == only}

    def config_map(self, namespace: str, name: str) -> dict[str, str] | None:
        self.config_map_reads += 1
        found = self.objects.get(("ConfigMap", name))
        return dict(found["data"]) if found else None

    def event(self, body: kopf.Body, warning: bool, reason: str, message: str) -> None:
        self.events.append(("Warning" if warning else "Normal", reason, message))
