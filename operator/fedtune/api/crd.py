"""The CustomResourceDefinition, generated from the same pydantic models the CLI validates with.

pydantic writes JSON Schema 2020-12; Kubernetes wants a structural OpenAPI v3.0 schema, so this module
inlines references, turns `anyOf [X, null]` into `nullable`, rewrites exclusive bounds, and adds the
CEL rules for what a per-field schema cannot say.
"""

from __future__ import annotations

from typing import Any

import yaml

from fedtune.api.spec import (
    API_GROUP,
    API_VERSION,
    BYZANTINE_MINIMUM,
    KIND,
    MEAN_BASED,
    PLURAL,
    RESERVED_CLIENT_NAME,
    STORAGE_SCHEMES,
    FederatedFineTuneSpec,
)

SHORT_NAMES = ["fft", "fedtune"]
CATEGORIES = ["fedtune"]

# Cross-field rules on spec (CEL); the same checks run in pydantic for `fedtune validate`.
SPEC_RULES = [
    {
        # No FieldValueDuplicate reason: the API server would print "Duplicate value" and drop the message.
        "rule": "self.clients.all(c, self.clients.exists_one(d, d.name == c.name))",
        "message": "client names must be unique",
        "messageExpression": "'duplicate client name \"' + self.clients.map(c, c.name)"
        ".filter(n, self.clients.filter(d, d.name == n).size() > 1)[0] + '\"'",
        "fieldPath": ".clients",
    },
    {
        "rule": "!has(self.aggregation) || !has(self.aggregation.minClients) || "
        "self.aggregation.minClients <= size(self.clients)",
        "message": "minClients must not exceed the number of clients",
        "fieldPath": ".aggregation.minClients",
    },
    {
        "rule": "!has(self.aggregation) || !has(self.aggregation.clientsPerRound) || "
        "self.aggregation.clientsPerRound <= size(self.clients)",
        "message": "clientsPerRound must not exceed the number of clients",
        "fieldPath": ".aggregation.clientsPerRound",
    },
    {
        "rule": "!has(self.aggregation) || !has(self.aggregation.clientsPerRound) || "
        "!has(self.aggregation.minClients) || self.aggregation.minClients <= self.aggregation.clientsPerRound",
        "message": "minClients must not exceed clientsPerRound",
        "fieldPath": ".aggregation.minClients",
    },
    {
        "rule": "!has(self.privacy) || !has(self.privacy.enabled) || !self.privacy.enabled || "
        "!has(self.aggregation) || !has(self.aggregation.strategy) || "
        f"self.aggregation.strategy in {sorted(str(s) for s in MEAN_BASED)}",
        "message": "differential privacy needs a mean-based strategy (" + ", ".join(sorted(MEAN_BASED)) + ")",
        "fieldPath": ".privacy.enabled",
    },
]

SPEC_RULES += [
    {
        "rule": f"!has(self.aggregation) || !has(self.aggregation.strategy) || self.aggregation.strategy != '{name}' "
        f"|| (has(self.aggregation.minClients) ? self.aggregation.minClients : 1) >= "
        f"{a} * (has(self.aggregation.byzantineClients) ? self.aggregation.byzantineClients : 0) + {b}",
        "message": f"{name} needs minClients >= {a}*byzantineClients + {b}",
        "fieldPath": ".aggregation.minClients",
    }
    for name, (a, b) in BYZANTINE_MINIMUM.items()
]
SPEC_RULES += [
    {
        "rule": f"self.clients.all(c, c.name != '{RESERVED_CLIENT_NAME}')",
        "message": f"the client name {RESERVED_CLIENT_NAME!r} is the coordinator's party name",
        "fieldPath": ".clients",
    },
    {
        "rule": "!has(self.privacy) || !has(self.privacy.enabled) || !self.privacy.enabled || "
        "!has(self.aggregation) || !has(self.aggregation.maxUpdateNorm)",
        "message": "under differential privacy updates are clipped to privacy.clipNorm: leave maxUpdateNorm unset",
        "fieldPath": ".aggregation.maxUpdateNorm",
    },
]
_SCHEME_OK = "!{0}.contains('://') || {0}.matches('^(" + "|".join(STORAGE_SCHEMES) + ")://')"
SPEC_RULES += [
    {
        "rule": _SCHEME_OK.format("self.storage.uri"),
        "message": f"unsupported storage scheme (supported: {', '.join(STORAGE_SCHEMES)})",
        "fieldPath": ".storage.uri",
    },
    {
        "rule": "self.clients.all(c, " + _SCHEME_OK.format("c.data.uri") + ")",
        "message": f"a client's data.uri has an unsupported scheme (supported: {', '.join(STORAGE_SCHEMES)})",
        "fieldPath": ".clients",
    },
]

# What defines the run's math and data cannot change once it exists; lifecycle fields can.
IMMUTABLE = ("model", "tokenizer", "peft", "training", "aggregation", "privacy", "storage", "clients", "seed")

MODEL_RULES = [
    {"rule": "has(self.name) != has(self.config)", "message": "set exactly one of name (pretrained) or config"}
]

PRINTER_COLUMNS = [
    {"name": "State", "type": "string", "jsonPath": ".status.state"},
    {"name": "Round", "type": "string", "jsonPath": ".status.progress"},
    {"name": "Clients", "type": "string", "jsonPath": ".status.clientsReady"},
    {"name": "GPUs", "type": "integer", "jsonPath": ".status.gpus"},
    {"name": "Strategy", "type": "string", "jsonPath": ".spec.aggregation.strategy"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

STATUS_SCHEMA: dict[str, Any] = {
    "type": "object",
    "description": "Observed state of the run, recomputed from its Jobs and its round records in storage.",
    "x-kubernetes-preserve-unknown-fields": True,
    "properties": {
        "state": {"type": "string", "description": "Pending, Running, Succeeded, Failed or Suspended."},
        "progress": {"type": "string", "description": "Completed rounds / total rounds."},
        "clientsReady": {"type": "string", "description": "Running clients / clients."},
        "gpus": {"type": "integer", "description": "GPUs requested by the run's pods."},
        "currentRound": {"type": "integer", "description": "The round in progress."},
        "completedRounds": {"type": "integer", "description": "Rounds whose next global is committed."},
        "observedGeneration": {"type": "integer", "description": "The generation this status describes."},
        "adapterURI": {"type": "string", "description": "Where the final PEFT adapter is."},
        "stoppedEarly": {"type": "string", "description": "Why the run ended before its rounds (targetEpsilon)."},
        "adapterSHA256": {
            "type": "string",
            "description": "sha256 of the final adapter_model.safetensors, as the aggregator signed it.",
        },
        "conditions": {
            "type": "array",
            "description": "Ready, Running, Succeeded, Failed, Suspended (metav1.Condition).",
            "items": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": True,
                "required": ["type", "status"],
                "properties": {
                    "type": {"type": "string"},
                    "status": {"type": "string"},
                    "reason": {"type": "string"},
                    "message": {"type": "string"},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                    "observedGeneration": {"type": "integer"},
                },
            },
        },
    },
}


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
            out[key] = value
    if nullable:
        out["nullable"] = True
    return out


def spec_schema() -> dict[str, Any]:
    raw = FederatedFineTuneSpec.model_json_schema(by_alias=True)
    schema: dict[str, Any] = _structural({k: v for k, v in raw.items() if k != "$defs"}, raw.get("$defs", {}))
    schema["x-kubernetes-validations"] = SPEC_RULES
    props = schema["properties"]
    for field in IMMUTABLE:
        props[field].setdefault("x-kubernetes-validations", []).append(
            {"rule": "self == oldSelf", "message": f"spec.{field} cannot change once the run exists"}
        )
    props["model"]["x-kubernetes-validations"] = MODEL_RULES + props["model"]["x-kubernetes-validations"]
    # Pods on a cluster share no folder, so the local default store would split the run: name one.
    schema["required"] = [*schema["required"], "storage"]
    props["storage"]["required"] = ["uri"]
    del props["storage"]["properties"]["uri"]["default"]
    return schema


def crd() -> dict[str, Any]:
    """The FederatedFineTune CustomResourceDefinition as a dict."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{PLURAL}.{API_GROUP}"},
        "spec": {
            "group": API_GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": KIND.lower(),
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": API_VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "description": "A federated fine-tuning run: clients train a PEFT adapter on "
                            "private data; an aggregator combines their updates round by round.",
                            "required": ["spec"],
                            "properties": {
                                "apiVersion": {"type": "string"},
                                "kind": {"type": "string"},
                                "metadata": {"type": "object"},
                                "spec": spec_schema(),
                                "status": STATUS_SCHEMA,
                            },
                        }
                    },
                }
            ],
        },
    }


def crd_yaml() -> str:
    return "# Generated by `fedtune crd`; do not edit.\n" + yaml.safe_dump(crd(), sort_keys=False, width=120)
