"""`fedtune baseline`: the same optimizer steps and the same held-out examples as the federated run."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from fedtune.api import load_resource
from fedtune.cli.main import app
from fedtune.federation.client import Client
from fedtune.local.baseline import scored_sha256
from fedtune.local.identities import local_ledger
from fedtune.local.report import federated_steps, read_baselines
from fedtune.local.runner import LocalRun

pytestmark = pytest.mark.slow


def test_baselines_match_the_run_and_are_compared(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "runs"
    folder = out / "tiny"
    cli = CliRunner()
    for mode in ("local", "centralized"):
        result = cli.invoke(app, ["baseline", str(tiny), "--mode", mode, "--output", str(out)])
        assert result.exit_code == 0, result.output
    console = Console(file=io.StringIO(), width=160)
    LocalRun(tiny, output=out, console=console).run(live=False)

    spec = load_resource(tiny).spec
    t, rounds = spec.training, spec.aggregation.rounds
    ledger = local_ledger(folder)
    base = read_baselines(folder)
    assert federated_steps(ledger) == rounds * spec.clients_per_round * t.local_steps == base["centralized"].steps
    assert base["local"].client_steps == {c.name: rounds * t.local_steps for c in spec.clients}

    final_round = ledger.latest_global()
    assert final_round is not None
    for c in spec.clients:
        marker = ledger.eval_marker(final_round, c.name)
        assert marker is not None
        held = Client(ledger, spec, c.name).eval_set
        for b in base.values():
            assert b.client_eval_tokens[c.name] == marker.eval_examples
            assert b.client_eval_sha256[c.name] == scored_sha256(held, t)
    for mode in base:
        records = json.loads((folder / "baselines" / mode / "metrics.json").read_text())
        assert [r["round"] for r in records] == list(range(rounds + 1))
        assert (folder / "baselines" / mode / "loss.png").read_bytes()[:4] == b"\x89PNG"

    shown = console.file.getvalue()  # type: ignore[attr-defined]
    assert "Does federating pay?" in shown and "fed. gain over local" in shown
    assert f"federated {federated_steps(ledger)}, local {rounds * t.local_steps * 3}" in shown
