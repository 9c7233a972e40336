"""A DP run on the test cluster: status shows epsilon per client and the maximum; targetEpsilon stops it."""

from __future__ import annotations

import pytest

from fedtune.privacy import epsilon
from tests.operator.conftest import Operator, Runs, tiny_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


def test_a_dp_run_reports_epsilon_per_client_and_stops_at_its_target(
    operator: Operator, runs: Runs, tiny_data: str
) -> None:
    operator.start()
    # Every client in every round, z = 3: each client's epsilon is 1.39, 2.03, 2.54 after rounds 1, 2, 3.
    e2, e3 = epsilon(3.0, 1.0, 2, 1e-5), epsilon(3.0, 1.0, 3, 1e-5)
    privacy = {"enabled": True, "clipNorm": 0.5, "noiseMultiplier": 3.0, "delta": 1e-5, "targetEpsilon": (e2 + e3) / 2}
    runs.create(tiny_run("private", privacy=privacy, aggregation={"rounds": 5, "minClients": 3}))
    status = runs.wait_state("private", "Succeeded", timeout=400)["status"]
    assert status["progress"] == "2/5"
    assert status["stoppedEarly"].startswith("privacy.targetEpsilon: round 2 would raise client")
    last = status["lastRound"]
    assert last["clientEpsilon"] == {"alpha": e2, "beta": e2, "gamma": e2}
    assert last["epsilon"] == e2
    # Under DP the status carries no client's own loss, nor their average.
    assert last.get("trainLoss") is None and last.get("evalLoss") is None and status.get("finalEvalLoss") is None
