"""Gang admission through Kueue: a run with spec.queueName is one Kueue Workload.

A run is useless in halves: an aggregator waiting for clients that wait for GPUs holds what it took. So the
operator does not let Kueue see the Jobs one by one (they carry no queue-name label); it creates one
Workload with a pod set for the aggregator and one per distinct client shape, and creates the Jobs
suspended. Kueue admits the Workload whole or not at all; the operator then starts every Job, and stops
them again if Kueue evicts it (rounds resume from storage, none lost). The Workload goes once the run has
ended, which gives its quota back. This is the custom-integration path Kueue documents for job kinds it
does not know.
"""

from __future__ import annotations

import json
from typing import Any

from fedtune.api.spec import ClientSpec, FederatedFineTune
from fedtune.controller import builders
from fedtune.controller.names import aggregator_name, client_job_name, workload_name

Manifest = dict[str, Any]

KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSION = "v1beta2"
WORKLOADS = "workloads"
FLAVORS = "resourceflavors"
# Kueue's limit on a Workload's pod sets.
MAX_POD_SETS = 8


def _shape(client: ClientSpec) -> str:
    """What Kueue reads of a pod to place it: requests, node selector, tolerations, affinity."""
    shape = client.model_dump(mode="json", include={"resources", "node_selector", "tolerations", "affinity"})
    return json.dumps(shape, sort_keys=True)


def client_groups(res: FederatedFineTune) -> list[list[ClientSpec]]:
    """The run's clients grouped by shape, in the order of their first member: one pod set each."""
    groups: dict[str, list[ClientSpec]] = {}
    for c in res.spec.clients:
        if not c.external:  # its pod runs in its owner's cluster, under that cluster's quota
            groups.setdefault(_shape(c), []).append(c)
    return list(groups.values())


def too_many_shapes(res: FederatedFineTune) -> str | None:
    """Why Kueue could not take the run as one Workload, or None."""
    sets = 1 + len(client_groups(res))
    if sets <= MAX_POD_SETS:
        return None
    return (
        f"spec.queueName: Kueue admits at most {MAX_POD_SETS} pod sets per workload; the aggregator and "
        f"{sets - 1} distinct client shapes (resources, nodeSelector, tolerations, affinity) make {sets}"
    )


def workload(res: FederatedFineTune) -> Manifest:
    """The run as one Kueue Workload: every pod it will run, admitted together."""
    pod_sets = [{"name": "aggregator", "count": 1, "template": builders.aggregator_job(res)["spec"]["template"]}]
    for i, group in enumerate(client_groups(res)):
        template = builders.client_job(res, group[0])["spec"]["template"]
        pod_sets.append({"name": f"clients-{i}", "count": len(group), "template": template})
    meta = builders.object_meta(res, workload_name(res.metadata.name), "workload")
    return {
        "apiVersion": f"{KUEUE_GROUP}/{KUEUE_VERSION}",
        "kind": "Workload",
        "metadata": meta,
        "spec": {"queueName": res.spec.queue_name, "podSets": pod_sets},
    }


def pod_sets_of_jobs(res: FederatedFineTune) -> dict[str, str]:
    """Job name -> the pod set of the Workload that admits it."""
    run = res.metadata.name
    out = {aggregator_name(run): "aggregator"}
    for i, group in enumerate(client_groups(res)):
        out.update({client_job_name(run, c.name): f"clients-{i}" for c in group})
    return out


def assigned_flavors(workload: Manifest) -> dict[str, list[str]]:
    """Pod set -> the ResourceFlavors Kueue admitted it on."""
    assignments = ((workload.get("status") or {}).get("admission") or {}).get("podSetAssignments") or []
    return {a["name"]: sorted(set((a.get("flavors") or {}).values())) for a in assignments}


def start_patch(job: Manifest, flavors: list[Manifest]) -> Manifest:
    """The patch that starts a Job on the nodes of the flavors Kueue assigned it (their node labels and
    tolerations added to its pods), as Kueue's own integrations do."""
    pod = job["spec"]["template"]["spec"]
    labels = {k: v for f in flavors for k, v in ((f.get("spec") or {}).get("nodeLabels") or {}).items()}
    tolerations = list(pod.get("tolerations") or [])
    for f in flavors:
        tolerations += [t for t in (f.get("spec") or {}).get("tolerations") or [] if t not in tolerations]
    template: Manifest = {}
    if labels:
        template["nodeSelector"] = {**(pod.get("nodeSelector") or {}), **labels}
    if len(tolerations) > len(pod.get("tolerations") or []):
        template["tolerations"] = tolerations
    patch: Manifest = {"spec": {"suspend": False}}
    if template:
        patch["spec"]["template"] = {"spec": template}
    return patch


def _condition(workload: Manifest, kind: str) -> Manifest:
    found = (c for c in (workload.get("status") or {}).get("conditions") or [] if c.get("type") == kind)
    return next(found, {})


def admission(res: FederatedFineTune, workload: Manifest | None) -> tuple[bool, str]:
    """(admitted, why not) from the Workload's conditions, in Kueue's own words where it gave any."""
    queue = res.spec.queue_name
    if workload is None:
        return False, f"waiting for the Kueue workload of LocalQueue {queue} to be created"
    # Kueue marks an evicted Workload Evicted and leaves it Admitted until its owner has stopped its pods.
    evicted = _condition(workload, "Evicted")
    if evicted.get("status") == "True":
        return False, f"evicted by Kueue: {evicted.get('message') or evicted.get('reason')}"
    if _condition(workload, "Admitted").get("status") == "True":
        return True, ""
    reserved = _condition(workload, "QuotaReserved")
    said = reserved.get("message") or _condition(workload, "Admitted").get("message")
    if said:
        return False, f"waiting for Kueue to admit the run as one gang (LocalQueue {queue}): {said}"
    return False, f"waiting for Kueue to admit the run as one gang (LocalQueue {queue})"
