"""Aggregation throughput and peak memory against Flower's implementations and a numpy copy.

K LoRA updates shaped like a 7B Llama (32 layers, hidden 4096, r = 16 on q, k, v and o: 16.8 M values,
67.1 MB in float32) are generated, written once as safetensors into a file:// store, and aggregated

- from storage, as the aggregator does when it closes a round: a single-pass strategy (FedAvg, FedAdam)
  is handed the accepted updates read again from storage a few ahead on a small pool (capped read,
  sha256, decode without a copy) while it adds the current one; a strategy that needs all updates at
  once (median, trimmed mean, Krum) reads them one tensor at a time from the spool the checks wrote;
- from storage one at a time, the same-run baseline: get, sha256, decode, validate, one update after
  the other, handed to the strategy as a lazy iterator (all K collected where the rule needs them);
- from memory: the same tensors already decoded.

The checks that precede aggregation (a HEAD, capped read, sha256, header, decode, finite values and
norm; for a strategy that needs all updates, the spool write) are measured apart, one at a time and
ahead on the pool: the aggregator runs them as updates arrive during the round.

Beside each figure, in the same process and on the same arrays: (a) Flower's implementation of the
same rule (numpy views of the same buffers; its FedAvg and FedAdam take their `FitRes` bytes, as a Flower
server holds them), and (b) a numpy copy of the same bytes, the memory-bandwidth baseline. Throughput
is the update bytes consumed (K × 67.1 MB) per second; peak memory is the rise of the process's peak
RSS (VmHWM, reset before each measurement) above its RSS when the measurement starts.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import hashlib
import itertools
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedtune.aggregation import ClientUpdate, State, make_strategy
from fedtune.aggregation.ahead import ahead, share_one_heap
from fedtune.aggregation.encoding import decode, decode_checked, encode, read_layout, size_bounds
from fedtune.aggregation.spool import Spool, SpooledDelta
from fedtune.aggregation.validation import update_norm, validate, validate_update
from fedtune.api.spec import AggregationSpec
from fedtune.federation import update_check
from fedtune.federation.protocol import check_digest
from fedtune.federation.update_check import Rules
from fedtune.storage import ObjectStore, open_store

LAYERS, HIDDEN, RANK = 32, 4096, 16
PROJECTIONS = ("q", "k", "v", "o")
STRATEGIES = ("fedavg", "fedadam", "fedmedian", "trimmedmean", "krum")
TRIM = 0.1
RESULTS = Path(__file__).parent / "results" / "aggregation.md"


def shapes() -> dict[str, tuple[int, int]]:
    out = {}
    for layer in range(LAYERS):
        for proj in PROJECTIONS:
            base = f"base_model.model.model.layers.{layer}.self_attn.{proj}_proj"
            out[f"{base}.lora_A.weight"] = (RANK, HIDDEN)
            out[f"{base}.lora_B.weight"] = (HIDDEN, RANK)
    return out


UPDATE_BYTES = sum(a * b for a, b in shapes().values()) * 4


def generate(k: int, seed: int = 0) -> Iterator[State]:
    """K seeded updates, one at a time."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(k):
        yield {tensor: torch.randn(s, generator=gen).mul_(1e-3) for tensor, s in shapes().items()}


# --- measuring -------------------------------------------------------------------------------------


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


@dataclass
class Measure:
    seconds: float
    peak_mb: float


LIBC = ctypes.CDLL("libc.so.6")


def measure(fn: Callable[[], object], repeat: int = 3, before: Callable[[], None] = lambda: None) -> Measure:
    """Best time of a few runs (one if a run takes over 3 s) and the peak RSS rise of the first;
    `before` runs untimed ahead of each.

    Free heap pages are handed back to the kernel first (malloc_trim), so memory a run touches shows
    in its peak RSS even where the allocator reuses blocks an earlier run freed.
    """
    best, peak = float("inf"), 0.0
    for i in range(repeat):
        before()
        gc.collect()
        LIBC.malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        base = rss_kib("VmRSS")
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        if i == 0:
            peak = (rss_kib("VmHWM") - base) / 1024
        del out
        best = min(best, dt)
        if dt > 3.0:
            break
    return Measure(best, peak)


#: Runs of each side of a pooled-against-one-at-a-time comparison.
PAIRED = 4


def measure_pair(ours: Callable[[], object], base: Callable[[], object]) -> tuple[Measure, Measure]:
    """Both, alternately, PAIRED runs each: the best time of each and the peak of its first run.

    The pooled path needs both cores and a core taken by other work slows it most; taking turns gives
    each side the same chances at the machine's quiet moments.
    """
    a, b = measure(ours, repeat=1), measure(base, repeat=1)
    for _ in range(PAIRED - 1):
        a = Measure(min(a.seconds, measure(ours, repeat=1).seconds), a.peak_mb)
        b = Measure(min(b.seconds, measure(base, repeat=1).seconds), b.peak_mb)
    return a, b


# --- ours ------------------------------------------------------------------------------------------


def spec_for(name: str, k: int) -> AggregationSpec:
    return AggregationSpec(strategy=name, trim_fraction=TRIM, byzantine_clients=byzantine(k))


def byzantine(k: int) -> int:
    return max(1, k // 10)


def key(i: int) -> str:
    return f"updates/{i:03d}.safetensors"


def one_at_a_time(store: ObjectStore, k: int, digests: list[str], reference: State) -> Iterator[ClientUpdate]:
    """The baseline: get, sha256 against the marker, decode, validate, one update after the other."""
    for i in range(k):
        data = store.get(key(i))
        check_digest(key(i), data, digests[i])
        delta = decode(data)
        del data
        if validate_update(delta, reference, None):
            raise RuntimeError("invalid")
        yield ClientUpdate(f"c{i}", 100.0 + i, delta)


def check_one_at_a_time(store: ObjectStore, k: int, digests: list[str], reference: State) -> list[float]:
    """The baseline check of the round's updates: each in turn sized by a HEAD, read capped, hashed, its
    header read, decoded (a copy), validated, and its norm taken for the record."""
    _, high = size_bounds(reference, "fp32")
    norms = []
    for i in range(k):
        store.size(key(i))
        data = store.get_at_most(key(i), high)
        check_digest(key(i), data, digests[i])
        read_layout(data, reference, "fp32")
        delta = decode(data)
        if validate_update(delta, reference, None):
            raise RuntimeError("invalid")
        norms.append(update_norm(delta))
    return norms


def check_ahead(
    store: ObjectStore, k: int, digests: list[str], rules: Rules, spool: Spool | None
) -> list[update_check.Checked]:
    """The aggregator's check of the round's updates, a few ahead on the pool; with a spool, each
    checked update's bytes are written to it."""
    return list(ahead(range(k), lambda i: update_check.check(store, key(i), digests[i], rules, spool, f"c{i}")))


def reread_ahead(store: ObjectStore, k: int, digests: list[str], rules: Rules) -> Iterator[ClientUpdate]:
    """Checked updates read again for a single-pass strategy, a few ahead of it on the pool."""
    return ahead(
        range(k), lambda i: ClientUpdate(f"c{i}", 100.0 + i, update_check.load(store, key(i), digests[i], rules))
    )


class SpooledCheck:
    """The check of K updates writing each to a spool; the last run's spool stays for the strategies
    that read from it, until `drop`."""

    def __init__(self, store: ObjectStore, k: int, digests: list[str], rules: Rules) -> None:
        self.store, self.k, self.digests, self.rules = store, k, digests, rules
        self.spool: Spool | None = None
        self.deltas: list[SpooledDelta] = []

    def __call__(self) -> None:
        self.spool = Spool()
        checked = check_ahead(self.store, self.k, self.digests, self.rules, self.spool)
        self.deltas = [c.spooled for c in checked if c.spooled is not None]

    def updates(self, k: int) -> list[ClientUpdate]:
        """Checked updates on local disk, each tensor read when the strategy reaches it."""
        return [ClientUpdate(f"c{i}", 100.0 + i, self.deltas[i]) for i in range(k)]

    def drop(self) -> None:
        if self.spool is not None:
            self.spool.close()
        self.spool, self.deltas = None, []


def storage_stages(store: ObjectStore, digest: str, reference: State) -> dict[str, dict[str, float]]:
    """Milliseconds per update of each step of both storage paths (best of 3), to show where time goes."""
    best: dict[str, dict[str, float]] = {"one at a time": {}, "ours": {}}
    _, high = size_bounds(reference, "fp32")
    for _ in range(3):
        spool = Spool()
        t = [time.perf_counter()]
        data = store.get(key(0))
        t.append(time.perf_counter())
        check_digest(key(0), data, digest)
        t.append(time.perf_counter())
        delta = decode(data)
        t.append(time.perf_counter())
        validate_update(delta, reference, None)
        t.append(time.perf_counter())
        del data, delta
        data = store.get_at_most(key(0), high)
        t.append(time.perf_counter())
        check_digest(key(0), data, digest)
        t.append(time.perf_counter())
        layout = read_layout(data, reference, "fp32")
        delta = decode_checked(data, layout)
        t.append(time.perf_counter())
        validate(delta, reference, None)
        t.append(time.perf_counter())
        spool.put("c0", data, layout)
        t.append(time.perf_counter())
        spool.close()
        dt = [(b - a) * 1000 for a, b in itertools.pairwise(t)]
        names = [("one at a time", n) for n in ("get", "sha256", "decode", "validate")]
        names += [("ours", n) for n in ("capped read", "sha256", "header + views", "validate + norm", "spool write")]
        for (path, stage), ms in zip(names, dt, strict=True):
            best[path][stage] = min(best[path].get(stage, float("inf")), ms)
    return best


def ours(name: str, k: int, updates: Callable[[], Iterable[ClientUpdate]], glob: State) -> Callable[[], object]:
    strategy = make_strategy(spec_for(name, k))
    return lambda: strategy.aggregate(glob, updates(), {})


# --- Flower ----------------------------------------------------------------------------------------


def flower_import() -> Any:
    deps = Path(sys.prefix) / "bench-deps"
    if deps.is_dir() and str(deps) not in sys.path:
        sys.path.append(str(deps))  # after the venv's own packages, which keep precedence
    import flwr
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters
    from flwr.server.strategy import FedAdam
    from flwr.server.strategy.aggregate import (
        aggregate_inplace,
        aggregate_krum,
        aggregate_median,
        aggregate_trimmed_avg,
    )

    return {
        "version": getattr(flwr, "__version__", "?"),
        "Code": Code,
        "FitRes": FitRes,
        "Status": Status,
        "ndarrays_to_parameters": ndarrays_to_parameters,
        "FedAdam": FedAdam,
        "aggregate_inplace": aggregate_inplace,
        "aggregate_krum": aggregate_krum,
        "aggregate_median": aggregate_median,
        "aggregate_trimmed_avg": aggregate_trimmed_avg,
    }


def flower(fl: dict[str, Any], name: str, k: int, arrays: list[list[np.ndarray]], glob: list[np.ndarray]):
    """Flower's function for the same rule, and what must be kept alive for it (FitRes bytes)."""
    results = [(a, 100 + i) for i, a in enumerate(arrays[:k])]
    if name in ("fedavg", "fedadam"):
        ok = fl["Status"](code=fl["Code"].OK, message="")
        fits = [
            (None, fl["FitRes"](status=ok, parameters=fl["ndarrays_to_parameters"](a), num_examples=n, metrics={}))
            for a, n in results
        ]
        if name == "fedavg":
            return lambda: fl["aggregate_inplace"](fits)

        def adam() -> object:
            s = fl["FedAdam"](initial_parameters=fl["ndarrays_to_parameters"](glob), accept_failures=True)
            return s.aggregate_fit(1, fits, [])

        return adam
    if name == "fedmedian":
        return lambda: fl["aggregate_median"](results)
    if name == "trimmedmean":
        return lambda: fl["aggregate_trimmed_avg"](results, TRIM)
    if name == "krum":
        return lambda: fl["aggregate_krum"](results, byzantine(k), 0)
    raise ValueError(name)


def numpy_copy(arrays: list[list[np.ndarray]], k: int) -> Callable[[], object]:
    """Read every byte of K updates and write it to a buffer of one update's size: 2 streams."""
    dst = [np.empty_like(a) for a in arrays[0]]

    def run() -> object:
        for upd in arrays[:k]:
            for d, a in zip(dst, upd, strict=True):
                np.copyto(d, a)
        return None

    return run


# --- the report ------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem, free = meminfo("MemTotal") >> 30, meminfo("MemAvailable") >> 30
    cores = len(os.sched_getaffinity(0))
    return f"{cpu}, {cores} cores, {mem} GiB RAM ({free} GiB available at start), Linux {platform.release()}"


def meminfo(field: str) -> int:
    """A /proc/meminfo figure, in bytes."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


#: Flower's rules hold about this many times the K updates at their peak (its Krum flattens every update
#: and keeps the copies); a rule that would not fit in the memory free, with 2 GiB to spare, is not run.
FLOWER_HOLDS = {"krum": 2.0}


def gbps(k: int, m: Measure) -> float:
    return k * UPDATE_BYTES / m.seconds / 1e9


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    ap.add_argument("--ks", default="10,50,100", help="numbers of updates, comma-separated")
    ap.add_argument("--strategies", default=",".join(STRATEGIES))
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    ks = [int(x) for x in args.ks.split(",")]
    names = args.strategies.split(",")
    fl = flower_import()
    share_one_heap()  # as the aggregator does
    load_before = os.getloadavg()
    started = time.time()

    kmax = max(ks)
    glob = {tensor: torch.zeros(s) for tensor, s in shapes().items()}
    rules = Rules(glob, "fp32", None)
    rows: dict[tuple[int, str], dict[str, Any]] = {}
    checks: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fedtune-bench-") as tmp:
        store = open_store(f"file://{tmp}")
        print(f"writing {kmax} updates of {UPDATE_BYTES / 1e6:.1f} MB", flush=True)
        digests = []
        for i, u in enumerate(generate(kmax)):
            data = encode(u, "fp32")
            digests.append(hashlib.sha256(data).hexdigest())
            store.put(key(i), data)
        del data
        os.sync()  # no writeback of the store competes with what is measured
        stages = storage_stages(store, digests[0], glob)
        for k in ks:
            single = [n for n in names if make_strategy(spec_for(n, k)).single_pass]
            spooled = SpooledCheck(store, k, digests, rules)
            print(f"K={k} checks", flush=True)
            check: dict[str, Any] = {"k": k}
            check["ahead"], check["seq"] = measure_pair(
                lambda k=k: check_ahead(store, k, digests, rules, None),
                lambda k=k: check_one_at_a_time(store, k, digests, glob),
            )
            for name in single:  # before the spool is written: its writeback would compete
                rows[k, name] = {"name": name, "k": k}
                rows[k, name]["store"], rows[k, name]["seq"] = measure_pair(
                    ours(name, k, lambda k=k: reread_ahead(store, k, digests, rules), glob),
                    ours(name, k, lambda k=k: one_at_a_time(store, k, digests, glob), glob),
                )
            check["spool"] = measure(spooled, before=spooled.drop)
            os.sync()
            checks.append(check)
            print("  " + ", ".join(f"{n} {gbps(k, m):.2f}" for n, m in check.items() if n != "k"), flush=True)
            rest = [n for n in names if n not in single]
            for name in rest:
                rows[k, name] = {"name": name, "k": k}
                rows[k, name]["store"] = measure(ours(name, k, lambda k=k, s=spooled: s.updates(k), glob))
            spooled.drop()
            for name in rest:  # after every spool read: these hold all K updates and push the spool out of cache
                rows[k, name]["seq"] = measure(ours(name, k, lambda k=k: one_at_a_time(store, k, digests, glob), glob))
            in_memory(rows, k, names, store, glob, fl)
    ordered = [rows[k, n] for k in ks for n in names]
    write(args.out, ordered, checks, stages, fl["version"], load_before, time.time() - started)
    print(f"wrote {args.out}")


def in_memory(
    rows: dict[tuple[int, str], dict[str, Any]],
    k: int,
    names: list[str],
    store: ObjectStore,
    glob: State,
    fl: dict[str, Any],
) -> None:
    """The memory, Flower and copy columns, on the K updates decoded into memory for them alone."""
    updates = [decode(store.get(key(i))) for i in range(k)]
    arrays = [[u[tensor].numpy() for tensor in shapes()] for u in updates]  # the same buffers, as numpy
    glob_np = [v.numpy() for v in glob.values()]
    mem = [ClientUpdate(f"c{i}", 100.0 + i, updates[i]) for i in range(k)]
    for name in names:
        print(f"K={k} {name}", flush=True)
        r = rows[k, name]
        r["copy"] = measure(numpy_copy(arrays, k))  # beside each row: the machine's load varies
        r["mem"] = measure(ours(name, k, lambda: iter(mem), glob))
        fits = FLOWER_HOLDS.get(name, 1.0) * k * UPDATE_BYTES + (2 << 30) < meminfo("MemAvailable")
        r["flower"] = measure(flower(fl, name, k, arrays, glob_np)) if fits else None
        print(
            f"  ours {gbps(k, r['store']):.2f} (storage) {gbps(k, r['seq']):.2f} (one at a time) "
            f"{gbps(k, r['mem']):.2f} (memory) flower {cell(k, r['flower'], '.2f')} copy {gbps(k, r['copy']):.2f} "
            f"GB/s; peak {r['store'].peak_mb:.0f} / {r['seq'].peak_mb:.0f} MB",
            flush=True,
        )


def cell(k: int, m: Measure | None, spec: str) -> str:
    """GB/s in a table cell, or a dash for a rule that was not run."""
    return "–" if m is None else format(gbps(k, m), spec)


def targets(rows: list[dict[str, Any]]) -> list[str]:
    """The issue's targets at the largest K, as ratios to this run's one-at-a-time path."""
    kmax = max(r["k"] for r in rows)
    at = {r["name"]: r for r in rows if r["k"] == kmax}
    lines = []
    if "fedavg" in at:
        r = at["fedavg"]
        ratio = gbps(kmax, r["store"]) / gbps(kmax, r["seq"])
        lines.append(
            f"- FedAvg from storage at K = {kmax}: {gbps(kmax, r['store']):.2f} GB/s, "
            f"**{ratio:.1f}×** the one-at-a-time path's {gbps(kmax, r['seq']):.2f} GB/s in this run "
            f"(target: at least 2×; {'met' if ratio >= 2 else 'missed'})."
        )
    for name in ("fedmedian", "trimmedmean"):
        if name in at:
            r = at[name]
            share = r["store"].peak_mb / r["seq"].peak_mb
            lines.append(
                f"- {name} peak memory at K = {kmax}: {r['store'].peak_mb:.0f} MB from the spool, "
                f"**{share:.1%}** of the {r['seq'].peak_mb:.0f} MB of the one-at-a-time path, which holds all "
                f"K updates (target: at most 25%; {'met' if share <= 0.25 else 'missed'})."
            )
    return lines


def write(
    path: Path,
    rows: list[dict[str, Any]],
    checks: list[dict[str, Any]],
    stages: dict[str, dict[str, float]],
    flwr_version: str,
    load: tuple[float, ...],
    secs: float,
) -> None:
    mb = UPDATE_BYTES / 1e6
    lines = [
        "# Aggregation benchmark",
        "",
        f"Written by `make bench` (`python -m bench`) on {datetime.date.today().isoformat()} in {secs:.0f} s.",
        "",
        f"- Machine: {machine()}; load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f} "
        "(a shared machine: other work ran beside the benchmark).",
        f"- Software: Python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"flwr {flwr_version}.",
        f"- Updates: LoRA r = {RANK} on q, k, v, o of a 32-layer, hidden-{HIDDEN} Llama (7B class): "
        f"{len(shapes())} tensors, {UPDATE_BYTES / 4 / 1e6:.1f} M values, {mb:.1f} MB float32 "
        "each, generated (seeded normal values), in a file:// store on local disk.",
        "- **ours, storage**: what the aggregator does when it closes a round. FedAvg and FedAdam (single "
        "pass) get the accepted updates read again from storage on a pool of 2 threads, 2 updates ahead "
        "(capped read, sha256 against the marker, decode as views of the bytes: what was validated at the "
        "check is proven the same by its digest); median, trimmed mean and Krum read them one tensor at a "
        "time from the private spool the checks wrote. **one at a time**: the same-run baseline: get, "
        "sha256, decode, validate, each update in turn on one thread as the strategy reaches it (all K "
        "held where the rule needs them together). **memory**: the same tensors already in memory. **Flower**: "
        "Flower's own function for the rule on the same buffers (`aggregate_inplace` on `FitRes` bytes for "
        "FedAvg, `FedAdam.aggregate_fit` likewise, `aggregate_median`, `aggregate_trimmed_avg`, "
        "`aggregate_krum`). **copy**: `np.copyto` of the same bytes into a one-update buffer (read + write: "
        "the bandwidth baseline), measured beside each row.",
        f"- Throughput: GB/s of update bytes consumed (K × {mb:.1f} MB / seconds), best of up "
        f"to 3 runs (one where a run takes over 3 s), except where a pooled path is set against one at a time "
        f"(the storage columns of FedAvg and FedAdam, and the checks): there the two take turns, {PAIRED} runs "
        "each, best of each. Peak: rise of the process's peak RSS above its RSS "
        "at the start of the run (MB); in the memory rows the K inputs are already resident and not "
        "counted; the spool and the store live in the page cache, not in the process.",
        f"- Trimmed mean cuts {TRIM:.0%} from each end; Krum assumes f = max(1, K/10).",
    ]
    for name, st in stages.items():
        lines.append(
            f"- Per update ({mb:.1f} MB), in ms, {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in st.items()) + "."
        )
    lines += [
        "- Those steps are timed alone, at the start. Within a run a read costs less on both paths: its buffer "
        "reuses pages that earlier ones freed (the aggregator has its pool's threads share the main heap "
        "for this), where the first read of a fresh process maps new ones. The storage peaks of FedAvg and "
        "FedAdam include such reused pages.",
        "",
        "## Targets",
        "",
        *targets(rows),
        "",
        "## Aggregation",
        "",
    ]
    lines += [
        "| strategy | K | ours, storage GB/s | one at a time GB/s | ours ÷ one at a time | ours, memory GB/s "
        "| Flower GB/s | copy GB/s | memory ÷ Flower | memory ÷ copy | peak MB: ours storage | one at a time "
        "| ours memory | Flower |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        k, fl = r["k"], r["flower"]
        s, q, m, c = (gbps(k, r[x]) for x in ("store", "seq", "mem", "copy"))
        lines.append(
            f"| {r['name']} | {k} | {s:.2f} | {q:.2f} | {s / q:.1f}× | {m:.2f} | {cell(k, fl, '.3f')} | {c:.2f} "
            f"| {'–' if fl is None else f'{m / gbps(k, fl):.1f}×'} | {m / c:.0%} | {r['store'].peak_mb:.0f} "
            f"| {r['seq'].peak_mb:.0f} | {r['mem'].peak_mb:.0f} | {'–' if fl is None else f'{fl.peak_mb:.0f}'} |"
        )
    if any(r["flower"] is None for r in rows):
        lines += ["", "–: not run, as it would have needed more memory than the machine had free then."]
    lines += [
        "",
        "## Checking the round's updates",
        "",
        "Every update is checked once, as it arrives during the round and before any is aggregated: a HEAD "
        "for its size, a capped read, sha256, header and byte ranges, decode, finite values and norm. **one "
        "at a time**: each update in turn, with a copying decode and the norm taken in a second pass; "
        "**ahead**: on the pool, "
        "decoding as views and taking the norm in the validating pass; **ahead + spool**: also writing "
        "each accepted update's bytes to the private spool, as for a strategy that needs them all at once.",
        "",
        "| K | one at a time GB/s | ahead GB/s | ahead ÷ one at a time | ahead + spool GB/s "
        "| peak MB: one at a time | ahead | ahead + spool |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in checks:
        k = c["k"]
        q, a, sp = (gbps(k, c[x]) for x in ("seq", "ahead", "spool"))
        lines.append(
            f"| {k} | {q:.2f} | {a:.2f} | {a / q:.1f}× | {sp:.2f} | {c['seq'].peak_mb:.0f} "
            f"| {c['ahead'].peak_mb:.0f} | {c['spool'].peak_mb:.0f} |"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
