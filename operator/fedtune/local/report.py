"""What a finished (or running) run has to show: per-round records, the loss plot, the closing table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.federation.records import Ledger

BASELINES = "baselines"  # <run folder>/baselines/<mode>/: what `fedtune baseline` writes


class Mode(StrEnum):
    """A baseline: one adapter per client on its own data, or one on all clients' data pooled."""

    LOCAL = "local"
    CENTRALIZED = "centralized"


@dataclass(frozen=True)
class BaselineSummary:
    """A baseline's result (summary.json): its optimizer steps and each client's held-out evaluation.

    `client_eval_sha256` digests the token ids scored, so a reader can check every trainer used the same.
    """

    mode: str
    seed: int
    steps: int
    client_steps: dict[str, int]
    client_eval_loss: dict[str, float]
    client_eval_tokens: dict[str, int]
    client_eval_sha256: dict[str, str]

    def write(self, folder: Path) -> Path:
        path = folder / "summary.json"
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path


def read_baselines(folder: Path) -> dict[str, BaselineSummary]:
    """The baselines written beside the run in `folder`, by mode."""
    out = {}
    for mode in Mode:
        path = folder / BASELINES / mode / "summary.json"
        if path.exists():
            out[str(mode)] = BaselineSummary(**json.loads(path.read_text()))
    return out


def federated_steps(ledger: Ledger) -> int:
    """Optimizer steps the run's clients took in all: the sum over rounds of each aggregated update's steps."""
    total = 0
    for r in range(ledger.latest_global() or 0):
        s = ledger.summary(r)
        for c in s.participants if s else []:
            m = ledger.update_marker(r, c)
            total += m.steps if m else 0
    return total


def round_records(ledger: Ledger) -> list[dict[str, Any]]:
    """One record per closed round (round, participants, train_loss, eval_loss, seconds, bytes), then the
    final global's evaluation as a last record with no training."""
    out: list[dict[str, Any]] = []
    latest = ledger.latest_global() or 0
    for r in range(latest):
        s = ledger.summary(r)
        if s is None:
            continue
        out.append(
            {
                "round": s.round,
                "participants": s.participants,
                "rejected": [x.client for x in s.rejected],
                "train_loss": s.train_loss,
                "eval_loss": s.eval_loss,
                "seconds": round(s.seconds, 3),
                "bytes": s.bytes,
                "epsilon": s.epsilon,
            }
        )
    final = ledger.final()
    if final is not None:
        out.append(
            {
                "round": final.rounds,
                "participants": sorted(final.client_eval_loss),
                "rejected": [],
                "train_loss": None,
                "eval_loss": final.eval_loss,
                "seconds": 0.0,
                "bytes": 0,
                "epsilon": out[-1]["epsilon"] if out else None,
            }
        )
    return out


def write_metrics(records: list[dict[str, Any]], folder: Path) -> Path:
    path = folder / "metrics.json"
    path.write_text(json.dumps(records, indent=2) + "\n")
    return path


def plot_loss(records: list[dict[str, Any]], folder: Path) -> Path:
    """loss.png: training and evaluation loss per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    train = [(r["round"], r["train_loss"]) for r in records if r["train_loss"] is not None]
    evals = [(r["round"], r["eval_loss"]) for r in records if r["eval_loss"] is not None]
    if train:
        ax.plot(*zip(*train, strict=True), marker="o", label="train loss (clients, during the round)")
    if evals:
        ax.plot(*zip(*evals, strict=True), marker="s", label="eval loss (global entering the round)")
    ax.set_xlabel("round")
    ax.set_ylabel("loss (nats per token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = folder / "loss.png"
    fig.savefig(path)
    plt.close(fig)
    return path


def client_table(ledger: Ledger) -> Table:
    """Each client's eval loss on its own held-out split: the initial global against the final one."""
    table = Table(title="Eval loss per client (held-out split)")
    for col in ("client", "before round 0", "final", "change"):
        table.add_column(col, justify="left" if col == "client" else "right")
    first = ledger.summary(0)
    final = ledger.final()
    before = {c: m.eval_loss for c, m in first.client_metrics.items()} if first else {}
    after = final.client_eval_loss if final else {}
    for c in sorted(set(before) | set(after)):
        b, a = before.get(c), after.get(c)
        change = f"{(a - b) / b:+.1%}" if a is not None and b else "-"
        table.add_row(c, _f(b), _f(a), change)
    return table


def baseline_table(ledger: Ledger, folder: Path) -> Table | None:
    """Per client, the final eval loss of local-only training, the federation and centralized training;
    None when no baseline was run. Gain: how much lower the federated loss is than local-only."""
    found = read_baselines(folder)
    if not found:
        return None
    final = ledger.final()
    fed = final.client_eval_loss if final else {}
    local = found["local"].client_eval_loss if "local" in found else {}
    central = found["centralized"].client_eval_loss if "centralized" in found else {}
    steps = ", ".join(f"{m} {b.steps}" for m, b in found.items())
    table = Table(title="Does federating pay? Eval loss per client (held-out split)")
    table.caption = f"optimizer steps: federated {federated_steps(ledger)}, {steps}"
    for col in ("client", "local-only", "federated", "centralized", "fed. gain over local", "fed. vs centralized"):
        table.add_column(col, justify="left" if col == "client" else "right")
    for c in sorted(set(fed) | set(local) | set(central)):
        f, lo, ce = fed.get(c), local.get(c), central.get(c)
        table.add_row(c, _f(lo), _f(f), _f(ce), _ratio(lo, f, lo), _ratio(f, ce, ce))
    return table


def _ratio(a: float | None, b: float | None, base: float | None) -> str:
    return f"{(a - b) / base:+.1%}" if a is not None and b is not None and base else "-"


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
