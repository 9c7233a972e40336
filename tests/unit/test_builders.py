"""Child objects of a run: names that fit, ownership, restricted pods, placement, secrets, queues."""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Iterator
from typing import Any

from fedtune.api import parse_resource
from fedtune.controller import builders, names
from tests.unit.runs import TRUST, UID, run

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def jobs(res: Any) -> list[dict[str, Any]]:
    return [m for m in builders.children(res, TRUST) if m["kind"] == "Job"]


def containers(res: Any) -> Iterator[dict[str, Any]]:
    for job in jobs(res):
        yield from job["spec"]["template"]["spec"]["containers"]


def client_job(res: Any, client: str) -> dict[str, Any]:
    return builders.client_job(res, res.spec.client(client))


def test_short_names_are_kept_as_they_are() -> None:
    res = run()
    made = [m["metadata"]["name"] for m in builders.children(res, TRUST)]
    assert made == [
        "quickstart-spec",
        "quickstart-metrics",
        "quickstart-aggregator",
        "quickstart-client-clinic",
        "quickstart-client-bank",
        "quickstart-client-devops",
    ]


def test_long_names_are_hashed_to_63_characters_and_stay_distinct() -> None:
    """A 63-character run with 40-character clients still yields valid, unique, stable Job names."""
    long_run = "r" * 63
    clients = [{"name": "c" * 39 + s, "data": {"uri": f"s3://fedtune/{s}.jsonl"}} for s in "ab"]
    res = run(name=long_run, clients=clients)
    made = [m["metadata"]["name"] for m in builders.children(res, TRUST)]
    assert all(len(n) <= 63 and DNS_LABEL.match(n) for n in made), made
    assert len(set(made)) == len(made)
    assert made == [m["metadata"]["name"] for m in builders.children(run(name=long_run, clients=clients), TRUST)]
    assert names.child_name(long_run, "client", "x") != names.child_name(long_run, "client", "y")


def test_every_child_is_owned_by_the_run_and_labelled() -> None:
    res = run()
    for m in builders.children(res, TRUST):
        meta = m["metadata"]
        assert meta["namespace"] == "team-a"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": "fedtune.io/v1alpha1",
                "kind": "FederatedFineTune",
                "name": "quickstart",
                "uid": UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][builders.RUN_LABEL] == "quickstart"
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "fedtune-operator"
    bank = client_job(res, "bank")
    assert bank["metadata"]["labels"][builders.CLIENT_LABEL] == "bank"
    assert bank["spec"]["template"]["metadata"]["labels"] == bank["metadata"]["labels"]
    assert builders.CLIENT_LABEL not in builders.aggregator_job(res)["metadata"]["labels"]


def test_pods_meet_the_restricted_pod_security_standard() -> None:
    for job in jobs(run()):
        pod = job["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert not any(pod.get(k) for k in ("hostNetwork", "hostPID", "hostIPC"))
        assert all(set(v) - {"name"} <= {"emptyDir", "configMap", "secret"} for v in pod["volumes"]), pod["volumes"]
        assert pod["automountServiceAccountToken"] is False
        for c in pod["containers"]:
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
            assert sc["readOnlyRootFilesystem"] is True
            assert not sc.get("privileged")
            assert not any("hostPort" in p for p in c.get("ports", []))


def test_gpus_are_requested_and_limited_equally() -> None:
    clients = [
        {"name": "big", "data": {"uri": "s3://b/x.jsonl"}, "resources": {"gpus": 4, "cpu": "8", "memory": "64Gi"}},
        {"name": "cpu", "data": {"uri": "s3://b/y.jsonl"}},
    ]
    res = run(clients=clients, aggregation={"minClients": 1})
    big = client_job(res, "big")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert big["limits"] == big["requests"] == {"cpu": "8", "memory": "64Gi", "nvidia.com/gpu": "4"}
    cpu = client_job(res, "cpu")["spec"]["template"]["spec"]["containers"][0]["resources"]
    assert "nvidia.com/gpu" not in cpu["limits"] and "nvidia.com/gpu" not in cpu["requests"]
    assert builders.requested_gpus(res) == 4
    # The ranks of a multi-GPU client need more shared memory than a container's default 64 MiB.
    shm = [v for v in client_job(res, "big")["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm == [{"name": "dshm", "emptyDir": {"medium": "Memory"}}]
    assert all(v["name"] != "dshm" for v in client_job(res, "cpu")["spec"]["template"]["spec"]["volumes"])


def test_node_selector_tolerations_and_affinity_are_passed_through() -> None:
    affinity = {
        "nodeAffinity": {
            "requiredDuringSchedulingIgnoredDuringExecution": {
                "nodeSelectorTerms": [
                    {"matchExpressions": [{"key": "gpu.model", "operator": "In", "values": ["a100", "h100"]}]}
                ]
            }
        }
    }
    clients = [
        {
            "name": "clinic",
            "data": {"uri": "s3://b/c.jsonl"},
            "nodeSelector": {"fedtune.io/pool": "gpu-a100", "zone": "eu-1"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "affinity": affinity,
        }
    ]
    pod = client_job(run(clients=clients, aggregation={"minClients": 1}), "clinic")["spec"]["template"]["spec"]
    assert pod["nodeSelector"] == {"fedtune.io/pool": "gpu-a100", "zone": "eu-1"}
    assert pod["affinity"] == affinity
    assert pod["tolerations"][0] == {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    # Pods leave a dead node quickly so the client is rescheduled within the round.
    evict = {t["key"]: t for t in pod["tolerations"][1:]}
    assert set(evict) == {"node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"}
    assert all(t["tolerationSeconds"] == builders.NOT_READY_TOLERATION_SECONDS for t in evict.values())

    bare = builders.aggregator_job(run(aggregator={}))["spec"]["template"]["spec"]
    assert "nodeSelector" not in bare and "affinity" not in bare


def _secrets_of(job: dict[str, Any]) -> set[str]:
    """Every Secret a pod can see: through envFrom, env valueFrom or a volume."""
    pod = job["spec"]["template"]["spec"]
    found = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    for c in pod["containers"]:
        found |= {e["secretRef"]["name"] for e in c.get("envFrom", [])}
        found |= {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    return found


def test_each_pod_sees_only_its_own_partys_secrets() -> None:
    parties = {
        "clients": [
            {
                "name": name,
                "data": {"uri": f"s3://{name}/d.jsonl", "secretRef": f"{name}-data"},
                "secretRef": f"{name}-s3",
            }
            for name in ("clinic", "bank")
        ]
        + [{"name": "devops", "data": {"uri": "s3://b/d.jsonl"}}],
        "aggregator": {"secretRef": "coordinator-s3"},
    }
    res = run(storage={"uri": "s3://fedtune/runs", "secretRef": "fedtune-s3"}, **parties)
    key = names.key_secret_name
    assert _secrets_of(builders.aggregator_job(res)) == {"coordinator-s3", key("quickstart", "aggregator")}
    assert _secrets_of(client_job(res, "clinic")) == {"clinic-s3", "clinic-data", key("quickstart", "client clinic")}
    assert _secrets_of(client_job(res, "bank")) == {"bank-s3", "bank-data", key("quickstart", "client bank")}
    # A client without its own Secret falls back to the run's default (a single-team run).
    assert _secrets_of(client_job(res, "devops")) == {"fedtune-s3", key("quickstart", "client devops")}
    for job in jobs(res):
        env = job["spec"]["template"]["spec"]["containers"][0]["env"]
        assert not any(e["name"].startswith("AWS_ACCESS") for e in env)


def test_a_party_with_its_own_key_mounts_that_secret() -> None:
    public = "ed25519:" + "A" * 43 + "="
    res = run(aggregator={"publicKey": public, "signingKeySecretRef": "agg-key"})
    assert "agg-key" in _secrets_of(builders.aggregator_job(res))
    assert names.key_secret_name("quickstart", "aggregator") not in _secrets_of(builders.aggregator_job(res))
    no_secret = run(
        storage={"uri": "s3://fedtune/runs"},
        aggregator={},
        aggregation={"minClients": 1},
        clients=[{"name": "a", "data": {"uri": "x"}}],
    )
    assert all("envFrom" not in c for c in containers(no_secret))


def test_config_map_carries_the_resource_and_pinned_keys_into_every_pod() -> None:
    from fedtune.federation.run_config import KEYS_FILE, RESOURCE_FILE
    from fedtune.federation.signing import Trust

    res = run()
    cm = builders.spec_config_map(res, TRUST)
    assert parse_resource(json.loads(cm["data"][RESOURCE_FILE])).spec == res.spec
    assert Trust.from_json(cm["data"][KEYS_FILE], "keys") == TRUST
    for job in jobs(res):
        pod = job["spec"]["template"]["spec"]
        assert {"name": "config", "configMap": {"name": cm["metadata"]["name"]}} in pod["volumes"]
        env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
        assert env["FEDTUNE_CONFIG"] == builders.CONFIG_MOUNT
        assert env["FEDTUNE_SIGNING_KEY"].startswith(builders.KEY_MOUNT + "/")


def test_metrics_service_selects_the_aggregator_pod_only() -> None:
    res = run()
    selector = builders.metrics_service(res)["spec"]["selector"].items()
    assert selector <= builders.aggregator_job(res)["spec"]["template"]["metadata"]["labels"].items()
    assert not selector <= client_job(res, "bank")["spec"]["template"]["metadata"]["labels"].items()


def test_pods_find_their_run_in_storage() -> None:
    res = run()
    env = {e["name"]: e.get("value") for e in next(containers(res))["env"]}
    assert env["FEDTUNE_RUN_ROOT"] == f"s3://fedtune/runs/team-a/quickstart-{UID}"
    assert env["FEDTUNE_NAMESPACE"] == "team-a"
    assert client_job(res, "devops")["spec"]["template"]["spec"]["containers"][0]["args"] == ["--name", "devops"]


def test_metrics_service_name_starts_with_a_letter() -> None:
    doc = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedFineTune",
        "metadata": {"name": "7b-run", "namespace": "ns", "uid": "u"},
        "spec": {"model": {"name": "m"}, "clients": [{"name": "a", "data": {"uri": "s3://b/a.jsonl"}}]},
    }
    name = builders.metrics_service(parse_resource(doc))["metadata"]["name"]
    assert name.startswith("fft-7b-run-metrics--") and DNS_LABEL.match(name) and len(name) <= 63
    # Not the name of the run called fft-7b-run.
    assert name != names.metrics_service_name("fft-7b-run") == "fft-7b-run-metrics"


def one_client(name: str, client: str) -> Any:
    return run(name=name, clients=[{"name": client, "data": {"uri": "s3://b/d.jsonl"}}], aggregation={"minClients": 1})


def test_two_runs_never_share_a_job_name() -> None:
    """`a` with client `b-client-c` and `a-client-b` with client `c` would both own a-client-b-client-c."""
    first = {m["metadata"]["name"] for m in jobs(one_client("a", "b-client-c"))}
    second = {m["metadata"]["name"] for m in jobs(one_client("a-client-b", "c"))}
    assert "a-client-b-client-c" in first and "a-aggregator" in first
    assert not first & second, (first, second)
    assert all(DNS_LABEL.match(n) and len(n) <= 63 for n in first | second)


def test_child_names_are_unambiguous_across_runs() -> None:
    """Every run, role and member built from words the names are parsed by gets a name of its own."""
    words = ["a", "b", "client", "key", "aggregator", "spec", "metrics", "x-client", "client-y", "a--b"]
    parts = ["-".join(p) for n in (1, 2, 3) for p in itertools.product(words, repeat=n)]
    made: dict[str, tuple[str, str, str | None]] = {}
    for run_name in parts:
        for role, member in [("aggregator", None), ("spec", None), *(("client", m) for m in words)]:
            name = names.child_name(run_name, role, member)
            assert DNS_LABEL.match(name) and len(name) <= 63, name
            assert made.setdefault(name, (run_name, role, member)) == (run_name, role, member), name


def _env(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}


def _mounted(job: dict[str, Any], volume: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """A volume of the pod and its mount in the container."""
    pod = job["spec"]["template"]["spec"]
    mounts = {m["name"]: m for m in pod["containers"][0]["volumeMounts"]}
    return {v["name"]: v for v in pod["volumes"]}[volume], mounts[volume]


def test_a_hub_token_reaches_every_pod_as_hf_token_alone() -> None:
    res = run(model={"name": "meta-llama/Llama-3.2-1B", "tokenSecretRef": "hf"})
    bare = run()
    for job, without in zip(jobs(res), jobs(bare), strict=True):
        env = _env(job)
        assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "HF_TOKEN"}}}
        # The token Secret is the one Secret the model adds, and only its HF_TOKEN key is read.
        assert _secrets_of(job) - _secrets_of(without) == {"hf"}
        assert all(
            e.get("secretRef", {}).get("name") != "hf"
            for e in job["spec"]["template"]["spec"]["containers"][0].get("envFrom", [])
        )
        assert "HF_HUB_OFFLINE" not in env


def test_a_model_volume_is_mounted_read_only_and_read_offline() -> None:
    claim = {"persistentVolumeClaim": {"claimName": "models"}}
    res = run(model={"path": "llama/1b", "volume": claim})
    for job in jobs(res):
        volume, mount = _mounted(job, "model")
        assert volume == {"name": "model", **claim}
        assert mount == {"name": "model", "mountPath": builders.MODEL_MOUNT, "readOnly": True}
        env = _env(job)
        assert env["FEDTUNE_MODEL_ROOT"]["value"] == builders.MODEL_MOUNT
        assert env["HF_HUB_OFFLINE"]["value"] == "1"
        assert "HF_TOKEN" not in env and "FEDTUNE_MODEL_CACHE" not in env


PIN = "0" * 64


def test_a_uri_model_gets_a_writable_cache_volume() -> None:
    default = run(model={"uri": "s3://fedtune/models/llama/", "sha256": PIN})
    shared = run(
        model={"uri": "s3://fedtune/models/llama/", "sha256": PIN, "cache": {"hostPath": {"path": "/var/models"}}}
    )
    for res, source in ((default, {"emptyDir": {}}), (shared, {"hostPath": {"path": "/var/models"}})):
        for job in jobs(res):
            volume, mount = _mounted(job, "model-cache")
            assert volume == {"name": "model-cache", **source}
            assert mount == {"name": "model-cache", "mountPath": builders.MODEL_CACHE_MOUNT}
            env = _env(job)
            assert env["FEDTUNE_MODEL_CACHE"]["value"] == builders.MODEL_CACHE_MOUNT
            assert env["HF_HUB_OFFLINE"]["value"] == "1"
            assert "FEDTUNE_MODEL_ROOT" not in env


def test_a_model_built_from_config_is_offline_with_no_model_volume() -> None:
    for job in jobs(run()):
        assert _env(job)["HF_HUB_OFFLINE"]["value"] == "1"
        volumes = {v["name"] for v in job["spec"]["template"]["spec"]["volumes"]}
        assert not volumes & {"model", "model-cache"}
