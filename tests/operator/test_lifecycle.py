"""Suspend and resume, deadlines, TTL, deletion, and the conditions for what the schema cannot see."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
import yaml
from kubernetes.client.exceptions import ApiException

from fedtune.federation import protocol as p
from tests.operator.conftest import Operator, Runs, run_store, tiny_run, wait_until


def keygen_secret(name: str) -> tuple[dict[str, Any], str]:
    """A Secret manifest and public key as `fedtune keygen NAME` prints them."""
    out = subprocess.run([sys.executable, "-m", "fedtune", "keygen", name], capture_output=True, text=True, check=True)
    return yaml.safe_load(out.stdout), out.stderr.strip().removeprefix("publicKey: ")


pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def jobs_of(operator: Operator, run: str) -> list[str]:
    found = operator.cluster.batch().list_namespaced_job(operator.namespace, label_selector=f"fedtune.io/run={run}")
    return sorted(j.metadata.name for j in found.items if j.metadata.deletion_timestamp is None)


def test_suspend_removes_pods_and_resume_continues_from_the_last_round(
    operator: Operator, runs: Runs, tiny_data: str
) -> None:
    operator.start()
    # Rounds enough that the suspension lands long before the run could end by itself.
    runs.create(tiny_run("pausable", training={"localSteps": 12}, aggregation={"rounds": 12}))
    runs.wait("pausable", lambda s: s.get("completedRounds", 0) >= 1, 300, "a committed round")
    runs.patch("pausable", {"spec": {"suspend": True}})
    suspended = runs.wait_state("pausable", "Suspended", timeout=60)["status"]
    wait_until(lambda: not jobs_of(operator, "pausable"), 60, "jobs removed")
    store = run_store(operator.cluster, suspended)
    kept = {k: store.get(k) for k in store.list(p.COORDINATOR) if k.endswith("global.json")}
    assert kept

    runs.patch("pausable", {"spec": {"suspend": False}})
    done = runs.wait_state("pausable", "Succeeded", timeout=400)["status"]
    assert done["progress"] == "12/12"
    assert all(store.get(k) == v for k, v in kept.items()), "a committed round was redone"


def test_deadline_ttl_and_deletion(operator: Operator, runs: Runs, tiny_data: str) -> None:
    cluster, ns = operator.cluster, operator.namespace
    operator.start()
    runs.create(tiny_run("late", activeDeadlineSeconds=3, storage={"keep": False}))
    runs.create(tiny_run("brief", aggregation={"rounds": 1}, ttlSecondsAfterFinished=2))

    failed = runs.wait_state("late", "Failed", timeout=120)["status"]
    cond = next(c for c in failed["conditions"] if c["type"] == "Failed")
    assert cond["reason"] == "DeadlineExceeded"
    wait_until(lambda: not jobs_of(operator, "late"), 60, "jobs of the failed run removed")

    # Deleting the run removes its children (garbage collection of owned objects) and, with
    # storage.keep false, its objects in the bucket.
    store = run_store(cluster, failed)
    store.put("rounds/000000/global.json", b"{}")  # stands for what a longer run would have written
    runs.api.delete_namespaced_custom_object("fedtune.io", "v1alpha1", ns, "federatedfinetunes", "late")
    wait_until(
        lambda: not cluster.core().list_namespaced_config_map(ns, label_selector="fedtune.io/run=late").items,
        60,
        "children garbage-collected",
    )
    wait_until(lambda: not store.list(), 60, "storage of a keep: false run deleted")

    # A finished run with ttlSecondsAfterFinished disappears by itself; its storage is kept.
    done = runs.wait_state("brief", "Succeeded", timeout=300)["status"]

    def gone() -> bool:
        try:
            runs.get("brief")
        except ApiException as e:
            return e.status == 404
        return False

    wait_until(gone, 60, "the finished run deleted after its TTL")
    assert run_store(cluster, done).exists(p.FINAL_ADAPTER)


def test_what_the_schema_cannot_see_becomes_a_condition(operator: Operator, runs: Runs, tiny_data: str) -> None:
    operator.start(env={"FEDTUNE_ALLOWED_IMAGES": "ghcr.io/fedtune/trainer:*"})
    core, ns = operator.cluster.core(), operator.namespace
    runs.create(tiny_run("nosecret", storage={"secretRef": "not-there"}))
    # A Secret the run may not use: not labelled for fedtune (the operator never reads its data).
    creds = core.read_namespaced_secret("fedtune-s3", ns)
    core.create_namespaced_secret(ns, {"metadata": {"name": "unlabelled"}, "data": creds.data})
    runs.create(tiny_run("unlabelled", storage={"secretRef": "unlabelled"}))
    runs.create(tiny_run("wrongimage", image="registry.example/miner:1"))
    # A pinned public key that is not the half of the private key in its Secret.
    key, public = keygen_secret("aggregator-key")
    core.create_namespaced_secret(ns, key)
    _, other = keygen_secret("unused")
    runs.create(tiny_run("wrongkey", aggregator={"publicKey": other, "signingKeySecretRef": "aggregator-key"}))
    runs.create(tiny_run("rightkey", aggregator={"publicKey": public, "signingKeySecretRef": "aggregator-key"}))
    runs.create(tiny_run("nobucket", storage={"uri": "s3://no-such-bucket/runs"}))
    huge = tiny_run("toobig")
    huge["spec"]["clients"][2]["resources"]["gpus"] = 16
    runs.create(huge)

    def ready(name: str, reason: str) -> dict[str, object]:
        def check(s: dict[str, object]) -> bool:
            conds = s.get("conditions") or []
            return any(c["type"] == "Ready" and c["reason"] == reason for c in conds)  # type: ignore[index, union-attr]

        status = runs.wait(name, check, 120, f"{name} Ready reason {reason}")["status"]
        return next(c for c in status["conditions"] if c["type"] == "Ready")

    assert "Secret" in str(ready("nosecret", "SecretNotFound")["message"])
    assert jobs_of(operator, "nosecret") == []
    message = str(ready("unlabelled", "SecretNotFound")["message"])
    assert message.startswith("spec.storage.secretRef: ") and "not labelled fedtune.io/credentials" in message
    message = str(ready("wrongimage", "ImageNotAllowed")["message"])
    assert message.startswith("spec.image: registry.example/miner:1 is not among") and "trainer:*" in message
    message = str(ready("wrongkey", "KeyMismatch")["message"])
    assert message.startswith("spec.aggregator.publicKey: ") and "does not match the private key" in message
    assert all(jobs_of(operator, n) == [] for n in ("unlabelled", "wrongimage", "wrongkey"))
    # The matching pair starts, and mounts the party's own Secret, not a generated one.
    runs.wait_state("rightkey", "Running", timeout=120)
    volumes = operator.cluster.batch().read_namespaced_job("rightkey-aggregator", ns).spec.template.spec.volumes
    assert "aggregator-key" in {v.secret.secret_name for v in volumes if v.secret}
    assert "no-such-bucket" in str(ready("nobucket", "StorageUnreachable")["message"])
    assert jobs_of(operator, "nobucket") == []
    assert "nvidia.com/gpu" in str(ready("toobig", "Unschedulable")["message"])
    assert runs.get("nosecret")["status"]["state"] == "Pending"

    # Once the Secret exists the run starts by itself.
    operator.cluster.put_s3_secret(operator.namespace, "not-there")
    runs.wait_state("nosecret", "Running", timeout=120)
