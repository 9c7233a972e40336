"""reconcile() against a fake Kube: children created once, repaired when missing, held back with the reason
admission gives, removed when the run is suspended or failed; no cluster, milliseconds each."""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Any

import pytest

from fedtune.api import FederatedFineTune
from fedtune.api.status import RunStatus
from fedtune.controller.identities import PinnedKeys
from fedtune.controller.kube import Credentials
from fedtune.controller.names import client_job_name
from fedtune.controller.reconcile import job_names, reconcile, run_store
from fedtune.controller.status import compute
from tests.unit.fake_kube import FakeKube, storage_secrets
from tests.unit.runs import run

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
PARTIES = ("fedtune-aggregator", "fedtune-clinic", "fedtune-bank", "fedtune-devops")


def quickstart(**spec: Any) -> FederatedFineTune:
    """The cluster quickstart with its rounds in a memory store of its own."""
    return run(storage={"uri": f"memory://reconcile-{secrets.token_hex(4)}"}, **spec)


def ready_kube() -> FakeKube:
    return FakeKube(storage_secrets(*PARTIES))


def once(kube: FakeKube, keys: PinnedKeys, res: FederatedFineTune, old: RunStatus | None = None) -> RunStatus:
    return compute(reconcile(kube, keys, res, 1, old or RunStatus(), NOW))


def test_a_run_creates_its_children_once() -> None:
    kube, keys, res = ready_kube(), PinnedKeys(), quickstart()
    status = once(kube, keys, res)
    assert sorted(kube.created) == sorted(
        [
            *(f"Secret/quickstart-key-{p}" for p in ("aggregator", "client-clinic", "client-bank", "client-devops")),
            "ConfigMap/quickstart-spec",
            "Service/quickstart-metrics",
            *(f"Job/{name}" for name in job_names(res)),
        ]
    )
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == "ChildrenReady"
    kube.created.clear()
    status = once(kube, keys, res, status)
    reads = kube.config_map_reads
    once(kube, keys, res, status)
    assert kube.created == [] and kube.deleted == []
    assert kube.config_map_reads == reads, "the pinned keys are read once they exist"


def test_a_missing_job_is_recreated_and_nothing_else() -> None:
    kube, keys, res = ready_kube(), PinnedKeys(), quickstart()
    status = once(kube, keys, res)
    kube.created.clear()
    del kube.objects["Job", client_job_name("quickstart", "bank")]
    once(kube, keys, res, status)
    assert kube.created == ["Job/quickstart-client-bank"]
    assert kube.refused == []  # nothing that exists is posted again


@pytest.mark.parametrize(
    ("setup", "reason", "names"),
    [
        (lambda kube, mp: kube.secrets.pop("fedtune-bank"), "SecretNotFound", "spec.clients[1].secretRef"),
        (
            lambda kube, mp: kube.secrets["fedtune-clinic"].data.pop("AWS_SECRET_ACCESS_KEY"),
            "SecretInvalid",
            "spec.clients[0].secretRef",
        ),
        (lambda kube, mp: mp.setenv("FEDTUNE_ALLOWED_IMAGES", "registry.example/*"), "ImageNotAllowed", "spec.image"),
    ],
    ids=["missing-secret", "secret-without-keys", "image-not-allowed"],
)
def test_admission_failures_hold_the_run_with_their_reason(
    setup: Any, reason: str, names: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube = ready_kube()
    setup(kube, monkeypatch)
    status = once(kube, PinnedKeys(), quickstart())
    assert kube.created == []
    ready = status.condition("Ready")
    assert ready is not None and (ready.status, ready.reason) == ("False", reason)
    assert ready.message.startswith(f"{names}: ")
    assert status.state == "Pending"


def test_a_key_secret_of_another_run_holds_the_run_with_key_conflict() -> None:
    kube = ready_kube()
    kube.secrets["quickstart-key-aggregator"] = Credentials({"signing.key": "x"}, frozenset({"another-uid"}))
    status = once(kube, PinnedKeys(), quickstart())
    ready = status.condition("Ready")
    assert ready is not None and ready.reason == "KeyConflict"
    assert not [c for c in kube.created if c.startswith("Job/")]


def test_suspending_removes_the_jobs_and_resuming_brings_them_back() -> None:
    kube, keys, res = ready_kube(), PinnedKeys(), quickstart()
    status = once(kube, keys, res)
    suspended = quickstart(suspend=True).model_copy(update={"metadata": res.metadata})
    status = once(kube, keys, suspended, status)
    assert sorted(kube.deleted) == sorted(f"Job/{n}" for n in job_names(res))
    assert status.state == "Suspended" and kube.jobs("team-a", "quickstart") == {}
    kube.created.clear()
    once(kube, keys, res, status)
    assert sorted(kube.created) == sorted(f"Job/{n}" for n in job_names(res))


def test_a_failed_run_loses_its_jobs_a_succeeded_one_keeps_them() -> None:
    kube, keys, res = ready_kube(), PinnedKeys(), quickstart()
    once(kube, keys, res)
    once(kube, keys, res, RunStatus(state="Succeeded"))
    assert kube.deleted == [] and len(kube.jobs("team-a", "quickstart")) == 4
    once(kube, keys, res, RunStatus(state="Failed"))
    assert len(kube.deleted) == 4 and kube.jobs("team-a", "quickstart") == {}


def test_a_job_the_run_does_not_own_is_neither_counted_nor_deleted() -> None:
    kube, keys, res = ready_kube(), PinnedKeys(), quickstart(suspend=True)
    stranger = {
        "kind": "Job",
        "metadata": {"name": "quickstart-aggregator", "labels": {"fedtune.io/run": "quickstart"}},
    }
    kube.objects["Job", "quickstart-aggregator"] = stranger
    status = once(kube, keys, res)
    assert kube.deleted == []
    assert status.aggregator is not None and status.aggregator.state == "Pending"


def test_two_runs_whose_plain_job_names_would_collide_both_get_all_their_jobs() -> None:
    kube = FakeKube(storage_secrets("s"))
    runs = [
        quickstart(name=name, clients=[{"name": c, "data": {"uri": "s3://b/d.jsonl"}}], aggregation={"minClients": 1})
        for name, c in (("a", "b-client-c"), ("a-client-b", "c"))
    ]
    for res in runs:
        res.spec.aggregator.secret_ref = "s"
        res.spec.clients[0].secret_ref = "s"
        once(kube, PinnedKeys(), res)
    jobs = [c for c in kube.created if c.startswith("Job/")]
    assert len(jobs) == 4 and "Job/a-client-b-client-c" in jobs


def test_a_runs_storage_client_is_made_once_and_anew_when_its_credentials_change() -> None:
    res = run(storage={"uri": "s3://bucket/runs", "endpoint": "http://127.0.0.1:9"})
    secret = {"AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b"}
    first = run_store(res, secret)
    assert run_store(res, dict(secret)) is first
    assert run_store(res, {**secret, "AWS_SECRET_ACCESS_KEY": "rotated"}) is not first
