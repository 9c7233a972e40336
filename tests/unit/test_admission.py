"""What admission refuses before a run starts: impossible robust settings, stores fedtune cannot reach,
keys that cannot be a key. Each refusal names the field."""

from __future__ import annotations

from typing import Any

import pytest

from fedtune.api import SpecError, parse_resource
from fedtune.controller.admission import admission
from fedtune.controller.kube import Credentials
from tests.unit.runs import run

CLIENTS = [{"name": f"c{i}", "data": {"uri": f"s3://b/{i}.jsonl"}} for i in range(7)]


def doc(**spec: Any) -> dict[str, Any]:
    body = {"model": {"name": "m"}, "clients": CLIENTS, **spec}
    return {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": "r"}, "spec": body}


@pytest.mark.parametrize(
    ("strategy", "f", "min_clients", "ok"),
    [
        ("krum", 1, 4, False),
        ("krum", 1, 5, True),
        ("multikrum", 2, 6, False),
        ("multikrum", 2, 7, True),
        ("bulyan", 1, 6, False),
        ("bulyan", 1, 7, True),
        ("fedmedian", 3, 1, True),
    ],
)
def test_robust_strategies_need_enough_updates_per_round(strategy: str, f: int, min_clients: int, ok: bool) -> None:
    aggregation = {"strategy": strategy, "byzantineClients": f, "minClients": min_clients}
    if ok:
        parse_resource(doc(aggregation=aggregation))
        return
    with pytest.raises(SpecError) as e:
        parse_resource(doc(aggregation=aggregation))
    a = 4 if strategy == "bulyan" else 2
    assert e.value.problems == [
        f"spec.aggregation.minClients: {strategy} needs minClients >= {a}*byzantineClients + 3; "
        f"byzantineClients={f} needs at least {a * f + 3} updates in a round; minClients is {min_clients}"
    ]


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        ({"storage": {"uri": "ftp://host/runs"}}, "spec.storage.uri"),
        ({"storage": {"uri": "gs://bucket/runs"}}, "spec.storage.uri"),
        ({"clients": [{"name": "a", "data": {"uri": "http://x/a.jsonl"}}]}, "spec.clients[0].data.uri"),
        (
            {"clients": [{"name": "a", "data": {"uri": "s3://b/a.jsonl", "evalUri": "ftp://x"}}]},
            "spec.clients[0].data.evalUri",
        ),
    ],
)
def test_unsupported_storage_schemes_are_refused(spec: dict[str, Any], field: str) -> None:
    with pytest.raises(SpecError) as e:
        parse_resource(doc(**spec))
    assert len(e.value.problems) == 1 and e.value.problems[0].startswith(f"{field}: unsupported storage scheme")
    parse_resource(doc(storage={"uri": "relative/folder"}))


def test_a_public_key_needs_its_secret_and_a_valid_form() -> None:
    key = "ed25519:" + "A" * 43 + "="
    with pytest.raises(SpecError, match=r"spec\.aggregator\.publicKey: publicKey and signingKeySecretRef go together"):
        parse_resource(doc(aggregator={"publicKey": key}))
    with pytest.raises(SpecError, match=r"spec\.clients\[0\]\.publicKey: String should match"):
        parse_resource(doc(clients=[{**CLIENTS[0], "publicKey": "ssh-ed25519 AAAA", "signingKeySecretRef": "k"}]))
    parse_resource(doc(aggregator={"publicKey": key, "signingKeySecretRef": "k"}))


def test_the_coordinators_party_name_is_reserved_and_dp_clips_instead_of_rejecting() -> None:
    with pytest.raises(SpecError, match=r"spec\.clients\[0\]\.name: 'aggregator' is the coordinator's party name"):
        parse_resource(doc(clients=[{"name": "aggregator", "data": {"uri": "s3://b/a.jsonl"}}]))
    with pytest.raises(SpecError, match=r"spec\.aggregation\.maxUpdateNorm: under differential privacy"):
        parse_resource(doc(privacy={"enabled": True}, aggregation={"maxUpdateNorm": 10}))


def test_a_hub_token_secret_must_exist_and_hold_hf_token() -> None:
    res = run(model={"name": "meta-llama/Llama-3.2-1B", "tokenSecretRef": "hf"})
    storage = Credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    secrets = {name: storage for _, name in res.spec.secret_refs() if name != "hf"}
    reason, message = admission(res, secrets) or ("", "")
    assert reason == "SecretNotFound" and message.startswith("spec.model.tokenSecretRef: Secret team-a/hf not found")
    reason, message = admission(res, {**secrets, "hf": Credentials({"TOKEN": "x"})}) or ("", "")
    assert (reason, message) == ("SecretInvalid", "spec.model.tokenSecretRef: Secret team-a/hf needs keys HF_TOKEN")
    assert admission(res, {**secrets, "hf": Credentials({"HF_TOKEN": "x"})}) is None


@pytest.mark.parametrize(
    ("model", "field", "kind"),
    [
        ({"path": "llama", "volume": {"secret": {"secretName": "other-runs-keys"}}}, "spec.model.volume", "a secret"),
        ({"path": "llama", "volume": {"projected": {"sources": []}}}, "spec.model.volume", "a projected"),
        ({"path": "m", "volume": {"azureFile": {"secretName": "s"}}}, "spec.model.volume", "a azureFile"),
        (
            {"path": "m", "volume": {"csi": {"driver": "secrets-store.csi.k8s.io"}}},
            "spec.model.volume",
            "a csi volume that reads Secrets",
        ),
        (
            {"uri": "s3://b/models/m/", "sha256": "0" * 64, "cache": {"configMap": {"name": "c"}}},
            "spec.model.cache",
            "a configMap",
        ),
    ],
)
def test_a_model_volume_cannot_mount_credentials_past_the_label(model: dict[str, Any], field: str, kind: str) -> None:
    res = run(model=model)
    storage = Credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    reason, message = admission(res, {name: storage for _, name in res.spec.secret_refs()}) or ("", "")
    assert reason == "VolumeNotAllowed" and message.startswith(f"{field}: {kind}"), message


def test_a_model_on_a_claim_is_admitted() -> None:
    res = run(model={"path": "llama", "volume": {"persistentVolumeClaim": {"claimName": "models", "readOnly": True}}})
    storage = Credentials({"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"})
    assert admission(res, {name: storage for _, name in res.spec.secret_refs()}) is None
