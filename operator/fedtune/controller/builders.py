"""Child objects of a FederatedFineTune: pure functions, resource in, manifests out.

Every child carries an ownerReference to the run, so deleting the run garbage-collects them, and a
fixed name, so creating them again (a restarted operator, a re-applied resource) changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from fedtune.api.spec import API_GROUP, API_VERSION, KIND, ClientSpec, FederatedFineTune, PlacementSpec
from fedtune.storage import join

Manifest = dict[str, Any]

METRICS_PORT = 9090
SPEC_MOUNT = "/etc/fedtune"
SPEC_FILE = "resource.json"
# Pods on a node that stops answering are evicted after this, not the default five minutes, so a
# client is rescheduled in its pool while the round is still open.
NOT_READY_TOLERATION_SECONDS = 30
RUN_LABEL = f"{API_GROUP}/run"
CLIENT_LABEL = f"{API_GROUP}/client"
COMPONENT_LABEL = "app.kubernetes.io/component"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def child_name(run: str, suffix: str) -> str:
    """`{run}-{suffix}`, shortened with a hash to fit the 63 characters a Job name may have."""
    name = f"{run}-{suffix}"
    if len(name) <= 63:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    return f"{name[:54]}-{digest}"


def aggregator_name(run: str) -> str:
    return child_name(run, "aggregator")


def client_job_name(run: str, client: str) -> str:
    return child_name(run, f"client-{client}")


def spec_config_map_name(run: str) -> str:
    return child_name(run, "spec")


def run_root(res: FederatedFineTune) -> str:
    """`{storage.uri}/{namespace}/{name}-{uid}`: a re-created resource of the same name starts afresh."""
    meta = res.metadata
    return f"{res.spec.storage.uri.rstrip('/')}/{join(meta.namespace, f'{meta.name}-{meta.uid}')}"


def labels(res: FederatedFineTune, component: str, client: str | None = None) -> dict[str, str]:
    out = {
        "app.kubernetes.io/name": "fedtune",
        "app.kubernetes.io/instance": res.metadata.name,
        "app.kubernetes.io/managed-by": "fedtune-operator",
        COMPONENT_LABEL: component,
        RUN_LABEL: res.metadata.name,
    }
    if client is not None:
        out[CLIENT_LABEL] = client
    queue = (res.metadata.model_extra or {}).get("labels", {}).get(QUEUE_LABEL)
    if queue:
        out[QUEUE_LABEL] = queue
    return out


def owner_reference(res: FederatedFineTune) -> Manifest:
    return {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "name": res.metadata.name,
        "uid": res.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _meta(res: FederatedFineTune, name: str, component: str, client: str | None = None) -> Manifest:
    return {
        "name": name,
        "namespace": res.metadata.namespace,
        "labels": labels(res, component, client),
        "ownerReferences": [owner_reference(res)],
    }


def _env(res: FederatedFineTune) -> list[Manifest]:
    storage = res.spec.storage
    env: list[Manifest] = [
        {"name": "FEDTUNE_RUN_ROOT", "value": run_root(res)},
        {"name": "FEDTUNE_RUN_NAME", "value": res.metadata.name},
        {"name": "FEDTUNE_NAMESPACE", "value": res.metadata.namespace},
        {"name": "FEDTUNE_METRICS_PORT", "value": str(METRICS_PORT)},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]
    if storage.endpoint:
        env.append({"name": "FEDTUNE_S3_ENDPOINT", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    return env


def _resources(p: PlacementSpec) -> Manifest:
    amounts: dict[str, str] = {"cpu": p.resources.cpu, "memory": p.resources.memory}
    if p.resources.gpus:
        amounts["nvidia.com/gpu"] = str(p.resources.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _tolerations(p: PlacementSpec) -> list[Manifest]:
    own = [t.model_dump(exclude_none=True) for t in p.tolerations]
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        own.append(
            {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": NOT_READY_TOLERATION_SECONDS}
        )
    return own


def _pod(res: FederatedFineTune, component: str, p: PlacementSpec, args: list[str], client: str | None) -> Manifest:
    """A pod template meeting the restricted Pod Security Standard."""
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}]
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}]
    if component == "aggregator":
        volumes.append({"name": "spec", "configMap": {"name": spec_config_map_name(res.metadata.name)}})
        mounts.append({"name": "spec", "mountPath": SPEC_MOUNT, "readOnly": True})
    pod: Manifest = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 65532,
            "runAsGroup": 65532,
            "fsGroup": 65532,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": component,
                "image": res.spec.image,
                "command": ["fedtune", component],
                "args": args,
                "env": _env(res),
                # The storage Secret's keys (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally
                # AWS_ENDPOINT_URL) become the environment boto3 reads; they are never copied elsewhere.
                **(
                    {"envFrom": [{"secretRef": {"name": res.spec.storage.secret_ref}}]}
                    if res.spec.storage.secret_ref
                    else {}
                ),
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                "resources": _resources(p),
                "volumeMounts": mounts,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
        "tolerations": _tolerations(p),
    }
    if p.node_selector:
        pod["nodeSelector"] = dict(p.node_selector)
    if p.affinity:
        pod["affinity"] = p.affinity
    return {"metadata": {"labels": labels(res, component, client)}, "spec": pod}


def _job(res: FederatedFineTune, name: str, component: str, template: Manifest, client: str | None) -> Manifest:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": _meta(res, name, component, client),
        "spec": {
            "backoffLimit": res.spec.backoff_limit,
            # A pod evicted from a failed node is not the program's fault: replace it without
            # spending the backoff budget.
            "podFailurePolicy": {
                "rules": [{"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
            },
            "template": template,
        },
    }


def aggregator_job(res: FederatedFineTune) -> Manifest:
    spec_path = f"{SPEC_MOUNT}/{SPEC_FILE}"
    template = _pod(res, "aggregator", res.spec.aggregator, ["--spec", spec_path], None)
    return _job(res, aggregator_name(res.metadata.name), "aggregator", template, None)


def client_job(res: FederatedFineTune, client: ClientSpec) -> Manifest:
    template = _pod(res, "client", client, ["--name", client.name], client.name)
    return _job(res, client_job_name(res.metadata.name, client.name), "client", template, client.name)


def spec_config_map(res: FederatedFineTune) -> Manifest:
    """The validated resource the aggregator publishes to storage as the run's spec.json."""
    doc = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": KIND,
        "metadata": {"name": res.metadata.name, "namespace": res.metadata.namespace},
        "spec": res.spec.model_dump(mode="json", by_alias=True),
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _meta(res, spec_config_map_name(res.metadata.name), "spec"),
        "data": {SPEC_FILE: json.dumps(doc, indent=2, sort_keys=True)},
    }


def metrics_service(res: FederatedFineTune) -> Manifest:
    # A Service name must start with a letter; a run name may start with a digit.
    run = res.metadata.name
    name = child_name(run if run[0].isalpha() else f"fft-{run}", "metrics")
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(res, name, "aggregator"),
        "spec": {
            "selector": {RUN_LABEL: res.metadata.name, COMPONENT_LABEL: "aggregator"},
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
        },
    }


def children(res: FederatedFineTune) -> list[Manifest]:
    """Everything a running (not suspended) run owns, in creation order."""
    return [
        spec_config_map(res),
        metrics_service(res),
        aggregator_job(res),
        *(client_job(res, c) for c in res.spec.clients),
    ]


def requested_gpus(res: FederatedFineTune) -> int:
    return res.spec.aggregator.resources.gpus + sum(c.resources.gpus for c in res.spec.clients)
