"""Every wait has a bound and an outcome: a selected client that never answers fails its round, is left
out of sampling until it restarts, and a run that cannot reach minClients fails with the reason."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.federation.verify import verify_run
from fedtune.local.identities import local_ledger
from tests.federation.conftest import tiny_resource, write_data
from tests.federation.test_kill_and_resume import Fleet, wait

pytestmark = pytest.mark.slow


def fleet_for(tmp_path: Path, **aggregation: object) -> Fleet:
    write_data(tmp_path / "data")
    doc = tiny_resource(tmp_path / "data", aggregation={"roundTimeoutSeconds": 3, **aggregation})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    (tmp_path / "logs").mkdir()
    return Fleet(spec, tmp_path / "root", tmp_path / "logs")


@pytest.fixture
def stopped() -> Iterator[list[Fleet]]:
    fleets: list[Fleet] = []
    yield fleets
    for f in fleets:
        f.stop()


def summaries(ledger: Ledger) -> list[p.RoundSummary]:
    latest = ledger.latest_global() or 0
    return [s for r in range(latest) if (s := ledger.summary(r)) is not None]


def test_a_client_that_never_answers_fails_its_round_and_is_left_out_until_it_restarts(
    tmp_path: Path, stopped: list[Fleet]
) -> None:
    # Long enough that a restarted client answers its first round even on a loaded machine: one that did
    # not would be left out again, and no round would have everyone back.
    f = fleet_for(
        tmp_path,
        rounds=4,
        clientsPerRound=2,
        minClients=2,
        overSelection=1,
        maxFailedRounds=100,
        roundTimeoutSeconds=15,
    )
    stopped.append(f)
    ledger = local_ledger(f.root)
    f.start("aggregator")
    f.start("alpha")  # beta and gamma are selected but do not run yet
    wait(lambda: any(s.excluded for s in summaries(ledger)), 120, "a round to exclude the silent clients")
    first = summaries(ledger)[0]
    assert first.failed == "1 valid updates, fewer than minClients=2"
    assert set(first.excluded) == {"beta", "gamma"} and first.participants == []
    # Both restart: each writes a new ready record, and is sampled again from the next round on.
    f.start("beta")
    f.start("gamma")
    f.wait_all(timeout=300)
    final = ledger.final()
    assert final is not None and final.failed is None and final.rounds == 4
    later = summaries(ledger)
    back = next(s.round for s in later if not s.excluded)
    assert set(ledger.global_marker(back + 1).selected) == {"alpha", "beta", "gamma"}  # type: ignore[union-attr]
    assert sum(s.failed is not None for s in later) == later[-1].failed_total >= 1
    assert all(len(s.participants) == 2 for s in later if s.failed is None)  # the first two valid updates win
    verify_run(ledger)


def test_a_run_that_cannot_reach_min_clients_fails_with_the_reason(tmp_path: Path, stopped: list[Fleet]) -> None:
    f = fleet_for(tmp_path, rounds=3, minClients=3, maxFailedRounds=1)
    stopped.append(f)
    ledger = local_ledger(f.root)
    f.start("aggregator")
    f.start("alpha")
    f.start("beta")  # gamma never answers: no round can have 3 valid updates
    f.wait_all(timeout=300)
    final = ledger.final()
    assert final is not None and final.rounds == 0
    assert final.failed == "aggregation.maxFailedRounds: 2 rounds in a row failed (the limit is 1)"
    assert [s.failed_streak for s in summaries(ledger)] == [1, 2]
    verify_run(ledger)
