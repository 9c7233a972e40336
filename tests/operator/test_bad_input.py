"""The API server rejects invalid runs at admission, naming the field; no operator needs to run.

Each case changes one part of a valid resource, so a rejection can only come from that change.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.harness.cluster import Cluster

pytestmark = pytest.mark.cluster

TWO_CLIENTS = [
    {"name": "a", "data": {"uri": "s3://fedtune/a.jsonl"}},
    {"name": "b", "data": {"uri": "s3://fedtune/b.jsonl"}},
]


def resource(name: str, **spec: Any) -> dict[str, Any]:
    """A small valid run whose top-level spec fields are replaced (a value of None removes the field)."""
    base: dict[str, Any] = {
        "model": {"config": {"modelType": "llama", "hidden_size": 16}},
        "storage": {"uri": "s3://fedtune/runs", "secretRef": "fedtune-s3"},
        "aggregation": {"rounds": 2, "minClients": 1},
        "clients": TWO_CLIENTS,
    }
    base.update(spec)
    body = {k: v for k, v in base.items() if v is not None}
    return {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": name}, "spec": body}


CASES: list[tuple[str, dict[str, Any], str, str]] = [
    # (case, spec fields, the field the error names, what the error says)
    ("r-not-an-integer", {"peft": {"r": "eight"}}, "spec.peft.r", "must be of type integer"),
    ("suspend-not-a-boolean", {"suspend": "yes"}, "spec.suspend", "must be of type boolean"),
    ("zero-rounds", {"aggregation": {"rounds": 0}}, "spec.aggregation.rounds", "greater than or equal to 1"),
    ("negative-learning-rate", {"training": {"learningRate": -1}}, "spec.training.learningRate", "greater than 0"),
    ("delta-above-one", {"privacy": {"delta": 2}}, "spec.privacy.delta", "less than 1"),
    ("trim-half", {"aggregation": {"trimFraction": 0.5}}, "spec.aggregation.trimFraction", "less than 0.5"),
    ("backoff-too-high", {"backoffLimit": 101}, "spec.backoffLimit", "less than or equal to 100"),
    ("unknown-strategy", {"aggregation": {"strategy": "fedbest"}}, "spec.aggregation.strategy", '"fedbest"'),
    ("unknown-peft-method", {"peft": {"method": "prefix"}}, "spec.peft.method", 'supported values: "lora"'),
    ("unknown-dtype", {"model": {"name": "gpt2", "dtype": "int4"}}, "spec.model.dtype", "should match"),
    (
        "duplicate-client-names",
        {"clients": [TWO_CLIENTS[0], {**TWO_CLIENTS[1], "name": "a"}]},
        "spec.clients",
        'duplicate client name "a"',
    ),
    (
        "min-clients-above-clients",
        {"aggregation": {"minClients": 3}},
        "spec.aggregation.minClients",
        "must not exceed the number of clients",
    ),
    (
        "clients-per-round-above-clients",
        {"aggregation": {"clientsPerRound": 3}},
        "spec.aggregation.clientsPerRound",
        "must not exceed the number of clients",
    ),
    (
        "min-clients-above-clients-per-round",
        {"aggregation": {"clientsPerRound": 1, "minClients": 2}},
        "spec.aggregation.minClients",
        "must not exceed clientsPerRound",
    ),
    (
        "privacy-with-a-robust-strategy",
        {"aggregation": {"strategy": "krum"}, "privacy": {"enabled": True}},
        "spec.privacy.enabled",
        "needs a mean-based strategy",
    ),
    ("no-storage", {"storage": None}, "spec.storage", "Required value"),
    ("no-storage-uri", {"storage": {"secretRef": "fedtune-s3"}}, "spec.storage.uri", "Required value"),
    ("empty-storage-uri", {"storage": {"uri": ""}}, "spec.storage.uri", "at least 1 chars"),
    ("no-clients", {"clients": None}, "spec.clients", "Required value"),
    ("empty-clients", {"clients": []}, "spec.clients", "at least 1 items"),
    ("client-without-data-uri", {"clients": [{"name": "a", "data": {}}]}, "spec.clients[0].data.uri", "Required"),
    (
        "bad-client-name",
        {"clients": [{**TWO_CLIENTS[0], "name": "Bad_Name"}]},
        "spec.clients[0].name",
        "should match",
    ),
    ("client-name-too-long", {"clients": [{**TWO_CLIENTS[0], "name": "a" * 41}]}, "spec.clients[0].name", "40"),
    (
        "negative-gpus",
        {"clients": [{**TWO_CLIENTS[0], "resources": {"gpus": -1}}]},
        "spec.clients[0].resources.gpus",
        "greater than or equal to 0",
    ),
    (
        "bad-toleration-operator",
        {"clients": [{**TWO_CLIENTS[0], "tolerations": [{"operator": "Maybe"}]}]},
        "spec.clients[0].tolerations[0].operator",
        "should match",
    ),
    ("model-with-neither-name-nor-config", {"model": {"dtype": "float32"}}, "spec.model", "exactly one of name"),
    ("model-with-name-and-config", {"model": {"name": "gpt2", "config": {"a": 1}}}, "spec.model", "exactly one"),
    ("unknown-field", {"bogusField": 1}, "spec.bogusField", "unknown field"),
    ("unknown-nested-field", {"peft": {"rank": 8}}, "spec.peft.rank", "unknown field"),
    (
        "too-many-target-modules",
        {"peft": {"targetModules": [f"m{i}" for i in range(65)]}},
        "spec.peft.targetModules",
        "at most 64 items",
    ),
    ("no-target-modules", {"peft": {"targetModules": []}}, "spec.peft.targetModules", "at least 1 items"),
    (
        "krum-with-too-few-updates",
        {"aggregation": {"strategy": "krum", "byzantineClients": 1, "minClients": 2}},
        "spec.aggregation.minClients",
        "krum needs minClients >= 2*byzantineClients + 3",
    ),
    (
        "bulyan-with-too-few-updates",
        {
            "aggregation": {"strategy": "bulyan", "byzantineClients": 1, "minClients": 6},
            "clients": [{"name": f"c{i}", "data": {"uri": f"s3://fedtune/{i}.jsonl"}} for i in range(7)],
        },
        "spec.aggregation.minClients",
        "bulyan needs minClients >= 4*byzantineClients + 3",
    ),
    ("ftp-storage", {"storage": {"uri": "ftp://host/runs"}}, "spec.storage.uri", "unsupported storage scheme"),
    (
        "ftp-data",
        {"clients": [{"name": "a", "data": {"uri": "ftp://host/a.jsonl"}}]},
        "spec.clients[0].data.uri",
        "unsupported storage scheme",
    ),
    (
        "ftp-eval-data",
        {"clients": [{"name": "a", "data": {"uri": "s3://fedtune/a.jsonl", "evalUri": "ftp://host/e.jsonl"}}]},
        "spec.clients[0].data.evalUri",
        "unsupported storage scheme",
    ),
    (
        "client-named-aggregator",
        {"clients": [{**TWO_CLIENTS[0], "name": "aggregator"}]},
        "spec.clients",
        "'aggregator' is the coordinator's party name",
    ),
    (
        "over-selection-above-clients",
        {"aggregation": {"clientsPerRound": 2, "overSelection": 1}},
        "spec.aggregation.overSelection",
        "clientsPerRound + overSelection must not exceed the number of clients",
    ),
    (
        "privacy-with-max-update-norm",
        {"privacy": {"enabled": True}, "aggregation": {"maxUpdateNorm": 5}},
        "spec.aggregation.maxUpdateNorm",
        "leave maxUpdateNorm unset",
    ),
    (
        "tokenizer-with-name-and-builtin",
        {"tokenizer": {"name": "gpt2", "builtin": "bytes"}},
        "spec.tokenizer",
        "set at most one of name or builtin",
    ),
    (
        "public-key-without-its-secret",
        {"aggregator": {"publicKey": "ed25519:" + "A" * 43 + "="}},
        "spec.aggregator",
        "publicKey and signingKeySecretRef go together",
    ),
    (
        "malformed-public-key",
        {"aggregator": {"publicKey": "ssh-ed25519 AAAA"}},
        "spec.aggregator.publicKey",
        "should match",
    ),
]


@pytest.fixture(scope="module")
def ns(crds: Cluster) -> Iterator[str]:
    """One namespace for the module: rejected resources leave nothing behind to isolate."""
    name = f"bad-input-{secrets.token_hex(3)}"
    crds.core().create_namespace({"metadata": {"name": name}})
    try:
        yield name
    finally:
        crds.core().delete_namespace(name)


def apply(cluster: Cluster, ns: str, doc: dict[str, Any], folder: Path) -> tuple[int, str]:
    """`kubectl apply` with strict field validation; (exit code, output)."""
    path = folder / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    done = cluster.kubectl("apply", "--validate=strict", "-n", ns, "-f", str(path), check=False)
    return done.returncode, done.stdout + done.stderr


def test_the_valid_base_is_accepted(crds: Cluster, ns: str, tmp_path: Path) -> None:
    """Without this, every rejection below could be the base's fault."""
    code, out = apply(crds, ns, resource("valid-base"), tmp_path)
    assert code == 0, out


@pytest.mark.parametrize(("case", "spec", "field", "says"), CASES, ids=[c[0] for c in CASES])
def test_invalid_run_is_rejected_naming_the_field(
    crds: Cluster, ns: str, tmp_path: Path, case: str, spec: dict[str, Any], field: str, says: str
) -> None:
    code, out = apply(crds, ns, resource(case, **spec), tmp_path)
    assert code != 0, f"{case} was accepted:\n{out}"
    line = next((ln for ln in out.splitlines() if field in ln), None)
    assert line is not None, f"no line names {field}:\n{out}"
    assert says in line, out
    found = crds.kubectl("get", "fft", case, "-n", ns, "--ignore-not-found", "-o", "name").stdout
    assert found == ""


def test_run_defining_fields_are_immutable_but_suspend_is_not(crds: Cluster, ns: str, tmp_path: Path) -> None:
    doc = resource("immutable", peft={"r": 8})
    assert apply(crds, ns, doc, tmp_path)[0] == 0

    changed = resource("immutable", peft={"r": 16})
    code, out = apply(crds, ns, changed, tmp_path)
    assert code != 0 and "spec.peft" in out and "cannot change once the run exists" in out, out

    code, out = apply(crds, ns, resource("immutable", peft={"r": 8}, clients=TWO_CLIENTS[:1]), tmp_path)
    assert code != 0 and "spec.clients cannot change" in out, out

    code, out = apply(crds, ns, resource("immutable", peft={"r": 8}, queueName="gpus"), tmp_path)
    assert code != 0 and "spec.queueName cannot be set, changed or removed" in out, out

    code, out = apply(crds, ns, resource("immutable", peft={"r": 8}, suspend=True), tmp_path)
    assert code == 0, out
    stored = yaml.safe_load(crds.kubectl("get", "fft", "immutable", "-n", ns, "-o", "yaml").stdout)
    assert stored["spec"]["suspend"] is True
    assert stored["spec"]["peft"]["r"] == 8
