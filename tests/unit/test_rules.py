"""Cross-field rules: each one is written once and checked twice, by pydantic (fedtune validate, the operator)
and by the API server (its CEL in the CRD). Each rule here gets an example that breaks it."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fedtune.api import SpecError, parse_resource
from fedtune.api.crd import crd
from fedtune.api.rules import Rule
from fedtune.api.spec import FederatedFineTuneSpec, SpecModel

KEY = "ed25519:" + "A" * 43 + "="
CLIENTS = [{"name": "a", "data": {"uri": "s3://b/a.jsonl"}}, {"name": "b", "data": {"uri": "s3://b/b.jsonl"}}]


def resource(**spec: Any) -> dict[str, Any]:
    body = {"model": {"name": "m"}, "storage": {"uri": "s3://b/runs"}, "clients": CLIENTS, **spec}
    return {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": "r"}, "spec": body}


def client(**fields: Any) -> list[dict[str, Any]]:
    return [{**CLIENTS[0], **fields}, CLIENTS[1]]


# (model, the rule's field, a spec that breaks only that rule, the field path the error names)
BROKEN: list[tuple[str, str, dict[str, Any], str]] = [
    ("ModelSpec", "", {"model": {"name": "m", "config": {"a": 1}}}, "spec.model"),
    ("ModelSpec", "", {"model": {"uri": "s3://b/models/m/", "sha256": "0" * 64, "path": "m"}}, "spec.model"),
    ("ModelSpec", "volume", {"model": {"name": "m", "volume": {"emptyDir": {}}}}, "spec.model.volume"),
    ("ModelSpec", "tokenSecretRef", {"model": {"path": "m", "tokenSecretRef": "hf"}}, "spec.model.tokenSecretRef"),
    (
        "ModelSpec",
        "revision",
        {"model": {"uri": "s3://b/m/", "sha256": "0" * 64, "revision": "main"}},
        "spec.model.revision",
    ),
    ("ModelSpec", "sha256", {"model": {"name": "m", "sha256": "0" * 64}}, "spec.model.sha256"),
    ("ModelSpec", "cache", {"model": {"path": "m", "cache": {"emptyDir": {}}}}, "spec.model.cache"),
    ("ModelSpec", "uri", {"model": {"uri": "gs://b/models/m/", "sha256": "0" * 64}}, "spec.model.uri"),
    (
        "PeftSpec",
        "feedforwardModules",
        {"peft": {"method": "lora", "feedforwardModules": ["q_proj"]}},
        "spec.peft.feedforwardModules",
    ),
    ("TokenizerSpec", "", {"tokenizer": {"name": "t", "builtin": "bytes"}}, "spec.tokenizer"),
    ("PartySpec", "publicKey", {"aggregator": {"publicKey": KEY}}, "spec.aggregator.publicKey"),
    ("ClientSpec", "publicKey", {"clients": client(publicKey=KEY)}, "spec.clients[0].publicKey"),
    ("ClientSpec", "publicKey", {"clients": client(external=True)}, "spec.clients[0].publicKey"),
    (
        "ClientSpec",
        "external",
        {"clients": client(external=True, publicKey=KEY, secretRef="s3")},
        "spec.clients[0].external",
    ),
    ("DataSpec", "uri", {"clients": client(data={"uri": "gs://b/a.jsonl"})}, "spec.clients[0].data.uri"),
    (
        "DataSpec",
        "evalUri",
        {"clients": client(data={"uri": "a.jsonl", "evalUri": "ftp://h/e.jsonl"})},
        "spec.clients[0].data.evalUri",
    ),
    ("StorageSpec", "uri", {"storage": {"uri": "ftp://host/runs"}}, "spec.storage.uri"),
    (
        "FederatedFineTuneSpec",
        "clients",
        {"clients": [CLIENTS[0], {**CLIENTS[1], "name": "a"}]},
        "spec.clients[1].name",
    ),
    ("FederatedFineTuneSpec", "clients", {"clients": client(name="aggregator")}, "spec.clients[0].name"),
    (
        "FederatedFineTuneSpec",
        "aggregation.maxUpdateNorm",
        {"privacy": {"enabled": True}, "aggregation": {"maxUpdateNorm": 5}},
        "spec.aggregation.maxUpdateNorm",
    ),
    (
        "FederatedFineTuneSpec",
        "privacy.enabled",
        {"privacy": {"enabled": True}, "aggregation": {"strategy": "fedmedian"}},
        "spec.privacy.enabled",
    ),
    *(
        (
            "FederatedFineTuneSpec",
            "aggregation.minClients",
            {"aggregation": {"strategy": strategy, "byzantineClients": 1, "minClients": 2}},
            "spec.aggregation.minClients",
        )
        for strategy in ("krum", "multikrum", "bulyan")
    ),
    (
        "FederatedFineTuneSpec",
        "aggregation.minClients",
        {"aggregation": {"minClients": 3}},
        "spec.aggregation.minClients",
    ),
    (
        "FederatedFineTuneSpec",
        "aggregation.clientsPerRound",
        {"aggregation": {"clientsPerRound": 3}},
        "spec.aggregation.clientsPerRound",
    ),
    (
        "FederatedFineTuneSpec",
        "aggregation.overSelection",
        {"aggregation": {"clientsPerRound": 2, "overSelection": 1}},
        "spec.aggregation.overSelection",
    ),
    (
        "FederatedFineTuneSpec",
        "aggregation.minClients",
        {"aggregation": {"clientsPerRound": 1, "minClients": 2}},
        "spec.aggregation.minClients",
    ),
    (
        "FederatedFineTuneSpec",
        "training.keepOptimizerState",
        {"privacy": {"enabled": True}, "training": {"keepOptimizerState": True}},
        "spec.training.keepOptimizerState",
    ),
    (
        "FederatedFineTuneSpec",
        "training.packing",
        {"training": {"packing": True}, "clients": client(data={"uri": "a.jsonl", "format": "chat"})},
        "spec.training.packing",
    ),
    (
        "FederatedFineTuneSpec",
        "model.quantization",
        {"model": {"name": "m", "quantization": "nf4"}, "peft": {"method": "ia3"}},
        "spec.model.quantization",
    ),
]


def models(model: type[SpecModel] = FederatedFineTuneSpec) -> Iterator[type[SpecModel]]:
    """The spec model and every model below it."""
    yield model
    for field in model.model_fields.values():
        for arg in (field.annotation, *getattr(field.annotation, "__args__", ())):
            if isinstance(arg, type) and issubclass(arg, SpecModel):
                yield from models(arg)


def all_rules() -> list[tuple[str, Rule[Any]]]:
    """(model, rule) for every rule, each once (a subclass shares its base's rules)."""
    found: dict[int, tuple[str, Rule[Any]]] = {}
    for model in models():
        for rule in model.rules:
            owner = next(base for base in model.__mro__ if rule in vars(base).get("rules", ()))
            found.setdefault(id(rule), (owner.__name__, rule))
    return list(found.values())


def validations(node: Any) -> Iterator[dict[str, str]]:
    """Every x-kubernetes-validations entry anywhere under a schema node."""
    if isinstance(node, dict):
        yield from node.get("x-kubernetes-validations", [])
        for value in node.values():
            yield from validations(value)
    elif isinstance(node, list):
        for value in node:
            yield from validations(value)


def rejection(spec: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_resource(resource(**spec))
    return e.value.problems


def test_the_base_is_valid() -> None:
    parse_resource(resource())


@pytest.mark.parametrize(("model", "field", "spec", "path"), BROKEN, ids=[f"{m}.{f}:{p}" for m, f, _, p in BROKEN])
def test_a_broken_rule_is_rejected_naming_the_field_with_the_rules_message(
    model: str, field: str, spec: dict[str, Any], path: str
) -> None:
    [problem] = rejection(spec)
    rules = [r for owner, r in all_rules() if (owner, r.field) == (model, field)]
    assert any(problem.startswith(f"{path}: {r.message}") for r in rules), problem


def test_every_rule_is_broken_by_an_example() -> None:
    covered = set()
    for model, field, spec, _ in BROKEN:
        [problem] = rejection(spec)
        covered |= {id(r) for owner, r in all_rules() if (owner, r.field) == (model, field) and r.message in problem}
    missing = [f"{owner}: {r.message}" for owner, r in all_rules() if id(r) not in covered]
    assert not missing, f"rules without an example that breaks them: {missing}"


def test_every_rule_is_in_the_crd_as_cel() -> None:
    in_crd = list(validations(crd()))
    for owner, rule in all_rules():
        assert rule.validation() in in_crd, f"{owner}: {rule.message}"
