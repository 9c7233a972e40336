"""Clients in other clusters: a run that names a client `external` makes no pod for it, expects a key of its
own, and reports it from storage; `storage.runRoot` is a run location known before the run exists."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from fedtune.api import SpecError
from fedtune.api.status import RunStatus
from fedtune.controller import builders, gang
from fedtune.controller.reconcile import job_names
from fedtune.controller.status import Observed, Progress, compute
from fedtune.federation.protocol import RoundSummary
from tests.unit.runs import TRUST, run

NOW = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
SILO = {
    "name": "hospital",
    "external": True,
    "publicKey": TRUST.clients["devops"],
    "data": {"uri": "s3://hospital-data/notes.jsonl"},
    "resources": {"gpus": 4},
}


def with_silo(**spec: Any) -> Any:
    base = run()
    clients = [c.model_dump(by_alias=True, exclude_none=True) for c in base.spec.clients[:2]]
    return run(clients=[*clients, SILO], **spec)


def test_an_external_client_gets_no_pod_no_gpus_and_no_pod_set() -> None:
    res = with_silo(queueName="gpus")
    jobs = [m["metadata"]["name"] for m in builders.children(res, TRUST) if m["kind"] == "Job"]
    assert jobs == job_names(res) and not any("hospital" in j for j in jobs)
    assert builders.requested_gpus(res) == 2
    assert sum(s["count"] for s in gang.workload(res)["spec"]["podSets"]) == 3


@pytest.mark.parametrize(
    ("change", "field", "says"),
    [
        ({"publicKey": None}, "publicKey", "signs with a key of its own"),
        ({"secretRef": "silo-s3"}, "external", "Secrets live in its own cluster"),
        ({"data": {"uri": "s3://d/x.jsonl", "secretRef": "silo-data"}}, "external", "data.secretRef"),
    ],
)
def test_an_external_client_brings_its_key_and_keeps_its_secrets(change: dict[str, Any], field: str, says: str) -> None:
    silo = {k: v for k, v in {**SILO, **change}.items() if v is not None}
    with pytest.raises(SpecError, match=f"spec.clients\\[0\\].{field}: .*{says}"):
        run(clients=[silo])


def test_an_external_client_is_reported_from_storage() -> None:
    res = with_silo()
    observed = Observed(resource=res, generation=1, now=NOW, old=RunStatus())
    hospital = compute(observed).clients[-1]  # type: ignore[index]
    assert (hospital.external, hospital.state, hospital.signed, hospital.last_round) == (True, "Pending", False, None)

    observed.progress = Progress(committed=1, signed={"hospital": True})
    joined = compute(observed)
    assert joined.clients[-1].signed is True  # type: ignore[index]

    last = RoundSummary(round=3, participants=["clinic", "hospital"], seconds=1.0, bytes=10)
    observed = Observed(resource=res, generation=1, now=NOW, old=joined, progress=Progress(committed=4, last=last))
    taking_part = compute(observed)
    hospital = taking_part.clients[-1]  # type: ignore[index]
    assert (hospital.state, hospital.last_round, hospital.signed) == ("Running", 3, True)

    skipped = RoundSummary(round=4, participants=["clinic"], seconds=1.0, bytes=10)
    observed = Observed(
        resource=res, generation=1, now=NOW, old=taking_part, progress=Progress(committed=5, last=skipped)
    )
    assert compute(observed).clients[-1].last_round == 3, "a round it sat out keeps its last one"  # type: ignore[index]


def test_run_root_is_the_one_given_or_one_with_the_uid() -> None:
    assert builders.run_root(run()).endswith(f"/team-a/quickstart-{run().metadata.uid}")
    storage = {**run().spec.storage.model_dump(by_alias=True, exclude_none=True), "runRoot": "studies/cardio-2026"}
    assert builders.run_root(run(storage=storage)) == "s3://fedtune/runs/studies/cardio-2026"


@pytest.mark.parametrize("bad", ["../other", "a//b", "/abs", "Upper", "a/../b", "a/"])
def test_a_run_root_cannot_climb_out_of_the_store(bad: str) -> None:
    storage = {**run().spec.storage.model_dump(by_alias=True, exclude_none=True), "runRoot": bad}
    with pytest.raises(SpecError, match=r"spec\.storage\.runRoot"):
        run(storage=storage)


def test_an_external_client_left_out_is_pending_and_stays_signed_and_settled() -> None:
    res = with_silo()
    took_part = RoundSummary(round=2, participants=["clinic", "hospital"], seconds=1.0, bytes=10)
    running = compute(Observed(resource=res, generation=1, now=NOW, progress=Progress(committed=3, last=took_part)))
    left_out = RoundSummary(round=3, participants=["clinic"], excluded={"hospital": "n"}, seconds=1.0, bytes=10)
    observed = Observed(resource=res, generation=1, now=NOW, old=running, progress=Progress(committed=4, last=left_out))
    hospital = compute(observed).clients[-1]  # type: ignore[index]
    assert (hospital.state, hospital.last_round, hospital.signed) == ("Pending", 2, True)
    done = running.model_copy(
        update={"clients": [*running.clients[:-1], hospital.model_copy(update={"state": "Succeeded"})]}
    )  # type: ignore[index]
    unreachable = Observed(resource=res, generation=1, now=NOW, old=done, storage_error="unreachable")
    assert compute(unreachable).clients[-1].state == "Succeeded"  # type: ignore[index]
