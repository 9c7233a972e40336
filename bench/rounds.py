"""Round hand-offs in a local run of 10 clients: how much of a round is waiting, not training.

`fedtune run` of the quickstart's model and data spread over 10 clients, twice on the same spec: with
the poll cap at 1 s (the backoff waiting parties had before) and at the default. Times come from
the run itself: commits are the ctime of each marker in the run folder (create-if-absent links the
marker into place, which sets it), and each wait's end is the line `fedtune.polling` logs when a poll
returns (the aggregator's for the updates of round r, each client's for the global of round r).

Per round r, with G(r) the commit of round r's global:
- round: G(r + 1) - G(r);
- compute: the client time of the last update to land (its marker's `metrics.seconds`: load the
  global, evaluate, train, encode);
- last update → aggregator: its commit to the end of the aggregator's wait (the wait's last check
  reads and validates that update);
- aggregation: the end of that wait to G(r + 1);
- pickup: G(r) to the end of each client's wait;
- coordination: round - compute - aggregation, i.e. the last client's pickup and upload plus the
  aggregator's detection: the time nobody computes.
Round 0 is left out: it includes the processes' start.
"""

from __future__ import annotations

import argparse
import datetime
import os
import re
import statistics
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console

from bench.__main__ import machine
from fedtune.federation import protocol as p
from fedtune.federation.polling import DEFAULT_CAP_SECONDS
from fedtune.local.runner import LocalRun

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "examples" / "quickstart.yaml"
RESULTS = Path(__file__).parent / "results" / "rounds.md"
CAPS = {"1 s cap (before)": "1", f"{DEFAULT_CAP_SECONDS:g} s cap (default)": ""}
WAIT = re.compile(r"^(\S+ \S+) fedtune\.polling waited ([\d.]+)s for (.+) \((\d+) checks\)$")


def spec_file(folder: Path, clients: int, rounds: int, steps: int) -> Path:
    """The quickstart with `clients` clients, each on one of its three data sets in turn."""
    doc: dict[str, Any] = yaml.safe_load(QUICKSTART.read_text())
    spec = doc["spec"]
    base = spec["clients"]
    spec["clients"] = [
        {**base[i % len(base)], "name": f"silo-{i:02d}", "data": {**base[i % len(base)]["data"]}}
        for i in range(clients)
    ]
    for c in spec["clients"]:
        c["data"]["uri"] = str((QUICKSTART.parent / c["data"]["uri"]).resolve())
    spec["aggregation"] = {**spec["aggregation"], "rounds": rounds, "minClients": clients}
    spec["training"] = {**spec["training"], "localSteps": steps}
    doc["metadata"]["name"] = "rounds"
    path = folder / "rounds.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@dataclass
class Wait:
    """One poll as its log line tells it."""

    end: float
    seconds: float
    what: str
    checks: int


def waits(log: Path) -> list[Wait]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        m = WAIT.match(line)
        if m:
            end = datetime.datetime.strptime(m[1], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            out.append(Wait(end, float(m[2]), m[3], int(m[4])))
    return out


@dataclass
class Round:
    round: int
    seconds: float
    compute: float
    detect: float
    aggregate: float
    pickups: list[float]

    @property
    def coordination(self) -> float:
        return self.seconds - self.compute - self.aggregate


@dataclass
class Variant:
    label: str
    rounds: list[Round]
    client_waits: list[Wait]
    aggregator_waits: list[Wait]
    wall: float


def committed(folder: Path, key: str) -> float:
    return folder.joinpath(key).stat().st_ctime


def measure(run: LocalRun, label: str, wall: float) -> Variant:
    folder, ledger = run.folder, run.ledger
    names = [c.name for c in run.spec.clients]
    logs = folder / "logs"
    agg = {w.what: w for w in waits(logs / "aggregator.log")}
    client = {c: {w.what: w for w in waits(logs / f"{c}.log")} for c in names}
    rounds = []
    for r in range(1, run.spec.aggregation.rounds):
        start, end = committed(folder, p.global_marker(r)), committed(folder, p.global_marker(r + 1))
        last = max(names, key=lambda c: committed(folder, p.update_marker(r, c)))
        marker = ledger.update_marker(r, last)
        assert marker is not None
        seen = agg[f"updates of round {r}"].end
        rounds.append(
            Round(
                round=r,
                seconds=end - start,
                compute=marker.metrics.seconds,
                detect=seen - committed(folder, p.update_marker(r, last)),
                aggregate=end - seen,
                pickups=[client[c][f"the global of round {r} or later"].end - start for c in names],
            )
        )
    every = [w for c in names for w in client[c].values() if not w.what.startswith("the global of round 0 ")]
    updates = [w for w in agg.values() if w.what.startswith("updates of round")]
    return Variant(label, rounds, every, updates, wall)


@contextmanager
def poll_cap(value: str) -> Iterator[None]:
    """FEDTUNE_POLL_SECONDS for the run's processes (empty: the default)."""
    old = os.environ.pop("FEDTUNE_POLL_SECONDS", None)
    if value:
        os.environ["FEDTUNE_POLL_SECONDS"] = value
    try:
        yield
    finally:
        os.environ.pop("FEDTUNE_POLL_SECONDS", None)
        if old is not None:
            os.environ["FEDTUNE_POLL_SECONDS"] = old


def run_variant(label: str, cap: str, spec: Path, out: Path) -> Variant:
    with poll_cap(cap):
        run = LocalRun(spec, output=out, fresh=True, console=Console(quiet=True))
        t0 = time.monotonic()
        run.run(live=False)
        return measure(run, label, time.monotonic() - t0)


# --- the report ------------------------------------------------------------------------------------


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def rate(ws: list[Wait]) -> float:
    """Checks per second while waiting."""
    return sum(w.checks for w in ws) / max(sum(w.seconds for w in ws), 1e-9)


def summary(v: Variant) -> dict[str, float]:
    rs = v.rounds
    pickups = [x for r in rs for x in r.pickups]
    return {
        "round": mean([r.seconds for r in rs]),
        "compute": mean([r.compute for r in rs]),
        "aggregate": mean([r.aggregate for r in rs]),
        "detect_mean": mean([r.detect for r in rs]),
        "detect_max": max(r.detect for r in rs),
        "pickup_mean": mean(pickups),
        "pickup_max": max(pickups),
        "coordination": mean([r.coordination for r in rs]),
        "share": mean([r.coordination / r.seconds for r in rs]),
        "outside": mean([(r.seconds - r.compute) / r.seconds for r in rs]),
        "client_rate": rate(v.client_waits),
        "client_checks": mean([float(w.checks) for w in v.client_waits]),
        "aggregator_rate": rate(v.aggregator_waits),
        "aggregator_checks": mean([float(w.checks) for w in v.aggregator_waits]),
    }


def write(variants: list[Variant], clients: int, rounds: int, steps: int, load: tuple[float, ...], secs: float) -> None:
    old, new = (summary(v) for v in variants)

    def ratio(key: str) -> str:
        return f"{new[key] / old[key]:.2f}×" if old[key] else "-"

    rows = [
        ("round (G(r) → G(r+1))", "round", "s", 2),
        ("compute of the last update", "compute", "s", 2),
        ("aggregation (wait's end → G(r+1))", "aggregate", "s", 3),
        ("last update → aggregator, mean", "detect_mean", "s", 3),
        ("last update → aggregator, max", "detect_max", "s", 3),
        ("global → client pickup, mean", "pickup_mean", "s", 3),
        ("global → client pickup, max", "pickup_max", "s", 3),
        ("coordination (round − compute − aggregation)", "coordination", "s", 3),
        ("coordination share of a round", "share", "%", 2),
        ("outside compute share of a round (with aggregation)", "outside", "%", 2),
        ("client: checks per wait for a global (1 HEAD each)", "client_checks", "", 1),
        ("client: checks/s while waiting", "client_rate", "/s", 1),
        (f"aggregator: checks per round (≤ {clients} GETs each)", "aggregator_checks", "", 1),
        ("aggregator: checks/s while waiting", "aggregator_rate", "/s", 1),
    ]
    lines = [
        "# Round hand-offs",
        "",
        f"Written by `make bench` (`python -m bench.rounds`) on {datetime.date.today()} in {secs:.0f} s.",
        "",
        f"- Machine: {machine()}; load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f} "
        "(a shared machine: other work ran beside the benchmark).",
        f"- Run: `fedtune run` of examples/quickstart.yaml's tiny Llama (CPU) with {clients} clients over its three "
        f"data sets, {rounds} rounds of {steps} local steps, minClients = {clients} (every round waits for every "
        f"client), a local folder as the store; {clients + 1} processes on this machine's cores.",
        "- The same spec twice: FEDTUNE_POLL_SECONDS=1, the cap waiting parties had before, as the baseline; then "
        f"the default {DEFAULT_CAP_SECONDS:g} s. Everything else is the same code. Rounds 1 to "
        f"{rounds - 1} of each run (round 0 includes the processes' start); each figure is the mean over those "
        f"rounds (pickups: over rounds × {clients} clients) unless it says max. Training time moves with the "
        "machine's load from one run to the other; coordination in seconds, not its share, compares them.",
        "- How each figure is taken: see the docstring of bench/rounds.py. Commits are the marker's ctime in the run "
        "folder; a wait's end is the log line `fedtune.polling` writes when a poll returns (millisecond stamps).",
        "- Targets: coordination at most 2% of a round; last update → next global beyond aggregation, and global → "
        "client pickup, each at most 0.2 s.",
        "",
        f"| per round | {variants[0].label} | {variants[1].label} | after ÷ before |",
        "| --- | ---: | ---: | ---: |",
    ]
    for title, key, unit, digits in rows:
        scale = 100 if unit == "%" else 1
        cells = [f"{s[key] * scale:.{digits}f} {unit}".replace(" %", "%").strip() for s in (old, new)]
        lines.append(f"| {title} | {cells[0]} | {cells[1]} | {ratio(key)} |")
    lines += ["", *verdict(new, clients), ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


def verdict(s: dict[str, float], clients: int) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    return [
        "Targets, at the default cap:",
        "",
        f"- Coordination {s['share'] * 100:.2f}% of a round: {met(s['share'] <= 0.02)} (target ≤ 2%). In seconds "
        f"it is {s['coordination']:.3f} s a round, whatever the training: 2% holds for rounds of "
        f"{s['coordination'] / 0.02:.0f} s or more (these took {s['round']:.1f} s).",
        f"- Last update → aggregator at most {s['detect_max']:.3f} s, beyond an aggregation of "
        f"{s['aggregate']:.3f} s: {met(s['detect_max'] <= 0.2)} (target ≤ 0.2 s).",
        f"- Global → client pickup at most {s['pickup_max']:.3f} s: {met(s['pickup_max'] <= 0.2)} (target ≤ 0.2 s).",
        f"- Requests while waiting: each client {s['client_rate']:.1f} HEAD/s ({s['client_checks']:.1f} per wait for "
        f"a global; a long wait settles at {1 / DEFAULT_CAP_SECONDS:.1f}/s), the aggregator "
        f"{s['aggregator_rate']:.1f} checks/s of at most {clients} marker GETs each (one per client yet to answer: at "
        f"most {s['aggregator_rate'] * clients:.0f} GET/s, falling as updates land). A check that takes longer (a "
        "slow or remote bucket) is followed by a sleep of three times its length, up to 1 s, so a waiting party "
        "keeps storage busy at most a quarter of the time.",
    ]


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.rounds", description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=30, help="local steps per round")
    args = ap.parse_args()
    t0, load = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="fedtune-rounds-") as tmp:
        folder = Path(tmp)
        spec = spec_file(folder, args.clients, args.rounds, args.steps)
        variants = []
        for label, cap in CAPS.items():
            print(f"bench.rounds: {label} ...", flush=True)
            variants.append(run_variant(label, cap, spec, folder / "runs"))
            print(f"  {summary(variants[-1])}", flush=True)
    write(variants, args.clients, args.rounds, args.steps, load, time.monotonic() - t0)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
