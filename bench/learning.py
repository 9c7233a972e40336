"""Does federating pay? Each client's final eval loss: local-only, federated and centralized.

Two splits of the quickstart's data (clinic notes, bank Q&A, devops incidents, 400 examples each):
- non-IID: the three silos as the quickstart has them;
- IID: the same 1200 examples pooled (the bank's rendered by the quickstart's template as text), shuffled
  with seed 0 and dealt round-robin to three clients.

Per split, `fedtune run` (the local runner: aggregator and clients as processes) for fedavg, fedprox and
fedadam with LoRA and FFA-LoRA, and fedavg with FFA-LoRA under client-level DP at two noise
multipliers; `fedtune baseline`'s two modes (in this process) for each adapter method. Every trainer
takes the steps the baseline module defines (the federation: rounds × 3 clients × localSteps;
centralized as many; local-only rounds × localSteps per client) and scores the same held-out examples.
The federated loss is each client's evaluation of the final global; under DP it is read from the
client's own record, since the run releases no client's loss.

The base model is pretrained here first, since LoRA on random weights barely learns (about 4 nats per
byte on this data): a byte-level Llama trained whole on the docstrings of Python's standard library (generic
English, nothing of the silos' data), saved with `save_pretrained` and loaded by every run from that folder
(`model.path`). It is cached under ~/.cache/fedtune/bench/, keyed by its settings and the Python version.

Targets (non-IID split): the federated loss within 5% of the centralized one, and below the local-only
one, for every client.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import os
import random
import re
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from bench.__main__ import machine
from fedtune.api import FederatedFineTuneSpec, load_resource
from fedtune.api.spec import DataSpec, LrSchedule
from fedtune.local.baseline import Baseline
from fedtune.local.identities import local_ledger
from fedtune.local.report import Mode
from fedtune.local.runner import LocalRun
from fedtune.training.model import build_base_model, build_model
from fedtune.training.schedule import lr_factor
from fedtune.training.tokenizer import build_tokenizer

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
RESULTS = Path(__file__).parent / "results" / "learning.md"
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedtune" / "bench"
MODEL = {
    "modelType": "llama",
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "max_position_embeddings": 256,
}
PRETRAIN_STEPS, PRETRAIN_RATE, PRETRAIN_LENGTH, PRETRAIN_BATCH = 1500, 3e-3, 160, 16
ROUNDS, LOCAL_STEPS = 20, 8
FEDADAM_SERVER_RATE = 0.05
DP_NOISE = (0.02, 0.1)
WITHIN = 0.05  # the federated loss may exceed the centralized one by this share


@dataclass(frozen=True)
class Variant:
    """One federated configuration; `method` also names the baselines it is compared with."""

    label: str
    strategy: str
    method: str
    noise: float | None = None

    def aggregation(self) -> dict[str, Any]:
        out: dict[str, Any] = {"strategy": self.strategy, "rounds": ROUNDS, "minClients": 3}
        if self.strategy == "fedadam":
            out["serverLearningRate"] = FEDADAM_SERVER_RATE
        return out

    def privacy(self) -> dict[str, Any]:
        if self.noise is None:
            return {"enabled": False}
        return {"enabled": True, "adaptiveClipping": True, "clipNorm": 0.5, "noiseMultiplier": self.noise}


VARIANTS = [
    *(Variant(f"{s} {m}", s, m) for m in ("lora", "ffa-lora") for s in ("fedavg", "fedprox", "fedadam")),
    *(Variant(f"fedavg ffa-lora DP z={z:g}", "fedavg", "ffa-lora", z) for z in DP_NOISE),
]


def iid_clients(folder: Path, clients: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The quickstart's examples pooled as text, shuffled (seed 0) and dealt round-robin to as many clients."""
    pooled = []
    for c in clients:
        before, between, after = DataSpec.model_validate(c["data"]).template_parts()
        for line in Path(c["data"]["uri"]).read_text().splitlines():
            rec = json.loads(line)
            text = rec["text"] if "text" in rec else before + rec["prompt"] + between + rec["response"] + after
            pooled.append(json.dumps({"text": text}))
    random.Random(0).shuffle(pooled)
    out = []
    for i in range(len(clients)):
        path = folder / f"iid-{i}.jsonl"
        path.write_text("\n".join(pooled[i :: len(clients)]) + "\n")
        out.append({"name": f"iid-{i}", "data": {"uri": str(path)}})
    return out


def corpus() -> bytes:
    """Generic English for pretraining: every docstring of 40 characters or more in the standard library's
    top-level modules, whitespace folded, one a line."""
    docs = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 40:
                    docs.append(" ".join(doc.split()))
    return "\n".join(docs).encode()


def pretrained_base() -> Path:
    """The bench's base model: MODEL's Llama (seed 0) trained whole on `corpus()` with AdamW, warm-up and
    cosine decay, saved with save_pretrained; built once per settings and Python version."""
    settings = json.dumps([MODEL, PRETRAIN_STEPS, PRETRAIN_RATE, PRETRAIN_LENGTH, PRETRAIN_BATCH, sys.version])
    folder = CACHE / f"base-{hashlib.sha256(settings.encode()).hexdigest()[:16]}"
    if (folder / "config.json").exists():
        return folder
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    text = corpus()
    vocab = len(build_tokenizer(load_resource(QUICKSTART).spec))  # the byte tokenizer: a byte is its own id
    torch.manual_seed(0)
    config = {k: v for k, v in MODEL.items() if k != "modelType"}
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, **config))
    opt = torch.optim.AdamW(model.parameters(), lr=PRETRAIN_RATE, weight_decay=0.01)
    rng = random.Random(0)
    started = time.monotonic()
    for step in range(PRETRAIN_STEPS):
        starts = [rng.randrange(len(text) - PRETRAIN_LENGTH) for _ in range(PRETRAIN_BATCH)]
        ids = torch.tensor([list(text[i : i + PRETRAIN_LENGTH]) for i in starts])
        rate = PRETRAIN_RATE * lr_factor(step, PRETRAIN_STEPS, 50, LrSchedule.COSINE)
        for group in opt.param_groups:
            group["lr"] = rate
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 250 == 0 or step == PRETRAIN_STEPS - 1:
            print(f"pretraining step {step}: loss {loss.item():.3f} ({time.monotonic() - started:.0f}s)", flush=True)
    part = folder.with_suffix(".part")
    shutil.rmtree(part, ignore_errors=True)
    model.save_pretrained(part)
    os.replace(part, folder)
    return folder


def spec_file(folder: Path, split: str, clients: list[dict[str, Any]], variant: Variant) -> Path:
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    spec = doc["spec"]
    spec["model"] = {"path": str(pretrained_base())}
    spec["peft"]["method"] = variant.method
    spec["training"]["localSteps"] = LOCAL_STEPS
    spec["aggregation"] = variant.aggregation()
    spec["privacy"] = variant.privacy()
    spec["clients"] = clients
    doc["metadata"]["name"] = re.sub(r"[^a-z0-9]+", "-", f"{split} {variant.label}".lower())
    path = folder / f"{doc['metadata']['name']}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def federated(spec: Path, output: Path) -> dict[str, float]:
    """Each client's eval loss on the final global, from its own evaluation record."""
    run = LocalRun(spec, output=output, fresh=True, console=Console(file=io.StringIO()))
    run.run(live=False)
    ledger = local_ledger(run.folder)
    last = ledger.latest_global()
    assert last is not None
    out = {}
    for c in run.spec.clients:
        marker = ledger.eval_marker(last, c.name)
        assert marker is not None, c.name
        out[c.name] = marker.eval_loss
    return out


@dataclass
class Row:
    split: str
    variant: Variant
    client: str
    local: float
    federated: float
    centralized: float

    @property
    def gain(self) -> float:
        return (self.local - self.federated) / self.local

    @property
    def gap(self) -> float:
        return (self.federated - self.centralized) / self.centralized


def silos() -> list[dict[str, Any]]:
    """The quickstart's clients, their data files named by absolute path."""
    clients: list[dict[str, Any]] = yaml.safe_load(QUICKSTART.read_text())["spec"]["clients"]
    for c in clients:
        c["data"]["uri"] = str((QUICKSTART.parent / c["data"]["uri"]).resolve())
    return clients


def measure(folder: Path, only: str | None) -> tuple[list[Row], dict[str, float]]:
    base_clients = silos()
    splits = {"non-IID": base_clients, "IID": iid_clients(folder, base_clients)}
    rows: list[Row] = []
    seconds: dict[str, float] = {}
    for split, clients in splits.items():
        baselines: dict[str, dict[Mode, dict[str, float]]] = {}
        for variant in VARIANTS:
            if only and only not in variant.label:
                continue
            spec = spec_file(folder, split, clients, variant)
            if variant.method not in baselines:
                started = time.monotonic()
                trainer = Baseline(load_resource(spec).spec)
                baselines[variant.method] = {
                    m: trainer.run(m, folder / f"{split}-{variant.method}").client_eval_loss for m in Mode
                }
                seconds[f"{split} baselines {variant.method}"] = time.monotonic() - started
            started = time.monotonic()
            fed = federated(spec, folder / "runs")
            seconds[f"{split} {variant.label}"] = time.monotonic() - started
            base = baselines[variant.method]
            for c, loss in fed.items():
                rows.append(Row(split, variant, c, base[Mode.LOCAL][c], loss, base[Mode.CENTRALIZED][c]))
            print(f"{split} {variant.label}: {time.monotonic() - started:.0f}s", flush=True)
    return rows, seconds


def targets(rows: list[Row], variant: Variant) -> tuple[bool, bool]:
    mine = [r for r in rows if r.variant == variant and r.split == "non-IID"]
    return all(r.gap <= WITHIN for r in mine), all(r.gain > 0 for r in mine)


def why(rows: list[Row], variant: Variant) -> str:
    """What the numbers say about a missed target."""
    mine = [r for r in rows if r.variant == variant and r.split == "non-IID"]
    notes = []
    far = [r for r in mine if r.gap > WITHIN]
    if far and variant.noise is not None:
        notes.append(
            f"DP noise: std z·C over only 3 clients per round, on {'every' if len(far) == len(mine) else 'some'} "
            "coordinate of the mean update"
        )
    elif far:
        notes.append(", ".join(f"{r.client} {r.gap:+.1%} from centralized" for r in far))
    behind = [r for r in mine if r.gain <= 0]
    pooled_too = [r for r in behind if r.centralized >= r.local]
    if pooled_too:
        names = ", ".join(r.client for r in pooled_too)
        notes.append(
            f"local-only beats centralized too for {names}: one adapter shared by silos this different fits each "
            "less well than its own, so pooling the data does not pay for it either"
        )
    rest = [r for r in behind if r not in pooled_too]
    if rest:
        notes.append(", ".join(f"{r.client} {-r.gain:+.1%} behind local-only" for r in rest))
    return "; ".join(notes)


def behind(rows: list[Row]) -> list[str]:
    """Why a federation misses a target at equal optimizer steps, and what the IID split says to that."""
    iid = [r for r in rows if r.split == "IID" and r.variant.noise is None]
    paid = sum(r.gain > 0 for r in iid)
    return [
        "Why the federation is behind where it is: at equal optimizer steps, clients training in parallel make",
        "about 1/clientsPerRound of centralized training's sequential progress; on silos this different each",
        "client's local steps pull the shared adapter towards its own data (client drift), so averaging cancels",
        "part of them; and local-only spends all of a client's steps on its one narrow distribution, which a",
        f"single silo here has enough of. On the IID split, the federation without DP beats local-only for {paid}",
        f"of {len(iid)} (configuration, client) pairs.",
    ]


def write(rows: list[Row], seconds: dict[str, float], spec: FederatedFineTuneSpec, wall: float) -> str:
    base, trainable = model_size(spec)
    t, n, fed_steps = spec.training, len(spec.clients), ROUNDS * len(spec.clients) * LOCAL_STEPS
    lines = [
        "# Does federating pay? Local-only, federated and centralized training",
        "",
        "`make bench-learning` (`python -m bench.learning`). Each client's eval loss (nats per token) on its own",
        "held-out split (10%, seeded by the run) after training; lower is better. Same model, adapter, AdamW",
        "settings and held-out examples for all three; steps as `fedtune baseline` defines them:",
        f"federated {ROUNDS} rounds × {n} clients × {LOCAL_STEPS} local steps = {fed_steps} client steps; "
        f"centralized {fed_steps} steps on the pooled training splits; local-only {ROUNDS * LOCAL_STEPS} steps per "
        "client on its own split.",
        "",
        f"- model: a byte-level Llama (hidden {MODEL['hidden_size']}, {MODEL['num_hidden_layers']} layers, "
        f"{MODEL['num_attention_heads']} heads), {base:,} parameters, pretrained whole for {PRETRAIN_STEPS} steps "
        f"(batch {PRETRAIN_BATCH} × {PRETRAIN_LENGTH} bytes, AdamW lr {PRETRAIN_RATE:g}, cosine) on the standard "
        f"library's docstrings ({len(corpus()) / 1e6:.2f} MB); LoRA r {spec.peft.r} on "
        f"{', '.join(spec.peft.target_modules)}: {trainable:,} trainable (FFA-LoRA trains about half of them)",
        f"- training: batch {t.batch_size}, max length {t.max_length}, AdamW lr {t.learning_rate:g} {t.lr_schedule}, "
        f"clipping {t.max_grad_norm}; held out {spec.clients[0].data.eval_fraction:.0%} of each client's examples; "
        f"run seed {spec.seed} (data split, order, adapter init); fedprox mu {spec.aggregation.proximal_mu:g}; "
        f"fedadam server lr {FEDADAM_SERVER_RATE:g}; DP: adaptive clipping from 0.5 (median), noise multiplier "
        "z as labelled",
        "- non-IID: the quickstart's three silos (the bank's loss is on its responses only); IID: the same "
        "examples pooled as text (the bank's whole Q&A scored), shuffled with seed 0, dealt round-robin. "
        "Compare losses within a split only.",
        f"- machine: {machine()}; the whole benchmark took {wall / 60:.1f} minutes",
        "",
        "Gain over local: (local − federated) / local, above 0 when federating pays. Vs centralized:",
        "(federated − centralized) / centralized.",
        "",
        "## Targets (non-IID)",
        "",
        f"Federated within {WITHIN:.0%} of centralized, and better than local-only, for every client.",
        "",
        "| configuration | within 5% of centralized | better than local-only | why not |",
        "|---|---|---|---|",
    ]
    variants = list(dict.fromkeys(r.variant for r in rows))
    for v in variants:
        close, better = (("met" if ok else "not met") for ok in targets(rows, v))
        lines.append(f"| {v.label} | {close} | {better} | {why(rows, v) or '-'} |")
    if not all(all(targets(rows, v)) for v in variants):
        lines += ["", *behind(rows)]
    for split in ("non-IID", "IID"):
        lines += [
            "",
            f"## {split}",
            "",
            "| configuration | client | local-only | federated | centralized | gain over local | vs centralized |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in rows if r.split == split):
            lines.append(
                f"| {r.variant.label} | {r.client} | {r.local:.3f} | {r.federated:.3f} | {r.centralized:.3f} "
                f"| {r.gain:+.1%} | {r.gap:+.1%} |"
            )
    lines += ["", "## Time", "", "| part | seconds |", "|---|---|"]
    lines += [f"| {k} | {v:.0f} |" for k, v in seconds.items()]
    return "\n".join(lines) + "\n"


def model_size(spec: FederatedFineTuneSpec) -> tuple[int, int]:
    """The base model's parameters and the LoRA adapter's trainable ones."""
    tokenizer = build_tokenizer(spec)
    base = sum(p.numel() for p in build_base_model(spec, len(tokenizer)).parameters())
    return base, sum(p.numel() for p in build_model(spec, tokenizer).parameters() if p.requires_grad)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="Run only the configurations whose label contains this (no results file).")
    args = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        rows, seconds = measure(Path(tmp), args.only)
        spec = load_resource(spec_file(Path(tmp), "non-IID", silos(), VARIANTS[0])).spec
        table = write(rows, seconds, spec, time.monotonic() - started)
    if args.only:
        print(table)
        return
    RESULTS.write_text(table)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
