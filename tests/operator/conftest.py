"""Operator tests: the CRDs installed once, an operator process per test, helpers to wait on runs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from fedtune.api import API_GROUP, API_VERSION, PLURAL
from tests.cluster.harness.cluster import BUCKET, Cluster

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Cluster:
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    done = cluster.kubectl(
        "wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"), check=False
    )
    assert done.returncode == 0, f"CRDs not established: {done.stderr}"
    return cluster


@pytest.fixture(scope="session")
def example_data(cluster: Cluster) -> str:
    """The quickstart's data in the test bucket, where examples/cluster/quickstart.yaml expects it."""
    assert cluster.s3 is not None
    s3 = cluster.s3.client()
    s3.head_bucket(Bucket=BUCKET)
    for f in sorted((REPO / "examples" / "data").glob("*.jsonl")):
        s3.put_object(Bucket=BUCKET, Key=f"data/{f.name}", Body=f.read_bytes())
    return BUCKET


class Operator:
    """`fedtune operator` as a process, the way its pod runs it."""

    def __init__(self, cluster: Cluster, namespace: str, log: Path) -> None:
        self.cluster, self.namespace, self.log = cluster, namespace, log
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            **(env or {}),
            "KUBECONFIG": str(self.cluster.kubeconfig),
            "FEDTUNE_LOG_LEVEL": os.environ.get("FEDTUNE_LOG_LEVEL", "INFO"),
        }
        args = extra or ("--standalone",)
        with self.log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "fedtune", "operator", "-n", self.namespace, *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
            )
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@pytest.fixture
def operator(crds: Cluster, namespace: str, tmp_path: Path) -> Iterator[Operator]:
    op = Operator(crds, namespace, tmp_path / "operator.log")
    try:
        yield op
    finally:
        op.stop()
        if op.log.exists():  # shown by pytest only when the test fails
            print("operator log, last lines:", *op.log.read_text(errors="replace").splitlines()[-60:], sep="\n")


class Runs:
    """FederatedFineTune objects in one namespace."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.cluster, self.namespace = cluster, namespace
        self.api = client.CustomObjectsApi(cluster.api_client())

    def create(self, doc: dict[str, Any]) -> dict[str, Any]:
        body: dict[str, Any] = self.api.create_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL, doc
        )
        return body

    def get(self, name: str) -> dict[str, Any]:
        body: dict[str, Any] = self.api.get_namespaced_custom_object(
            API_GROUP, API_VERSION, self.namespace, PLURAL, name
        )
        return body

    def patch(self, name: str, patch: dict[str, Any]) -> None:
        self.api.patch_namespaced_custom_object(API_GROUP, API_VERSION, self.namespace, PLURAL, name, patch)

    def wait(self, name: str, check: Callable[[dict[str, Any]], bool], timeout: float, what: str) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        last: dict[str, Any] = {}
        while time.monotonic() < deadline:
            last = self.get(name)
            if check(last.get("status") or {}):
                return last
            time.sleep(0.5)
        raise AssertionError(f"timed out waiting for {what}; status: {yaml.safe_dump(last.get('status'))}")

    def wait_state(self, name: str, state: str, timeout: float = 400) -> dict[str, Any]:
        return self.wait(name, lambda s: s.get("state") == state, timeout, f"{name} to be {state}")


@pytest.fixture
def runs(crds: Cluster, namespace: str) -> Runs:
    return Runs(crds, namespace)


def quickstart(**spec_overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((REPO / "examples" / "cluster" / "quickstart.yaml").read_text())
    for key, value in spec_overrides.items():
        if isinstance(value, dict) and isinstance(doc["spec"].get(key), dict):
            doc["spec"][key] = {**doc["spec"][key], **value}
        else:
            doc["spec"][key] = value
    return doc


@pytest.fixture(scope="session")
def tiny_data(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny federation's data in the test bucket under tiny/."""
    from tests.federation.conftest import write_data

    assert cluster.s3 is not None
    folder = tmp_path_factory.mktemp("tiny-data")
    write_data(folder)
    s3 = cluster.s3.client()
    for f in sorted(folder.glob("*.jsonl")):
        s3.put_object(Bucket=BUCKET, Key=f"tiny/{f.name}", Body=f.read_bytes())
    return BUCKET


GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
POOLS = {"alpha": "gpu-a100", "beta": "gpu-a100", "gamma": "gpu-h100"}


def tiny_run(name: str, **overrides: Any) -> dict[str, Any]:
    """The tiny federation as a resource: clients on two GPU pools, rounds in the test bucket."""
    from tests.federation.conftest import tiny_resource

    doc = tiny_resource(Path("/unused"), **overrides)
    doc["metadata"]["name"] = name
    spec = doc["spec"]
    spec["storage"] = {"uri": f"s3://{BUCKET}/runs", "secretRef": "fedtune-s3", **overrides.get("storage", {})}
    spec.setdefault("backoffLimit", 2)
    spec["aggregator"] = {
        "nodeSelector": {"fedtune.io/pool": "cpu"},
        "resources": {"cpu": "1", "memory": "2Gi"},
        **overrides.get("aggregator", {}),
    }
    if "clients" not in overrides:
        spec["clients"] = [
            {
                "name": client,
                "data": {"uri": f"s3://{BUCKET}/tiny/{client}.jsonl"},
                "nodeSelector": {"fedtune.io/pool": pool},
                "tolerations": [GPU_TOLERATION],
                "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
            }
            for client, pool in POOLS.items()
        ]
    return doc


def run_store(cluster: Cluster, status: dict[str, Any]) -> Any:
    """The run's root in the test bucket, read as the operator reads it."""
    from fedtune.storage import open_store

    assert cluster.s3 is not None
    return open_store(
        status["runRoot"], endpoint=cluster.s3.endpoint, credentials=(cluster.s3.access_key, cluster.s3.secret_key)
    )


def run_ledger(cluster: Cluster, namespace: str, name: str, status: dict[str, Any]) -> Any:
    """The run's records, verified with the keys its pods were given (the spec ConfigMap's keys.json)."""
    from fedtune.federation.records import Ledger
    from fedtune.federation.signing import Trust

    cm = cluster.core().read_namespaced_config_map(f"{name}-spec", namespace)
    return Ledger(run_store(cluster, status), Trust.from_json(cm.data["keys.json"], "keys.json"))


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `check` until it holds, failing with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


def running_pod(cluster: Cluster, namespace: str, selector: str, timeout: float = 120) -> str:
    """The name of a Running pod matching the label selector."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pod in cluster.core().list_namespaced_pod(namespace, label_selector=selector).items:
            if pod.status.phase == "Running" and pod.metadata.deletion_timestamp is None:
                return str(pod.metadata.name)
        time.sleep(0.3)
    raise AssertionError(f"no Running pod for {selector}")
