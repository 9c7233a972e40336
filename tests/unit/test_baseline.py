"""The baselines' step arithmetic and their summaries on disk, without training."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from fedtune.api.spec import TrainingSpec
from fedtune.local.baseline import share, step_rate
from fedtune.local.report import BASELINES, BaselineSummary, baseline_key, read_baselines
from fedtune.training.schedule import learning_rate
from tests.unit.runs import run


@pytest.mark.parametrize(("total", "parts"), [(12, 3), (10, 3), (2, 5), (0, 4), (7, 1)])
def test_shares_add_up_and_differ_by_at_most_one(total: int, parts: int) -> None:
    shares = [share(total, parts, i) for i in range(parts)]
    assert sum(shares) == total
    assert max(shares) - min(shares) <= 1


def test_a_round_of_more_steps_keeps_the_federations_schedule() -> None:
    """Centralized, a round is clientsPerRound × localSteps steps: every local step's rate, each that often."""
    t = TrainingSpec(local_steps=4, learning_rate=0.1, lr_schedule="cosine", warmup_steps=2)
    rounds, per_round = 3, 3
    for r in range(rounds):
        k = per_round * t.local_steps
        rates = [step_rate(t, rounds, r, k, i) for i in range(k)]
        assert rates == [learning_rate(t, rounds, r, i // per_round) for i in range(k)]
    assert step_rate(t, rounds, 0, t.local_steps, 3) == learning_rate(t, rounds, 0, 3)  # local: the client's own


def summary(**changes: object) -> dict[str, object]:
    s = BaselineSummary("local", 0, "k", 4, {"a": 4}, {"a": 1.5}, {"a": 10}, {"a": "d"})
    return {**s.__dict__, **changes}


def test_a_summary_from_another_version_is_left_out_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for mode, raw in (("local", summary(extra=1)), ("centralized", {"mode": "centralized"})):
        (tmp_path / BASELINES / mode).mkdir(parents=True)
        (tmp_path / BASELINES / mode / "summary.json").write_text(json.dumps(raw))
    with caplog.at_level(logging.WARNING):
        found = read_baselines(tmp_path)
    assert list(found) == ["local"] and found["local"].client_eval_loss == {"a": 1.5}
    assert "centralized/summary.json: not a baseline summary (KeyError" in caplog.text


def test_a_summary_is_replaced_whole(tmp_path: Path) -> None:
    folder = tmp_path / BASELINES / "local"
    folder.mkdir(parents=True)
    BaselineSummary(**summary()).write(folder)  # type: ignore[arg-type]
    BaselineSummary(**summary(steps=8)).write(folder)  # type: ignore[arg-type]
    assert sorted(p.name for p in folder.iterdir()) == ["summary.json"]
    assert read_baselines(tmp_path)["local"].steps == 8


def test_a_baseline_stays_comparable_when_only_credentials_change() -> None:
    spec = run(model={"name": "org/model", "tokenSecretRef": "hub-token"}).spec
    rotated = spec.model_copy(deep=True)
    rotated.clients[0].data.secret_ref = "rotated-data-credentials"
    rotated.model.token_secret_ref = "rotated-hub-token"
    longer = spec.model_copy(deep=True)
    longer.training.local_steps += 1
    assert baseline_key(rotated) == baseline_key(spec) != baseline_key(longer)
