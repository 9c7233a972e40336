"""What a finished (or running) run has to show: per-round records, the loss plot, the closing table."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from pathlib import Path
from typing import Any

from rich.table import Table

from fedtune.api import FederatedFineTuneSpec
from fedtune.federation.records import Ledger

log = logging.getLogger("fedtune.report")

BASELINES = "baselines"  # <run folder>/baselines/<mode>/: what `fedtune baseline` writes


class Mode(StrEnum):
    """A baseline: one adapter per client on its own data, or one on all clients' data pooled."""

    LOCAL = "local"
    CENTRALIZED = "centralized"


@dataclass(frozen=True)
class BaselineSummary:
    """A baseline's result (summary.json): its optimizer steps and each client's held-out evaluation.

    `spec_key` is `baseline_key` of the spec it trained for; `client_steps` the steps of the adapter each
    client is scored with; `client_eval_sha256` digests the input ids scored, so a reader can check every
    trainer used the same.
    """

    mode: str
    seed: int
    spec_key: str
    steps: int
    client_steps: dict[str, int]
    client_eval_loss: dict[str, float]
    client_eval_tokens: dict[str, int]
    client_eval_sha256: dict[str, str]

    def write(self, folder: Path) -> Path:
        """Written whole or not at all, since a run may read it while the baseline trains."""
        path = folder / "summary.json"
        part = path.with_suffix(".json.part")
        part.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(part, path)
        return path


def baseline_key(spec: FederatedFineTuneSpec) -> str:
    """Digest of what a baseline's result depends on: model, tokenizer, adapter, training, seed, the rounds,
    clients per round and every client's data (not the Secrets that reach them, which may rotate). Two specs
    with one key have comparable baselines."""
    clients = [(c.name, c.data.model_dump(mode="json", exclude={"secret_ref"})) for c in spec.clients]
    what = spec.model_dump(
        mode="json",
        include={"model", "tokenizer", "peft", "training", "seed"},
        exclude={"model": {"token_secret_ref"}},
    )
    what |= {"rounds": spec.aggregation.rounds, "per_round": spec.clients_per_round, "clients": clients}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def read_baselines(folder: Path) -> dict[str, BaselineSummary]:
    """The baselines written beside the run in `folder`, by mode; one that cannot be read is left out, with
    a warning (it was written by another version of fedtune: train it again)."""
    out = {}
    for mode in Mode:
        path = folder / BASELINES / mode / "summary.json"
        if not path.exists():
            continue
        try:
            raw = json.loads(path.read_text())
            out[str(mode)] = BaselineSummary(**{f.name: raw[f.name] for f in fields(BaselineSummary)})
        except (ValueError, KeyError, TypeError) as e:
            log.warning("%s: not a baseline summary (%s: %s); run fedtune baseline again", path, type(e).__name__, e)
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


def record(number: int, participants: list[str], train_loss: float | None, eval_loss: float | None) -> dict[str, Any]:
    """One metrics.json record, of a run or a baseline: round `number` with nothing rejected, sent or spent."""
    return {
        "round": number,
        "participants": participants,
        "rejected": [],
        "train_loss": train_loss,
        "eval_loss": eval_loss,
        "seconds": 0.0,
        "bytes": 0,
        "epsilon": None,
    }


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
            record(s.round, s.participants, s.train_loss, s.eval_loss)
            | {
                "rejected": [x.client for x in s.rejected],
                "seconds": round(s.seconds, 3),
                "bytes": s.bytes,
                "epsilon": s.epsilon,
            }
        )
    final = ledger.final()
    if final is not None:
        last = record(final.rounds, sorted(final.client_eval_loss), None, final.eval_loss)
        out.append(last | {"epsilon": out[-1]["epsilon"] if out else None})
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
    if train or evals:  # under DP a run releases no loss: an empty plot, no legend
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


def baseline_table(ledger: Ledger, folder: Path, spec: FederatedFineTuneSpec) -> Table | None:
    """Per client, the final eval loss of local-only training, the federation and centralized training;
    None when no baseline for this spec was run. Gain: how much lower the federated loss is than local-only.
    The caption gives each trainer's optimizer steps and says where they differ (a run ended early)."""
    key = baseline_key(spec)
    found = {}
    for mode, b in read_baselines(folder).items():
        if b.spec_key == key:
            found[mode] = b
        else:
            log.warning("the %s baseline in %s was trained for another spec; run fedtune baseline again", mode, folder)
    if not found:
        return None
    final = ledger.final()
    fed = final.client_eval_loss if final else {}
    local = found["local"].client_eval_loss if "local" in found else {}
    central = found["centralized"].client_eval_loss if "centralized" in found else {}
    taken = federated_steps(ledger)
    notes = [f"optimizer steps: federated {taken}, " + ", ".join(f"{m} {b.steps}" for m, b in found.items())]
    if any(b.steps != taken for b in found.values()):
        notes.append("the federation took fewer steps than planned (failed rounds or a privacy budget)")
    if not fed and spec.privacy.enabled:
        notes.append("under differential privacy the run releases no client's loss")
    table = Table(title="Does federating pay? Eval loss per client (held-out split)")
    table.caption = "; ".join(notes)
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
