"""The kopf handlers called as kopf calls them, with a fake Kube in the memo: what a pass writes to status,
which Events and metrics it leaves, when it deletes a run, and what deletion forgets."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import kopf
import pytest
import yaml
from kubernetes.client.exceptions import ApiException
from prometheus_client import REGISTRY

from fedtune.api.status import merged
from fedtune.controller.handlers import Passes, deleted, react, tick
from fedtune.controller.identities import PinnedKeys
from tests.unit.fake_kube import FakeKube, storage_secrets
from tests.unit.runs import QUICKSTART, UID

PARTIES = ("fedtune-aggregator", "fedtune-clinic", "fedtune-bank", "fedtune-devops")


def body(status: dict[str, Any] | None = None, **spec: Any) -> kopf.Body:
    """The quickstart as the API server sends it: rounds in a memory store of its own, `spec` fields replaced."""
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    doc["spec"].update(storage={"uri": f"memory://handlers-{secrets.token_hex(4)}"}, **spec)
    doc["metadata"] = {"name": "quickstart", "namespace": "team-a", "uid": UID, "generation": 2}
    doc["status"] = status or {}
    return kopf.Body(doc)


def memo(kube: FakeKube | None = None) -> kopf.Memo:
    return kopf.Memo(kube=kube or FakeKube(storage_secrets(*PARTIES)), pinned_keys=PinnedKeys(), passes=Passes())


def react_once(b: kopf.Body, m: kopf.Memo) -> dict[str, Any]:
    """One pass; the status patch it wrote ({} for none)."""
    patch = kopf.Patch()
    react(body=b, patch=patch, memo=m)
    return dict(patch).get("status", {})


def after(b: kopf.Body, written: dict[str, Any]) -> kopf.Body:
    """The resource once the API server has applied a status merge patch."""
    raw = dict(b)
    raw["status"] = merged(raw["status"], written)
    return kopf.Body(raw)


def sample(name: str, labels: dict[str, str]) -> float | None:
    return REGISTRY.get_sample_value(name, labels)


def test_a_pass_creates_the_children_writes_status_and_says_so() -> None:
    m = memo()
    b = body()
    written = react_once(b, m)
    assert written["state"] == "Pending" and written["observedGeneration"] == 2
    assert len([c for c in m.kube.created if c.startswith("Job/")]) == 4
    assert m.kube.events == [("Normal", "ChildrenReady", "Jobs created")]
    run = {"namespace": "team-a", "name": "quickstart"}
    assert sample("fedtune_run_condition", {**run, "state": "Pending"}) == 1
    assert sample("fedtune_run_condition", {**run, "state": "Running"}) == 0
    assert sample("fedtune_run_info", {**run, "strategy": "fedavg", "clients": "3"}) == 1


def test_status_is_written_only_when_it_changed() -> None:
    m = memo()
    b = after(b := body(), react_once(b, m))
    assert react_once(b, m) == {}, "nothing moved, nothing written"
    assert len(m.kube.events) == 1

    aggregator = "quickstart-aggregator"
    m.kube.pod_list = [
        {"metadata": {"name": f"{aggregator}-x", "labels": {"job-name": aggregator}}, "status": {"phase": "Running"}}
    ]
    written = react_once(b, m)
    assert written["state"] == "Running"
    ready = next(c for c in written["conditions"] if c["type"] == "Ready")
    assert ready["lastTransitionTime"] == b["status"]["conditions"][0]["lastTransitionTime"], "Ready stayed True"
    assert m.kube.events[-1] == ("Normal", "RoundsInProgress", "round 1 of 3")


def test_an_invalid_spec_is_reported_and_nothing_is_created() -> None:
    m = memo()
    written = react_once(body(aggregation={"minClients": 5}), m)
    assert written["state"] == "Failed"
    [failed] = written["conditions"]
    assert failed["reason"] == "InvalidSpec" and failed["message"].startswith("spec.aggregation.minClients: ")
    assert m.kube.created == []
    assert m.kube.events == [("Warning", "InvalidSpec", failed["message"])]


def test_a_run_failed_only_by_its_spec_resumes_once_fixed_and_a_finished_run_ignores_a_broken_edit() -> None:
    m = memo()
    broken = body(aggregation={"minClients": 5})
    fixed = after(body(), react_once(broken, m))
    written = react_once(fixed, m)
    assert written["state"] == "Pending" and m.kube.created and m.kube.deleted == []

    done = {"type": "Succeeded", "status": "True", "reason": "RunSucceeded", "message": "3 rounds done"}
    succeeded = {"state": "Succeeded", "conditions": [{**done, "lastTransitionTime": "2025-01-01T12:00:00Z"}]}
    assert react_once(body(succeeded, aggregation={"minClients": 5}), memo()) == {}


def test_a_finished_run_is_deleted_once_its_ttl_has_passed() -> None:
    done = (datetime.now(UTC) - timedelta(seconds=120)).isoformat()
    m = memo()
    assert react_once(body({"state": "Succeeded", "completionTime": done}, ttlSecondsAfterFinished=60), m) == {}
    assert m.kube.deleted == ["FederatedFineTune/quickstart"]

    m = memo()
    react_once(body({"state": "Succeeded", "completionTime": done}, ttlSecondsAfterFinished=600), m)
    assert m.kube.deleted == []


def test_the_timer_ignores_a_run_deleted_under_it_and_retries_other_api_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    m = memo()
    for status in (404, 500):

        def refuse(namespace: str, run: str, status: int = status) -> dict[str, Any]:
            raise ApiException(status=status, reason="test")

        monkeypatch.setattr(m.kube, "jobs", refuse)
        if status == 404:
            tick(body=body(), patch=kopf.Patch(), memo=m)
        else:
            with pytest.raises(kopf.TemporaryError, match="API error 500"):
                tick(body=body(), patch=kopf.Patch(), memo=m)


def test_deletion_forgets_the_runs_keys_and_metric_series() -> None:
    m = memo()
    b = after(b := body(), react_once(b, m))
    react_once(b, m)
    reads = m.kube.config_map_reads
    react_once(b, m)
    assert m.kube.config_map_reads == reads, "pinned keys are kept while the run exists"

    deleted(body=b, memo=m)
    assert sample("fedtune_run_condition", {"namespace": "team-a", "name": "quickstart", "state": "Pending"}) is None
    react_once(b, m)
    assert m.kube.config_map_reads == reads + 1, "a run of the same uid would read its keys afresh"


def test_a_tick_during_a_pass_of_the_same_run_does_nothing() -> None:
    m, b = memo(), body()
    with m.passes.of(UID, wait=True):
        patch = kopf.Patch()
        tick(body=b, patch=patch, memo=m)
        assert dict(patch) == {} and m.kube.created == []
    tick(body=b, patch=patch, memo=m)
    assert m.kube.created, "once the pass is over, a tick does its work"
