"""`fedtune baseline`: the same optimizer steps and the same held-out examples as the federated run."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from rich.console import Console
from typer.testing import CliRunner

from fedtune.api import load_resource
from fedtune.cli.main import app
from fedtune.federation.client import load_splits
from fedtune.local.baseline import scored_sha256
from fedtune.local.identities import local_ledger
from fedtune.local.report import federated_steps, read_baselines
from fedtune.local.runner import LocalRun
from fedtune.training.tokenizer import build_tokenizer
from tests.federation.conftest import tiny_resource, write_data

pytestmark = pytest.mark.slow


def spec_file(tmp_path: Path, **overrides: Any) -> Path:
    write_data(tmp_path / "data")
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_resource(tmp_path / "data", **overrides)))
    return path


def baseline(spec: Path, mode: str, out: Path) -> None:
    result = CliRunner().invoke(app, ["baseline", str(spec), "--mode", mode, "--output", str(out)])
    assert result.exit_code == 0, result.output


def test_baselines_match_the_run_and_are_compared(tmp_path: Path) -> None:
    # Two of three clients a round and two micro-batches a step: steps are optimizer steps, shared out.
    tiny = spec_file(
        tmp_path,
        training={"localSteps": 3, "gradientAccumulation": 2},
        aggregation={"rounds": 2, "clientsPerRound": 2},
    )
    out = tmp_path / "runs"
    folder = out / "tiny"
    for mode in ("local", "centralized"):
        baseline(tiny, mode, out)
    console = Console(file=io.StringIO(), width=200)
    LocalRun(tiny, output=out, console=console).run(live=False)

    spec = load_resource(tiny).spec
    t, rounds = spec.training, spec.aggregation.rounds
    ledger = local_ledger(folder)
    base = read_baselines(folder)
    planned = rounds * 2 * t.local_steps
    assert federated_steps(ledger) == planned == base["centralized"].steps == base["local"].steps
    assert base["local"].client_steps == {c.name: planned // len(spec.clients) for c in spec.clients}

    final_round = ledger.latest_global()
    assert final_round is not None
    tokenizer = build_tokenizer(spec)
    for c in spec.clients:
        marker = ledger.eval_marker(final_round, c.name)
        assert marker is not None
        held = load_splits(spec, c.name, tokenizer)[1]
        for b in base.values():
            assert b.client_eval_tokens[c.name] == marker.eval_examples
            assert b.client_eval_sha256[c.name] == scored_sha256(held, t)
    for mode in base:
        records = json.loads((folder / "baselines" / mode / "metrics.json").read_text())
        assert [r["round"] for r in records] == list(range(rounds + 1))
        assert (folder / "baselines" / mode / "loss.png").read_bytes()[:4] == b"\x89PNG"

    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "Does federating pay?" in shown and "fed. gain over local" in shown
    assert f"federated {planned}, local {planned}, centralized {planned}" in shown
    assert "fewer steps" not in shown


def test_a_one_client_run_is_its_local_baseline(tmp_path: Path) -> None:
    """FedAvg over one client applies its update whole: the same init, batches, rates and AdamW restarts
    as the local baseline, so both end on the same adapter and score the same held-out loss."""
    tiny = spec_file(tmp_path, aggregation={"rounds": 2, "minClients": 1, "clientsPerRound": 1})
    resource = yaml.safe_load(tiny.read_text())
    resource["spec"]["clients"] = resource["spec"]["clients"][:1]
    tiny.write_text(yaml.safe_dump(resource))
    out = tmp_path / "runs"
    baseline(tiny, "local", out)
    final = LocalRun(tiny, output=out, console=Console(file=io.StringIO())).run(live=False)
    (local,) = read_baselines(out / "tiny")["local"].client_eval_loss.items()
    assert final.client_eval_loss[local[0]] == pytest.approx(local[1], rel=1e-5)


def test_a_baseline_for_another_spec_is_not_compared(tmp_path: Path) -> None:
    tiny = spec_file(tmp_path, training={"localSteps": 2}, aggregation={"rounds": 1})
    out = tmp_path / "runs"
    baseline(tiny, "local", out)
    changed = yaml.safe_load(tiny.read_text())
    changed["spec"]["training"]["localSteps"] = 3
    tiny.write_text(yaml.safe_dump(changed))
    console = Console(file=io.StringIO(), width=200)
    LocalRun(tiny, output=out, console=console).run(live=False)
    assert "Does federating pay?" not in console.file.getvalue()  # type: ignore[attr-defined]
