"""The CRD: generated from the spec models, committed as generated, documented and readable in kubectl."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from fedtune.api.crd import crd, fedclient_crd
from fedtune.cli.main import app

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "crds" / "fedtune.io_federatedfinetunes.yaml"


def version() -> dict[str, Any]:
    versions: list[dict[str, Any]] = crd()["spec"]["versions"]
    assert len(versions) == 1
    return versions[0]


def properties(node: dict[str, Any], path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every (path, schema) of a property under node, through objects, list items and maps."""
    for key, child in (node.get("properties") or {}).items():
        yield f"{path}.{key}", child
        yield from properties(child, f"{path}.{key}")
    if isinstance(node.get("items"), dict):
        yield from properties(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from properties(node["additionalProperties"], f"{path}{{}}")


@pytest.mark.parametrize(
    ("args", "committed"),
    [([], COMMITTED), (["--kind", "FederatedClient"], REPO / "crds" / "fedtune.io_federatedclients.yaml")],
)
def test_committed_crds_are_what_fedtune_crd_prints(args: list[str], committed: Path) -> None:
    result = CliRunner().invoke(app, ["crd", *args])
    assert result.exit_code == 0, result.output
    assert committed.read_text() == result.output, (
        f"{committed.relative_to(REPO)} is stale: run `fedtune crd {' '.join(args)} > crds/{committed.name}`"
    )


def test_federated_client_is_documented_and_lists_like_a_run() -> None:
    fedclient = fedclient_crd()
    names = fedclient["spec"]["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "FederatedClient",
        "federatedclients",
        ["fedclient"],
    )
    version = fedclient["spec"]["versions"][0]
    schema = version["schema"]["openAPIV3Schema"]["properties"]
    undocumented = [p for p, node in properties(schema["spec"], "spec") if not node.get("description")]
    undocumented += [p for p, node in properties(schema["status"], "status") if not node.get("description")]
    assert not undocumented, undocumented
    columns = [c["name"] for c in version["additionalPrinterColumns"]]
    assert columns[:2] == ["State", "Round"] and "Age" in columns


def test_chart_crds_are_copies_of_crds() -> None:
    """helm installs the chart's copies; they must not drift from the generated ones."""
    chart = REPO / "charts" / "fedtune" / "crds"
    source = sorted(p.name for p in (REPO / "crds").glob("*.yaml"))
    assert sorted(p.name for p in chart.glob("*.yaml")) == source
    for name in source:
        assert (chart / name).read_bytes() == (REPO / "crds" / name).read_bytes(), (
            f"charts/fedtune/crds/{name} differs from crds/{name}: copy it again"
        )


def test_every_spec_property_has_a_description() -> None:
    """Descriptions are what `kubectl explain fft.spec...` shows."""
    spec = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]
    found = dict(properties(spec, "spec"))
    assert "spec.aggregation.strategy" in found and "spec.clients[].data.uri" in found
    assert "spec.clients[].tolerations[].effect" in found
    missing = [path for path, node in found.items() if not str(node.get("description", "")).strip()]
    assert not missing, f"properties without a description: {missing}"


def test_every_status_property_has_a_description() -> None:
    """`kubectl explain fft.status` documents every field the operator writes."""
    status = version()["schema"]["openAPIV3Schema"]["properties"]["status"]
    found = dict(properties(status, "status"))
    assert {"status.lastRound.clientEpsilon", "status.adapterSHA256", "status.conditions[].lastTransitionTime"} <= set(
        found
    )
    missing = [path for path, node in found.items() if not str(node.get("description", "")).strip()]
    assert not missing, f"properties without a description: {missing}"
    assert "x-kubernetes-preserve-unknown-fields" not in status, "the schema names every field"


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in version()["additionalPrinterColumns"]}
    assert list(columns) == ["State", "Round", "Clients", "GPUs", "Strategy", "Age"]
    assert columns["Age"] == {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"}
    assert columns["Strategy"]["jsonPath"] == ".spec.aggregation.strategy"
    status = version()["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    for name in ("State", "Round", "Clients", "GPUs"):
        field = columns[name]["jsonPath"].removeprefix(".status.")
        assert field in status, f"column {name} reads .status.{field}, which the status schema lacks"
        assert status[field]["type"] == columns[name]["type"]


def test_names_short_names_and_category() -> None:
    names = crd()["spec"]["names"]
    assert names["shortNames"] == ["fft", "fedtune"]
    assert names["categories"] == ["fedtune"]
    assert (names["kind"], names["plural"]) == ("FederatedFineTune", "federatedfinetunes")


@pytest.mark.parametrize("field", ["peft", "clients", "aggregation", "storage", "model"])
def test_run_defining_fields_are_immutable(field: str) -> None:
    spec = version()["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
    rules = [r["rule"] for r in spec[field].get("x-kubernetes-validations", [])]
    assert "self == oldSelf" in rules
    assert "x-kubernetes-validations" not in spec["suspend"]


def test_committed_crd_parses_as_one_document() -> None:
    docs = list(yaml.safe_load_all(COMMITTED.read_text()))
    assert docs == [crd()]
