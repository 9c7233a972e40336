"""What a finished (or running) run has to show: per-round records, the loss plot, the closing table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.federation.records import Ledger


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


def _f(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
