"""Child objects of a FederatedFineTune: pure functions, resource in, manifests out.

Every child carries an ownerReference to the run, so deleting the run garbage-collects them, and a
fixed name, so creating them again (a restarted operator, a re-applied resource) changes nothing.
"""

from __future__ import annotations

from typing import Any

from fedtune.api.spec import (
    API_GROUP,
    API_VERSION,
    CREDENTIALS_LABEL,
    KIND,
    ClientSpec,
    FederatedFineTune,
    ObjectMeta,
    PartySpec,
)
from fedtune.controller.names import (
    aggregator_name,
    client_job_name,
    key_secret_name,
    metrics_service_name,
    spec_config_map_name,
)
from fedtune.federation.run_config import KEYS_FILE, RESOURCE_FILE, resource_json
from fedtune.federation.signing import AGGREGATOR, KEY_FILE, Trust, client_party
from fedtune.storage import join
from fedtune.training.sources import MODEL_CACHE_ENV, MODEL_ROOT_ENV

Manifest = dict[str, Any]

METRICS_PORT = 9090
CONFIG_MOUNT = "/etc/fedtune"
KEY_MOUNT = "/etc/fedtune-key"
DATA_MOUNT = "/etc/fedtune-data"
MODEL_MOUNT = "/var/fedtune/model"
MODEL_CACHE_MOUNT = "/var/cache/fedtune-models"
# The one key of spec.model.tokenSecretRef (admission requires it) and the variable huggingface_hub reads.
TOKEN_KEY = "HF_TOKEN"
# Pods on a node that stops answering are evicted after this, not the default five minutes, so a
# client is rescheduled in its pool while the round is still open.
NOT_READY_TOLERATION_SECONDS = 30
RUN_LABEL = f"{API_GROUP}/run"
CLIENT_LABEL = f"{API_GROUP}/client"
COMPONENT_LABEL = "app.kubernetes.io/component"


def run_id(res: FederatedFineTune) -> str:
    """What every signature of the run is bound to: a record cannot move to another run."""
    return f"{res.metadata.namespace}/{res.metadata.name}/{res.metadata.uid}"


def storage_secret(res: FederatedFineTune, party: PartySpec) -> str | None:
    """A party's own storage credentials, or the run's default for a single-team run."""
    return party.secret_ref or res.spec.storage.secret_ref


def signing_secret(res: FederatedFineTune, party_name: str, party: PartySpec) -> str:
    return party.signing_key_secret_ref or key_secret_name(res.metadata.name, party_name)


def run_root(res: FederatedFineTune) -> str:
    """`{storage.uri}/{storage.runRoot}`, by default `{storage.uri}/{namespace}/{name}-{uid}`: a re-created
    resource of the same name starts afresh."""
    meta, storage = res.metadata, res.spec.storage
    return f"{storage.uri.rstrip('/')}/{storage.run_root or join(meta.namespace, f'{meta.name}-{meta.uid}')}"


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


def object_meta(res: FederatedFineTune, name: str, component: str, client: str | None = None) -> Manifest:
    """Name, namespace, the run's labels and the run as controlling owner."""
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
        {"name": "FEDTUNE_METRICS_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "FEDTUNE_CONFIG", "value": CONFIG_MOUNT},
        {"name": "FEDTUNE_SIGNING_KEY", "value": f"{KEY_MOUNT}/{KEY_FILE}"},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": "/tmp/hf"},
    ]
    if storage.endpoint:
        env.append({"name": "FEDTUNE_S3_ENDPOINT", "value": storage.endpoint})
    if storage.region:
        env.append({"name": "AWS_REGION", "value": storage.region})
    return env


def _resources(p: PartySpec) -> Manifest:
    amounts: dict[str, str] = {"cpu": p.resources.cpu, "memory": p.resources.memory}
    if p.resources.gpus:
        amounts["nvidia.com/gpu"] = str(p.resources.gpus)
    return {"requests": dict(amounts), "limits": dict(amounts)}


def _tolerations(p: PartySpec) -> list[Manifest]:
    own = [t.model_dump(exclude_none=True) for t in p.tolerations]
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
        own.append(
            {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": NOT_READY_TOLERATION_SECONDS}
        )
    return own


def _volume(name: str, source: Manifest, path: str) -> tuple[Manifest, Manifest]:
    return {"name": name, **source}, {"name": name, "mountPath": path, "readOnly": True}


def _model(res: FederatedFineTune) -> tuple[list[Manifest], list[Manifest], list[Manifest]]:
    """Env, volumes and mounts for spec.model: the hub token as HF_TOKEN alone, a model volume read-only, a
    writable cache for a uri model; a model not from the hub is read offline, so nothing is fetched."""
    m = res.spec.model
    env: list[Manifest] = []
    volumes: list[Manifest] = []
    mounts: list[Manifest] = []
    if m.name is None:
        env.append({"name": "HF_HUB_OFFLINE", "value": "1"})
    if m.token_secret_ref:
        ref = {"name": m.token_secret_ref, "key": TOKEN_KEY}
        env.append({"name": TOKEN_KEY, "valueFrom": {"secretKeyRef": ref}})
    if m.volume is not None:
        volume, mount = _volume("model", m.volume, MODEL_MOUNT)
        volumes.append(volume)
        mounts.append(mount)
        env.append({"name": MODEL_ROOT_ENV, "value": MODEL_MOUNT})
    if m.uri is not None:
        volumes.append({"name": "model-cache", **(m.cache or {"emptyDir": {}})})
        mounts.append({"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT})
        env.append({"name": MODEL_CACHE_ENV, "value": MODEL_CACHE_MOUNT})
    return env, volumes, mounts


def _pod(res: FederatedFineTune, party_name: str, party: PartySpec, args: list[str]) -> Manifest:
    """A pod template meeting the restricted Pod Security Standard, with this party's Secrets and no other's."""
    component = "aggregator" if party_name == AGGREGATOR else "client"
    client = party.name if isinstance(party, ClientSpec) else None
    env = _env(res)
    mounted = [
        _volume("config", {"configMap": {"name": spec_config_map_name(res.metadata.name)}}, CONFIG_MOUNT),
        _volume(
            "signing-key",
            {"secret": {"secretName": signing_secret(res, party_name, party), "defaultMode": 0o400}},
            KEY_MOUNT,
        ),
    ]
    if isinstance(party, ClientSpec) and party.data.secret_ref:
        mounted.append(_volume("data-credentials", {"secret": {"secretName": party.data.secret_ref}}, DATA_MOUNT))
        env.append({"name": "FEDTUNE_DATA_CREDENTIALS", "value": DATA_MOUNT})
    model_env, model_volumes, model_mounts = _model(res)
    env += model_env
    volumes: list[Manifest] = [{"name": "tmp", "emptyDir": {}}, *(v for v, _ in mounted), *model_volumes]
    mounts: list[Manifest] = [{"name": "tmp", "mountPath": "/tmp"}, *(m for _, m in mounted), *model_mounts]
    if party.resources.gpus > 1:  # the ranks of a multi-GPU client share tensors through /dev/shm (NCCL)
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory"}})
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    storage = storage_secret(res, party)
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
                "env": env,
                # This party's storage Secret (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, optionally
                # AWS_ENDPOINT_URL) becomes the environment boto3 reads; no other party's is mounted.
                **({"envFrom": [{"secretRef": {"name": storage}}]} if storage else {}),
                "ports": [{"name": "metrics", "containerPort": METRICS_PORT}],
                "resources": _resources(party),
                "volumeMounts": mounts,
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
        "tolerations": _tolerations(party),
    }
    if party.node_selector:
        pod["nodeSelector"] = dict(party.node_selector)
    if party.affinity:
        pod["affinity"] = party.affinity
    return {"metadata": {"labels": labels(res, component, client)}, "spec": pod}


def _job(res: FederatedFineTune, name: str, component: str, template: Manifest, client: str | None) -> Manifest:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": object_meta(res, name, component, client),
        "spec": {
            # A queued run's Jobs start only once Kueue admits the whole run (see gang).
            **({"suspend": True} if res.spec.queue_name else {}),
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
    template = _pod(res, AGGREGATOR, res.spec.aggregator, [])
    return _job(res, aggregator_name(res.metadata.name), "aggregator", template, None)


def client_job(res: FederatedFineTune, client: ClientSpec) -> Manifest:
    template = _pod(res, client_party(client.name), client, ["--name", client.name])
    return _job(res, client_job_name(res.metadata.name, client.name), "client", template, client.name)


def spec_config_map(res: FederatedFineTune, trust: Trust) -> Manifest:
    """What every pod reads at start: the validated resource and the run's pinned public keys."""
    meta = ObjectMeta(name=res.metadata.name, namespace=res.metadata.namespace, uid=res.metadata.uid)
    doc = FederatedFineTune(metadata=meta, spec=res.spec)
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(res, spec_config_map_name(res.metadata.name), "spec"),
        "data": {RESOURCE_FILE: resource_json(doc), KEYS_FILE: trust.to_json()},
    }


def key_secret(res: FederatedFineTune, party: str, private_pem: str) -> Manifest:
    """A signing key the operator generated for one party of this run; mounted into that party's pod only."""
    meta = object_meta(res, key_secret_name(res.metadata.name, party), "signing-key")
    meta["labels"][CREDENTIALS_LABEL] = "true"
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": meta,
        "type": "Opaque",
        "stringData": {KEY_FILE: private_pem},
    }


def metrics_service(res: FederatedFineTune) -> Manifest:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(res, metrics_service_name(res.metadata.name), "aggregator"),
        "spec": {
            "selector": {RUN_LABEL: res.metadata.name, COMPONENT_LABEL: "aggregator"},
            "ports": [{"name": "metrics", "port": METRICS_PORT, "targetPort": "metrics"}],
        },
    }


def children(res: FederatedFineTune, trust: Trust) -> list[Manifest]:
    """Everything a running (not suspended) run owns, in creation order (signing-key Secrets come before)."""
    return [
        spec_config_map(res, trust),
        metrics_service(res),
        aggregator_job(res),
        *(client_job(res, c) for c in res.spec.clients if not c.external),
    ]


def requested_gpus(res: FederatedFineTune) -> int:
    return res.spec.aggregator.resources.gpus + sum(c.resources.gpus for c in res.spec.clients if not c.external)
