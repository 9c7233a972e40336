"""A parsed FederatedFineTune as the operator sees it, for the pure controller tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from fedtune.api import FederatedFineTune, parse_resource

QUICKSTART = Path(__file__).resolve().parents[2] / "examples" / "cluster" / "quickstart.yaml"
UID = "0b7f5c8e-6a1d-4f2e-9c3b-5d8e7f6a1b2c"


def run(name: str = "quickstart", labels: dict[str, str] | None = None, **spec: Any) -> FederatedFineTune:
    """The cluster quickstart (three clients on GPU pools, an S3 secret) with spec fields replaced."""
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"].update(spec)
    doc["metadata"] = {"name": name, "namespace": "team-a", "uid": UID, "labels": labels or {}}
    return parse_resource(doc)
