"""The README's metrics table: every family fedtune exports, with its type and labels, and nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from prometheus_client.metrics import MetricWrapperBase

from fedtune import metrics

README = Path(__file__).resolve().parents[2] / "README.md"
ROW = re.compile(r"^\| `(fedtune_[a-z0-9_]+)` \| (\w+) \| ([a-z_, ]+) \|", re.M)


def test_every_metric_family_is_documented_with_its_type_and_labels() -> None:
    documented = {
        name: (kind, [x.strip() for x in labels.split(",")]) for name, kind, labels in ROW.findall(README.read_text())
    }
    exported = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            (family,) = value.describe()
            name = family.name + ("_total" if family.type == "counter" else "")
            exported[name] = (family.type, list(value._labelnames))
    assert documented == exported
