"""The CustomResourceDefinition, generated from the same pydantic models the CLI validates with.

pydantic writes JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3.0 schema, so this module
inlines references, turns `anyOf [X, null]` into `nullable` and rewrites exclusive bounds. The models' CEL
rules (fedtune.api.rules) come with their schemas; this module adds the rules about changes to a stored run.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic import BaseModel

from fedtune.api.fedclient import (
    FEDCLIENT_KIND,
    FEDCLIENT_PLURAL,
    FEDCLIENT_SHORT_NAMES,
    FederatedClientSpec,
    FederatedClientStatus,
)
from fedtune.api.spec import API_GROUP, API_VERSION, KIND, PLURAL, FederatedFineTuneSpec
from fedtune.api.status import RunStatus

SHORT_NAMES = ["fft", "fedtune"]
CATEGORIES = ["fedtune"]

# What defines the run's math and data cannot change once it exists; lifecycle fields can.
IMMUTABLE = ("model", "tokenizer", "peft", "training", "aggregation", "privacy", "storage", "clients", "seed")

_STATE_AND_ROUND = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
]
_AGE = {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
PRINTER_COLUMNS = [
    *_STATE_AND_ROUND,
    {"name": "Clients", "type": "string", "jsonPath": ".status.clientsReady"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
    {"name": "Strategy", "type": "string", "jsonPath": ".spec.aggregation.strategy"},
    _AGE,
]
FEDCLIENT_COLUMNS = [
    *_STATE_AND_ROUND,
    {"name": "Client", "type": "string", "jsonPath": ".spec.clientName"},
    {"name": "Run", "type": "string", "jsonPath": ".status.run"},
    _AGE,
]


def _structural(node: Any, defs: dict[str, Any]) -> Any:
    """One JSON Schema node rewritten as a structural OpenAPI v3.0 node."""
    if isinstance(node, list):
        return [_structural(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = dict(node)
    nullable = False
    if "anyOf" in node:
        options = [o for o in node.pop("anyOf") if o.get("type") != "null"]
        nullable = len(options) == 1
        node = {**options[0], **node}
    if "$ref" in node:
        target = defs[node.pop("$ref").split("/")[-1]]
        node = {**target, **node}
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key == "title":
            continue
        if key == "properties":
            out[key] = {k: _structural(v, defs) for k, v in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "additionalProperties":
            if value is True:
                out["x-kubernetes-preserve-unknown-fields"] = True
            elif isinstance(value, dict):
                out[key] = _structural(value, defs)
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        else:
            out[key] = copy.deepcopy(value)  # a value shared between nodes would become a YAML alias
    if nullable:
        out["nullable"] = True
    return out


def schema_of(model: type[BaseModel]) -> dict[str, Any]:
    """A model's structural OpenAPI v3.0 schema, with the x-kubernetes-validations of its rules."""
    raw = model.model_json_schema(by_alias=True)
    schema: dict[str, Any] = _structural({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    return schema


def spec_schema() -> dict[str, Any]:
    schema = schema_of(FederatedFineTuneSpec)
    props = schema["properties"]
    for field in IMMUTABLE:
        props[field].setdefault("x-kubernetes-validations", []).append(
            {"rule": "self == oldSelf", "message": f"spec.{field} cannot change once the run exists"}
        )
    # The queue admits the run as a whole: a run cannot move in or out of Kueue, or between queues, midway.
    schema.setdefault("x-kubernetes-validations", []).append(
        {
            "rule": "has(self.queueName) == has(oldSelf.queueName) && "
            "(!has(self.queueName) || self.queueName == oldSelf.queueName)",
            "message": "spec.queueName cannot be set, changed or removed once the run exists",
        }
    )
    # Pods on a cluster share no folder, so the local default store would split the run: name one.
    schema["required"] = [*schema["required"], "storage"]
    props["storage"]["required"] = ["uri"]
    del props["storage"]["properties"]["uri"]["default"]
    return schema


def _crd(
    kind: str,
    plural: str,
    short_names: list[str],
    description: str,
    spec: dict[str, Any],
    status: dict[str, Any],
    columns: list[dict[str, str]],
) -> dict[str, Any]:
    """A namespaced CustomResourceDefinition of fedtune's API group, with a status subresource."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": kind,
                "listKind": f"{kind}List",
                "plural": plural,
                "singular": kind.lower(),
                "shortNames": short_names,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": columns,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": description,
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec,
                                "status": status,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd() -> dict[str, Any]:
    """The FederatedFineTune CustomResourceDefinition as a dict."""
    description = (
        "A federated fine-tuning run: clients train a PEFT adapter on private data; an aggregator combines their "
        "updates round by round."
    )
    return _crd(KIND, PLURAL, SHORT_NAMES, description, spec_schema(), schema_of(RunStatus), PRINTER_COLUMNS)


def fedclient_crd() -> dict[str, Any]:
    """The FederatedClient CustomResourceDefinition as a dict."""
    spec = schema_of(FederatedClientSpec)
    # Its pod is made once, from the spec as it was: a change would silently not apply.
    spec.setdefault("x-kubernetes-validations", []).append(
        {"rule": "self == oldSelf", "message": "spec cannot change once the client exists: delete and re-create it"}
    )
    description = (
        "One client of a federated fine-tuning run, in its owner's cluster: its data, GPUs and credentials stay "
        "here; it meets the run only in the shared bucket."
    )
    status = schema_of(FederatedClientStatus)
    return _crd(FEDCLIENT_KIND, FEDCLIENT_PLURAL, FEDCLIENT_SHORT_NAMES, description, spec, status, FEDCLIENT_COLUMNS)


def crd_yaml(kind: str = KIND) -> str:
    doc = fedclient_crd() if kind == FEDCLIENT_KIND else crd()
    flag = f" --kind {kind}" if kind != KIND else ""
    return f"# Generated by `fedtune crd{flag}`; do not edit.\n" + yaml.safe_dump(doc, sort_keys=False, width=120)
