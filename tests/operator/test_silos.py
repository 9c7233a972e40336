"""Clients in other clusters: a run in the coordinator's cluster with an external client whose
FederatedClient lives in a second control plane, sharing nothing with the first but the S3 server."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from botocore.exceptions import ClientError
from kubernetes import client

from fedtune.api import API_GROUP, API_VERSION
from fedtune.api.fedclient import FEDCLIENT_PLURAL
from fedtune.federation import protocol as p
from fedtune.federation.policy import bucket_policy
from fedtune.federation.run_config import resource_json
from fedtune.federation.signing import AGGREGATOR, KEY_FILE, Signer, Trust, encode_public, generate, private_pem
from tests.cluster.harness.cluster import BUCKET, CREDENTIALS_LABEL, Cluster
from tests.cluster.harness.nodes import GPU_TOLERATION, Pool
from tests.cluster.harness.procs import wait_for
from tests.cluster.harness.proxy import TcpProxy
from tests.operator.conftest import REPO, Operator, Runs, tiny_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]

SILO_POOL = Pool("hospital-l4", 1, gpus=4, product="NVIDIA-L4")


@pytest.fixture(scope="module")
def silo(crds: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A second control plane with a node pool and node agent of its own; only the S3 server is shared."""
    second = Cluster(tmp_path_factory.mktemp("silo"), pools=(SILO_POOL,), s3=crds.s3).start()
    try:
        second.kubectl("apply", "-f", str(REPO / "crds"))
        second.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
        yield second
    finally:
        second.stop()


@pytest.fixture
def silo_ns(silo: Cluster) -> Iterator[str]:
    name = f"hospital-{secrets.token_hex(3)}"
    silo.core().create_namespace({"metadata": {"name": name}})
    wait_for(lambda: silo.core().read_namespaced_service_account("default", name), 30, "the default account")
    try:
        yield name
    finally:
        with contextlib.suppress(client.ApiException):
            silo.core().delete_namespace(name)


def secret(cluster: Cluster, namespace: str, name: str, data: dict[str, str]) -> None:
    meta = {"name": name, "labels": {CREDENTIALS_LABEL: "true"}}
    cluster.core().create_namespaced_secret(namespace, {"metadata": meta, "stringData": data})


def fedclients(silo: Cluster, namespace: str) -> Any:
    return client.CustomObjectsApi(silo.api_client()), (API_GROUP, API_VERSION, namespace, FEDCLIENT_PLURAL)


def fedclient_status(silo: Cluster, namespace: str, name: str) -> dict[str, Any]:
    api, where = fedclients(silo, namespace)
    return dict(api.get_namespaced_custom_object(*where, name).get("status") or {})


def ready_condition(status: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in status.get("conditions") or [] if c["type"] == "Ready"), {})


def keys_of(s3: Any, account: str) -> dict[str, str]:
    access, secret_key = s3.add_account(account)
    return {"AWS_ACCESS_KEY_ID": access, "AWS_SECRET_ACCESS_KEY": secret_key}


@dataclass
class Federation:
    """A run in the coordinator's cluster with clients alpha and beta, and hospital in the silo's cluster,
    joined through a FederatedClient that reaches storage through a proxy the test can cut."""

    coordinator: Cluster
    silo: Cluster
    namespace: str
    silo_ns: str
    accounts: dict[str, dict[str, str]]
    proxy: TcpProxy
    runs: Runs

    def fedclient(self) -> dict[str, Any]:
        return fedclient_status(self.silo, self.silo_ns, "multi")

    def took_part(self) -> int | None:
        found = self.fedclient().get("lastRound")
        return None if found is None else int(found)


@pytest.fixture
def federation(
    crds: Cluster, silo: Cluster, namespace: str, silo_ns: str, tiny_data: str, tmp_path: Path, request: Any
) -> Iterator[Federation]:
    """The run (of as many rounds as the test asks, through indirect parametrization) and its external
    client, both operators running."""
    rounds = int(request.param)
    s3 = crds.s3
    assert s3 is not None
    run_root = f"studies/{namespace}"
    # Accounts: the coordinator's parties in its cluster, the hospital's two (run storage, its own data).
    accounts = {party: keys_of(s3, f"{namespace}.{party}") for party in ("aggregator", "alpha", "beta")}
    hospital = keys_of(s3, f"{silo_ns}.hospital")
    hospital_data = keys_of(s3, f"{silo_ns}.hospital-data")
    policy = bucket_policy(
        f"s3://{BUCKET}/runs/{run_root}",
        accounts["aggregator"]["AWS_ACCESS_KEY_ID"],
        {
            "alpha": accounts["alpha"]["AWS_ACCESS_KEY_ID"],
            "beta": accounts["beta"]["AWS_ACCESS_KEY_ID"],
            "hospital": hospital["AWS_ACCESS_KEY_ID"],
        },
    )
    reads = [(accounts[c]["AWS_ACCESS_KEY_ID"], f"tiny/{c}.jsonl") for c in ("alpha", "beta")]
    reads.append((hospital_data["AWS_ACCESS_KEY_ID"], f"silo-data/{silo_ns}/hospital.jsonl"))
    statements = [
        {
            "Sid": f"{namespace}.data{i}",
            "Effect": "Allow",
            "Principal": {"AWS": [who]},
            "Action": ["s3:GetObject"],
            "Resource": [f"arn:aws:s3:::{BUCKET}/{key}"],
        }
        for i, (who, key) in enumerate(reads)
    ]
    for st in policy["Statement"]:
        st["Sid"] = f"{namespace}.{st['Sid']}"
    s3.merge_policy(BUCKET, f"{namespace}.", [*policy["Statement"], *statements])
    source = {"Bucket": BUCKET, "Key": "tiny/gamma.jsonl"}
    s3.client().copy_object(Bucket=BUCKET, Key=f"silo-data/{silo_ns}/hospital.jsonl", CopySource=source)
    for party, keys in accounts.items():
        crds.put_s3_secret(namespace, f"fedtune-{party}", (keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"]))

    # The hospital's key: its private half stays in its cluster; the coordinator pins the public one.
    key = generate()
    proxy = TcpProxy(int(s3.endpoint.rsplit(":", 1)[1])).start()
    secret(silo, silo_ns, "hospital-key", {KEY_FILE: private_pem(key)})
    secret(silo, silo_ns, "hospital-s3", hospital)
    secret(silo, silo_ns, "hospital-data", hospital_data)

    doc = tiny_run(
        "multi",
        aggregation={"rounds": rounds, "minClients": 2, "roundTimeoutSeconds": 15},
        storage={"uri": f"s3://{BUCKET}/runs", "runRoot": run_root},
        clients=[
            {
                "name": c,
                "secretRef": f"fedtune-{c}",
                "data": {"uri": f"s3://{BUCKET}/tiny/{c}.jsonl"},
                "nodeSelector": {"fedtune.io/pool": "gpu-a100"},
                "tolerations": [GPU_TOLERATION],
                "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
            }
            for c in ("alpha", "beta")
        ]
        + [
            {
                "name": "hospital",
                "external": True,
                "publicKey": encode_public(key.public_key()),
                "data": {"uri": "s3://hospital/private"},
            }
        ],
    )
    doc["spec"]["storage"].pop("secretRef")
    doc["spec"]["aggregator"]["secretRef"] = "fedtune-aggregator"
    coordinator = Operator(crds, namespace, tmp_path / "coordinator.log")
    silo_operator = Operator(silo, silo_ns, tmp_path / "silo.log")
    runs = Runs(crds, namespace)
    try:
        coordinator.start()
        silo_operator.start()
        runs.create(doc)
        wait_for(lambda: crds.core().read_namespaced_config_map("multi-spec", namespace), 60, "the run's keys")
        joined = subprocess.run(
            [sys.executable, "-m", "fedtune", "join", "multi", "--client", "hospital", "-n", namespace,
             "--silo-namespace", silo_ns, "--principal", hospital["AWS_ACCESS_KEY_ID"]],
            capture_output=True, text=True, env={**os.environ, "KUBECONFIG": str(crds.kubeconfig)}, check=False,
        )  # fmt: skip
        assert joined.returncode == 0, joined.stderr
        assert f"{silo_ns}.hospital" in joined.stdout, "the policy statements name the silo's account"
        manifest = yaml.safe_load(joined.stdout)
        manifest["spec"].update(
            data={"uri": f"s3://{BUCKET}/silo-data/{silo_ns}/hospital.jsonl", "secretRef": "hospital-data"},
            endpoint=proxy.endpoint,
            nodeSelector={"fedtune.io/pool": SILO_POOL.name},
            tolerations=[GPU_TOLERATION],
        )
        manifest["spec"]["resources"] = {"gpus": 1, "cpu": "1", "memory": "2Gi"}
        api, where = fedclients(silo, silo_ns)
        api.create_namespaced_custom_object(*where, manifest)
        yield Federation(crds, silo, namespace, silo_ns, accounts, proxy, runs)
    finally:
        proxy.cut()
        with contextlib.suppress(client.ApiException):
            runs.api.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, "federatedfinetunes", "multi")
        coordinator.stop()
        silo_operator.stop()
        for log in (coordinator.log, silo_operator.log):
            if log.exists():
                print(f"{log.name}:", *log.read_text(errors="replace").splitlines()[-40:], sep="\n")


@pytest.mark.parametrize("federation", [6], indirect=True)
def test_a_run_with_a_client_in_another_cluster_succeeds_and_its_data_stays_there(federation: Federation) -> None:
    f = federation
    done = f.runs.wait_state("multi", "Succeeded", timeout=400)["status"]
    external = next(c for c in done["clients"] if c["name"] == "hospital")
    assert external["external"] is True and external["signed"] is True and external.get("lastRound") is not None
    wait_for(lambda: f.fedclient().get("state") == "Succeeded", 120, "the silo's view of the run")
    assert f.fedclient()["progress"] == "6/6" and f.took_part() is not None
    # The silo's data never left its cluster: no Secret of it in the coordinator's, and no coordinator
    # account reads its data.
    names = {s.metadata.name for s in f.coordinator.core().list_namespaced_secret(f.namespace).items}
    assert not names & {"hospital-key", "hospital-s3", "hospital-data"}
    s3 = f.coordinator.s3
    assert s3 is not None
    for keys in f.accounts.values():
        reader = s3.client(keys["AWS_ACCESS_KEY_ID"], keys["AWS_SECRET_ACCESS_KEY"])
        with pytest.raises(ClientError, match="AccessDenied"):
            reader.get_object(Bucket=BUCKET, Key=f"silo-data/{f.silo_ns}/hospital.jsonl")


# Rounds go on fast without the hospital: the run must outlast the outage.
@pytest.mark.parametrize("federation", [10_000], indirect=True)
def test_a_silo_that_loses_storage_for_a_minute_takes_part_again_and_no_round_is_lost(
    federation: Federation,
) -> None:
    f = federation
    wait_for(lambda: f.took_part() is not None, 300, "the hospital to take part")
    before = f.took_part()
    assert before is not None

    def committed() -> int:
        return int(f.runs.get("multi")["status"].get("completedRounds") or 0)

    at_cut = committed()
    f.proxy.cut()
    cut_at = time.monotonic()
    try:

        def a_minute_without_storage() -> bool:
            unreachable = ready_condition(f.fedclient()).get("reason") == "StorageUnreachable"
            return unreachable and committed() > at_cut and time.monotonic() - cut_at >= 60

        wait_for(a_minute_without_storage, 240, "a minute without storage in the silo, rounds going on")
    finally:
        f.proxy.restore()
    at_restore = committed()
    wait_for(lambda: (f.took_part() or 0) > at_restore, 240, "the hospital to take part again")
    assert committed() >= at_restore, "no committed round lost"
    assert ready_condition(f.fedclient()).get("reason") == "Joined"

    def coordinator_sees_it_back() -> bool:
        hospital = next(c for c in f.runs.get("multi")["status"]["clients"] if c["name"] == "hospital")
        return bool(hospital["state"] == "Running" and hospital["lastRound"] > at_restore)

    wait_for(coordinator_sees_it_back, 60, "the coordinator's status to show the hospital back")


def publish_run(s3: Any, root: str, clients: dict[str, str]) -> tuple[str, Any]:
    """A run's signed spec record at `s3://BUCKET/root`, as its aggregator writes it; returns its key pair."""
    aggregator = generate()
    storage = {"uri": f"s3://{BUCKET}/runs", "runRoot": root}
    res = tiny_run("published", storage=storage, aggregation={"minClients": 1})
    res["metadata"].update(namespace="elsewhere", uid="u-1")
    res["spec"]["clients"] = [
        {"name": n, "external": True, "publicKey": k, "data": {"uri": "s3://x/y"}} for n, k in clients.items()
    ]
    from fedtune.api import parse_resource

    parsed = parse_resource(res)
    trust = Trust(run="elsewhere/published/u-1", aggregator=encode_public(aggregator.public_key()), clients=clients)
    record = p.SpecRecord(
        spec=parsed.spec.model_dump(mode="json", by_alias=True),
        resource=json.loads(resource_json(parsed)),
        keys=json.loads(trust.to_json()),
    )
    body = Signer(trust.run, AGGREGATOR, aggregator).sign(p.SPEC, p.dumps(record))
    s3.client().put_object(Bucket=BUCKET, Key=f"runs/{root}/{p.SPEC}", Body=body)
    return trust.aggregator, aggregator


@pytest.mark.parametrize(
    ("case", "reason"),
    [("no such run", "RunNotFound"), ("no such client", "ClientNotInRun"), ("another key", "CoordinatorKeyMismatch")],
)
def test_a_federated_client_that_cannot_join_says_why_and_makes_no_pod(
    silo: Cluster, silo_ns: str, tmp_path: Path, case: str, reason: str
) -> None:
    s3 = silo.s3
    assert s3 is not None
    key = generate()
    root = f"published/{silo_ns}"
    coordinator_key, _ = publish_run(s3, root, {"hospital": encode_public(key.public_key())})
    secret(silo, silo_ns, "hospital-key", {KEY_FILE: private_pem(key)})
    secret(silo, silo_ns, "hospital-s3", {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key})
    spec = {
        "runRoot": f"s3://{BUCKET}/runs/{'nowhere' if case == 'no such run' else root}",
        "endpoint": s3.endpoint,
        "coordinatorPublicKey": encode_public(generate().public_key()) if case == "another key" else coordinator_key,
        "clientName": "lab" if case == "no such client" else "hospital",
        "data": {"uri": f"s3://{BUCKET}/tiny/gamma.jsonl"},
        "secretRef": "hospital-s3",
        "signingKeySecretRef": "hospital-key",
    }
    operator = Operator(silo, silo_ns, tmp_path / "silo.log")
    api, where = fedclients(silo, silo_ns)
    try:
        operator.start()
        api.create_namespaced_custom_object(
            *where, {"apiVersion": f"{API_GROUP}/{API_VERSION}", "kind": "FederatedClient",
                     "metadata": {"name": "joiner"}, "spec": spec}
        )  # fmt: skip

        def blocked() -> dict[str, Any]:
            return ready_condition(fedclient_status(silo, silo_ns, "joiner"))

        condition = wait_for(lambda: blocked().get("reason") == reason and blocked(), 60, reason)
        assert (
            isinstance(condition, dict) and condition["status"] == "False" and condition["message"].startswith("spec.")
        )
        assert silo.batch().list_namespaced_job(silo_ns).items == [], "no pod for a client that cannot join"
        assert operator.procs[0].poll() is None, "the operator keeps running"
    finally:
        operator.stop()
