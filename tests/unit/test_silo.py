"""A client in another cluster joins a run through the bucket alone: it believes the run only as the
coordinator's key signed it, and its operator makes its pod from its own Secrets, data and placement."""

from __future__ import annotations

import json
import secrets
from datetime import UTC, datetime
from typing import Any

import pytest

from fedtune.api.fedclient import FederatedClientStatus
from fedtune.api.loading import parse_fedclient
from fedtune.controller import builders, silo
from fedtune.controller.kube import Credentials
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.join import JoinError, joined_run
from fedtune.federation.run_config import RunConfig, resource_json
from fedtune.federation.signing import AGGREGATOR, KEY_FILE, Signer, Trust, private_pem
from fedtune.storage import open_store
from tests.unit.fake_kube import STORAGE, FakeKube
from tests.unit.runs import _private, _public, run

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
SILO_KEY = 9


def coordinator_run(root: str, **spec: Any) -> RunConfig:
    """A run of two clients in the coordinator's cluster and `hospital` outside it, rooted at `root`."""
    base = run()
    clients = [c.model_dump(by_alias=True, exclude_none=True) for c in base.spec.clients[:2]]
    hospital = {"name": "hospital", "external": True, "publicKey": _public(SILO_KEY), "data": {"uri": "s3://h/x"}}
    bucket, _, prefix = root.removeprefix("memory://").partition("/")
    storage = {"uri": f"memory://{bucket}", "runRoot": prefix}
    res = run(clients=[*clients, hospital], storage=storage, **spec)
    trust = Trust(
        run=builders.run_id(res),
        aggregator=_public(1),
        clients={"clinic": _public(2), "bank": _public(3), "hospital": _public(SILO_KEY)},
    )
    return RunConfig(res, trust)


def publish(root: str, cfg: RunConfig, key: int = 1) -> None:
    """The aggregator's signed spec record, with the resource and keys a silo joins by."""
    record = p.SpecRecord(
        spec=cfg.resource.spec.model_dump(mode="json", by_alias=True),
        resource=json.loads(resource_json(cfg.resource)),
        keys=json.loads(cfg.trust.to_json()),
    )
    signer = Signer(cfg.trust.run, AGGREGATOR, _private(key))
    open_store(root).put(p.SPEC, signer.sign(p.SPEC, p.dumps(record)))


@pytest.fixture
def root() -> str:
    return f"memory://shared-{secrets.token_hex(4)}/studies/cardio"


def test_a_silo_joins_the_run_its_coordinator_signed(root: str) -> None:
    cfg = coordinator_run(root)
    publish(root, cfg)
    joined = joined_run(open_store(root), _public(1), "hospital")
    assert joined.trust == cfg.trust and joined.resource.metadata.uid == cfg.resource.metadata.uid


@pytest.mark.parametrize(
    ("case", "reason", "field"),
    [
        ("nothing there", "RunNotFound", "spec.runRoot"),
        ("signed by another key", "CoordinatorKeyMismatch", "spec.coordinatorPublicKey"),
        ("altered after signing", "CoordinatorKeyMismatch", "spec.coordinatorPublicKey"),
        ("not a client", "ClientNotInRun", "spec.clientName"),
        ("an internal client", "ClientNotExternal", "spec.clientName"),
    ],
)
def test_a_silo_refuses_what_its_coordinator_did_not_sign(root: str, case: str, reason: str, field: str) -> None:
    cfg = coordinator_run(root)
    store, client = open_store(root), "hospital"
    if case != "nothing there":
        publish(root, cfg, key=5 if case == "signed by another key" else 1)
    if case == "altered after signing":
        doc = json.loads(store.get(p.SPEC))
        doc["keys"]["clients"]["hospital"] = _public(6)  # someone with bucket access swaps the silo's key
        store.put(p.SPEC, json.dumps(doc).encode())
    client = {"not a client": "lab", "an internal client": "clinic"}.get(case, client)
    with pytest.raises(JoinError) as e:
        joined_run(store, _public(1), client)
    assert e.value.reason == reason and str(e.value).startswith(field), str(e.value)


def federated_client(root: str, **spec: Any) -> Any:
    doc = {
        "apiVersion": "fedtune.io/v1alpha1",
        "kind": "FederatedClient",
        "metadata": {"name": "cardio", "namespace": "hospital", "uid": "fc-uid"},
        "spec": {
            "runRoot": root,
            "coordinatorPublicKey": _public(1),
            "clientName": "hospital",
            "data": {"uri": "s3://hospital-private/notes.jsonl", "secretRef": "hospital-data"},
            "secretRef": "hospital-s3",
            "signingKeySecretRef": "hospital-key",
            "resources": {"gpus": 2},
            "nodeSelector": {"pool": "h100"},
            **spec,
        },
    }
    return parse_fedclient(doc)


def silo_kube(key: int = SILO_KEY) -> FakeKube:
    return FakeKube(
        {
            "hospital-s3": Credentials(dict(STORAGE)),
            "hospital-data": Credentials(dict(STORAGE)),
            "hospital-key": Credentials({KEY_FILE: private_pem(_private(key))}),
        }
    )


def once(kube: FakeKube, fc: Any, old: FederatedClientStatus | None = None) -> FederatedClientStatus:
    return silo.compute(silo.reconcile(kube, fc, 1, old or FederatedClientStatus(), NOW))


def test_the_silos_pod_gets_its_own_secrets_data_and_placement(root: str) -> None:
    cfg = coordinator_run(root)
    publish(root, cfg)
    kube = silo_kube()
    status = once(kube, federated_client(root))
    assert sorted(kube.created) == ["ConfigMap/cardio-spec", "Job/cardio-client-hospital"]
    job = kube.objects["Job", "cardio-client-hospital"]
    assert job["metadata"]["ownerReferences"][0]["kind"] == "FederatedClient"
    pod = job["spec"]["template"]["spec"]
    mounted = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert mounted == {"hospital-key", "hospital-data"}
    assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "hospital-s3"}}]
    assert pod["nodeSelector"] == {"pool": "h100"}
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["FEDTUNE_RUN_ROOT"] == root
    seen = json.loads(kube.objects["ConfigMap", "cardio-spec"]["data"]["resource.json"])
    own = next(c for c in seen["spec"]["clients"] if c["name"] == "hospital")
    assert own["data"]["uri"] == "s3://hospital-private/notes.jsonl"
    assert json.loads(kube.objects["ConfigMap", "cardio-spec"]["data"]["keys.json"]) == json.loads(cfg.trust.to_json())
    ready = status.conditions[0]  # type: ignore[index]
    assert (ready.status, ready.reason) == ("True", "WaitingForSelection")
    assert status.run == "team-a/quickstart" and status.state == "Pending"


def test_a_silo_key_that_is_not_the_pinned_one_makes_no_pod(root: str) -> None:
    publish(root, coordinator_run(root))
    kube = silo_kube(key=8)
    ready = once(kube, federated_client(root)).conditions[0]  # type: ignore[index]
    assert ready.reason == "KeyMismatch" and ready.message.startswith("spec.signingKeySecretRef")
    assert kube.created == []


def test_a_missing_secret_or_run_is_a_condition_not_a_crash(root: str) -> None:
    kube = silo_kube()
    del kube.secrets["hospital-data"]
    ready = once(kube, federated_client(root)).conditions[0]  # type: ignore[index]
    assert ready.reason == "SecretNotFound" and ready.message.startswith("spec.data.secretRef")
    ready = once(silo_kube(), federated_client(root)).conditions[0]  # type: ignore[index]
    assert ready.reason == "RunNotFound" and kube.created == []


def test_join_prints_a_federated_client_for_an_external_client_only(root: str) -> None:
    cfg = coordinator_run(root)
    manifest = silo.join_manifest(cfg.resource, _public(1), "hospital", "cardio", "research")
    fc = parse_fedclient(manifest)  # a valid FederatedClient, as printed
    assert (fc.spec.run_root, fc.spec.coordinator_public_key, fc.spec.client_name) == (root, _public(1), "hospital")
    assert (fc.metadata.name, fc.metadata.namespace) == ("cardio", "research")
    with pytest.raises(FedtuneError, match="not an external client"):
        silo.join_manifest(cfg.resource, _public(1), "clinic", "cardio", "research")


def test_a_copy_of_another_runs_record_or_a_replaced_run_is_refused(root: str) -> None:
    other_root = f"{root}-other"
    other = coordinator_run(other_root)
    publish(other_root, other)
    store = open_store(other_root)
    open_store(root).put(p.SPEC, store.get(p.SPEC))  # same aggregator key, another run's record
    kube = silo_kube()
    ready = once(kube, federated_client(root)).conditions[0]  # type: ignore[index]
    assert ready.reason == "RunNotJoinable" and "describes the run rooted at" in ready.message
    assert kube.created == []

    publish(root, coordinator_run(root))
    joined = once(kube, federated_client(root))
    assert joined.run_id is not None and kube.created
    old = joined.model_copy(update={"run_id": "team-a/quickstart/an-earlier-uid"})
    ready = once(kube, federated_client(root), old).conditions[0]  # type: ignore[index]
    assert ready.reason == "RunReplaced"


def test_the_coordinator_does_not_choose_what_the_silos_pod_mounts(root: str) -> None:
    fc = federated_client(root)
    hub = coordinator_run(root, model={"name": "org/llm", "tokenSecretRef": "coordinator-token"})
    assert silo.local_run(fc, hub).spec.model.token_secret_ref is None, "the coordinator's token Secret"
    own = silo.local_run(federated_client(root, modelTokenSecretRef="silo-token"), hub)
    assert own.spec.model.token_secret_ref == "silo-token"
    cached = coordinator_run(
        root, model={"uri": "s3://m/llm", "sha256": "0" * 64, "cache": {"hostPath": {"path": "/"}}}
    )
    assert silo.local_run(fc, cached).spec.model.cache is None, "the coordinator's cache volume"
    on_volume = coordinator_run(root, model={"volume": {"persistentVolumeClaim": {"claimName": "m"}}, "path": "llm"})
    with pytest.raises(FedtuneError, match=r"spec\.model\.volume"):
        silo.local_run(fc, on_volume)


def test_a_settled_client_stays_settled_while_storage_is_out(root: str) -> None:
    kube = silo_kube()
    settled = FederatedClientStatus(state="Succeeded", progress="3/3", run_id="x")
    status = once(kube, federated_client(root), settled)  # nothing at the root: as if unreachable
    assert status.state == "Succeeded" and status.progress == "3/3"


def test_a_run_of_the_same_name_in_the_silos_namespace_is_a_conflict_not_a_takeover(root: str) -> None:
    publish(root, coordinator_run(root))
    for kind, name, body in (
        ("ConfigMap", "cardio-spec", {"kind": "ConfigMap", "metadata": {"name": "cardio-spec"}, "data": {"a": "b"}}),
        (
            "Job",
            "cardio-client-hospital",
            {"kind": "Job", "metadata": {"name": "cardio-client-hospital", "labels": {"fedtune.io/run": "cardio"}}},
        ),
    ):
        kube = silo_kube()
        kube.objects[kind, name] = body
        status = once(kube, federated_client(root))
        ready = status.conditions[0]  # type: ignore[index]
        assert ready.reason == "NameConflict" and ready.message.startswith("metadata.name"), ready.message
        assert "Job/cardio-client-hospital" not in kube.created and status.state == "Pending"
