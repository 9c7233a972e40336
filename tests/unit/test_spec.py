"""The spec: defaults, and every invalid input reported with its field path."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from fedtune.api import SpecError, parse_resource

REPO = Path(__file__).resolve().parents[2]


def resource(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "model": {"config": {"modelType": "llama", "hidden_size": 16}},
        "clients": [{"name": "a", "data": {"uri": "a.jsonl"}}, {"name": "b", "data": {"uri": "b.jsonl"}}],
    }
    base.update(spec)
    return {"apiVersion": "fedtune.io/v1alpha1", "kind": "FederatedFineTune", "metadata": {"name": "t"}, "spec": base}


def problems(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(SpecError) as e:
        parse_resource(doc)
    return e.value.problems


def test_defaults_fill_a_minimal_spec() -> None:
    spec = parse_resource(resource()).spec
    assert spec.aggregation.strategy == "fedavg"
    assert spec.clients_per_round == 2
    assert spec.peft.target_modules == ["q_proj", "v_proj"]
    assert spec.storage.uri == "file://./fedtune-runs"


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            {"clients": [{"name": "a", "data": {"uri": "x"}}, {"name": "a", "data": {"uri": "y"}}]},
            "spec.clients[1].name",
        ),
        ({"aggregation": {"minClients": 3}}, "spec.aggregation.minClients"),
        ({"aggregation": {"strategy": "fedbest"}}, "spec.aggregation.strategy"),
        ({"aggregation": {"rounds": 0}}, "spec.aggregation.rounds"),
        ({"peft": {"method": "prefix"}}, "spec.peft.method"),
        ({"peft": {"r": "eight"}}, "spec.peft.r"),
        ({"training": {"learningRate": -1}}, "spec.training.learningRate"),
        ({"clients": [{"name": "Bad_Name", "data": {"uri": "x"}}]}, "spec.clients[0].name"),
        ({"clients": [{"name": "a"}]}, "spec.clients[0].data"),
        ({"model": {}}, "spec.model"),
        ({"tokenizer": {"builtin": "words"}}, "spec.tokenizer.builtin"),
        ({"privacy": {"delta": 2}}, "spec.privacy.delta"),
        ({"aggregation": {"clientsPerRound": 5}}, "spec.aggregation.clientsPerRound"),
        ({"unknownField": 1}, "spec.unknownField"),
    ],
)
def test_invalid_field_is_named(change: dict[str, Any], expected: str) -> None:
    found = problems(resource(**change))
    assert any(p.startswith(expected) for p in found), found


def test_every_problem_is_reported_at_once() -> None:
    found = problems(resource(peft={"r": 0}, training={"batchSize": 0}))
    assert {p.split(":")[0] for p in found} == {"spec.peft.r", "spec.training.batchSize"}


def test_wrong_kind_is_named() -> None:
    doc = resource()
    doc["kind"] = "Deployment"
    assert problems(doc)[0].startswith("kind")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fedtune", *args], capture_output=True, text=True, cwd=REPO)


def test_validate_cli_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(resource()))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(resource(training={"batchSize": 0}, peft={"r": -1})))
    ok = run_cli("validate", str(good))
    assert ok.returncode == 0, ok.stderr
    failed = run_cli("validate", str(bad))
    assert failed.returncode == 1
    lines = failed.stderr.strip().splitlines()
    assert len(lines) == 2
    assert any("spec.peft.r" in ln for ln in lines) and any("spec.training.batchSize" in ln for ln in lines)
    assert "Traceback" not in failed.stderr


def test_validate_reports_yaml_syntax_and_missing_file(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    out = run_cli("validate", str(broken))
    assert out.returncode == 1 and "not valid YAML" in out.stderr and "Traceback" not in out.stderr
    missing = run_cli("validate", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and "no such file" in missing.stderr


def test_examples_are_valid() -> None:
    out = run_cli("validate", *map(str, sorted((REPO / "examples").rglob("*.yaml"))))
    assert out.returncode == 0, out.stderr
