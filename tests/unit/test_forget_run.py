"""What the operator keeps about a run ends with it: metric series, and needless status rewrites."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from prometheus_client import REGISTRY

from fedtune import metrics
from fedtune.api.status import RunStatus
from fedtune.controller.status import invalid_spec


def series_of(name: str) -> list[dict[str, str]]:
    return [s.labels for f in REGISTRY.collect() for s in f.samples if s.labels.get("name") == name]


def test_a_deleted_runs_series_are_removed_and_others_kept() -> None:
    for run in ("gone", "stays"):
        metrics.RUN_CONDITION.labels("ns", run, "Failed").set(1)
        metrics.RUN_INFO.labels("ns", run, "fedavg", "3").set(1)
        metrics.UPDATES_REJECTED.labels("ns", run, "alpha").inc()
        metrics.ROUND_SECONDS.labels("ns", run).observe(3.0)
    metrics.forget_run("ns", "gone")
    assert series_of("gone") == []
    assert {s.get("state") for s in series_of("stays")} >= {"Failed"}
    metrics.forget_run("ns", "stays")


def test_an_invalid_spec_keeps_its_transition_time_while_nothing_changes() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    first = invalid_spec(RunStatus(), ["spec.x: bad"], 1, t0)
    again = invalid_spec(first, ["spec.x: bad"], 1, t0 + timedelta(seconds=3))
    assert again == first
    changed = invalid_spec(first, ["spec.y: bad"], 2, t0 + timedelta(seconds=6))
    assert changed.patch()["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:06Z"
