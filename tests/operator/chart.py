"""The Helm chart as the tests use it: the helm binary the harness built, and rendered objects."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.cluster.harness import build

CHART = Path(__file__).resolve().parents[2] / "charts" / "fedtune"
DASHBOARD = CHART / "dashboards" / "fedtune.json"


def helm(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    path = build.binaries()["helm"]
    if not path.is_file():
        pytest.skip("helm not built: run `make cluster-deps`")
    return subprocess.run([str(path), *args], capture_output=True, text=True, check=check, timeout=120)


def render(*args: str, namespace: str = "fedtune-system") -> list[dict[str, Any]]:
    out = helm("template", "ft", str(CHART), "--namespace", namespace, *args).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]
