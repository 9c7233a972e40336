"""The operator's own work: apply → Jobs, API requests per tick at steady state, RSS and CPU with 50 runs.

The test cluster (tests/cluster/harness) starts from cached binaries, the CRDs are installed, and
`fedtune operator` runs as a process watching one namespace, as in the operator tests. Every run's
pods select a node pool that does not exist, so they stay Pending: nothing trains, and all that is
measured is the operator.

- apply → all Jobs: from just before the create call to the watch event of the run's last Job
  (aggregator + one per client), for 1, 10, 100 and the spec's maximum of clients; each run is then
  deleted and its children collected before the next.
- requests per pass: the kube-apiserver's own `apiserver_request_total`, read before and after a
  window at steady state (every Job exists, no status changing), counting the verbs and resources the
  operator uses (LIST jobs, pods, secrets; GET configmaps; POST jobs, secrets, configmaps, services;
  LIST and PATCH federatedfinetunes), divided by the passes in the window. A pass is one call of a
  run's timer, which kopf logs; the window opens as one pass ends and closes as the passes of its
  length in ticks have ended, so it holds whole passes. A POST answered 409 is a failed create. The
  same window with no run shows what the other components add to those counters.
- RSS and CPU: /proc of the operator process (VmRSS sampled through the window, utime + stime over
  it), idle with no run, then with 50 runs of 3 clients at once.
- where the CPU goes: a second operator process, run under bench/profiled.py with the 50 runs in
  place, its CPU time sorted into S3 client set-up, S3 requests, Kubernetes API calls, and model
  objects turned back into dicts.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import os
import pstats
import queue
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import watch
from kubernetes.client.exceptions import ApiException
from prometheus_client.parser import text_string_to_metric_families
from tests.cluster.harness import build
from tests.cluster.harness.cluster import BUCKET, Cluster
from tests.cluster.harness.procs import wait_for
from tests.operator.conftest import Operator, Runs, tiny_run
from urllib3.exceptions import ProtocolError

from bench.__main__ import machine
from fedtune.api import API_GROUP, API_VERSION, PLURAL
from fedtune.api.spec import MAX_CLIENTS
from fedtune.controller.builders import RUN_LABEL

REPO = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results" / "operator.md"
TICK = float(os.environ.get("FEDTUNE_RECONCILE_SECONDS", "3"))
NAMESPACE = "bench"
# kopf logs this line for each finished call of a run's timer: one reconcile pass.
TICK_DONE = b"Timer 'tick' succeeded."
# No node carries this pool: every pod of a benchmark run stays Pending.
HELD = {"fedtune.io/pool": "held"}
OPERATOR_RESOURCES = {"jobs", "pods", "secrets", "configmaps", "services", PLURAL}
# What the other components do to those resources: the job controller's pods and Job status, the
# scheduler's bindings, the node agent's pod status (its lists span all namespaces: scope "cluster"), the
# garbage collector's reads of an owner (the operator patches runs and never reads one).
OTHERS = {
    ("POST", "pods"),
    ("PUT", "jobs"),
    ("PATCH", "jobs"),
    ("PATCH", "pods"),
    ("PUT", "pods"),
    ("DELETE", "pods"),
    ("GET", PLURAL),
}

Key = tuple[str, str, str]  # verb, resource, code


def resource(name: str, clients: int) -> dict[str, Any]:
    """A run of `clients` clients whose pods never leave Pending."""
    return tiny_run(
        name,
        clients=[
            {"name": f"c{i:03d}", "data": {"uri": f"s3://{BUCKET}/tiny/c{i:03d}.jsonl"}, "nodeSelector": HELD}
            for i in range(clients)
        ],
        aggregation={"minClients": 1},
        aggregator={"nodeSelector": HELD},
    )


# --- what the operator process and the API server tell --------------------------------------------


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def proc_rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(field_name)


def api_requests(cluster: Cluster) -> collections.Counter[Key]:
    """The API server's request counters for what the operator does, by verb, resource and code."""
    status, body = cluster.control_plane.get("/metrics", timeout=30)
    assert status == 200, f"/metrics answered {status}"
    counts: collections.Counter[Key] = collections.Counter()
    for family in text_string_to_metric_families(body.decode()):
        for s in family.samples:
            if s.name != "apiserver_request_total":
                continue
            verb, res = s.labels["verb"], s.labels["resource"]
            scope = s.labels.get("scope", "")
            if res in OPERATOR_RESOURCES and verb != "WATCH" and scope != "cluster" and (verb, res) not in OTHERS:
                counts[(verb, res, s.labels["code"])] += int(s.value)
    return counts


@dataclass
class Window:
    """The operator's work over a stretch of steady state."""

    seconds: float
    runs: int
    passes: int
    requests: collections.Counter[Key]
    cpu_percent: float
    rss_mb: float
    rss_peak_mb: float

    @property
    def kept(self) -> float:
        """The share of nominal ticks (one per run every TICK seconds) that ran."""
        return self.passes / (self.seconds / TICK * self.runs)

    def per_pass(self, requests: float) -> float:
        return requests / self.passes

    @property
    def total(self) -> int:
        return sum(self.requests.values())

    @property
    def failed_creates(self) -> int:
        return failed(self.requests)

    def breakdown(self) -> str:
        """Requests by verb and resource: per pass, or in the whole window when no run ticks."""
        by: collections.Counter[str] = collections.Counter()
        for (verb, res, code), n in self.requests.items():
            by[f"{verb} {res}" + ("" if code.startswith("2") else f" ({code})")] += n
        scale = self.per_pass if self.passes else float
        return ", ".join(f"{k} {scale(n):.2f}" for k, n in sorted(by.items()) if n) or "none"


class Passes:
    """The passes the operator logged since this object was made (or since `reset`)."""

    def __init__(self, log: Path) -> None:
        self.log, self.offset, self.count = log, log.stat().st_size, 0

    def poll(self) -> int:
        with self.log.open("rb") as f:
            f.seek(self.offset)
            chunk = f.read()
        whole = chunk.rfind(b"\n") + 1
        self.count += chunk[:whole].count(TICK_DONE)
        self.offset += whole
        return self.count


def window(cluster: Cluster, op: Operator, pid: int, seconds: float, runs: int) -> Window:
    """Measure over whole passes: from the end of one pass until the passes of `seconds` worth of ticks have
    ended (or 2 × `seconds` have gone by, for an operator that cannot keep up); with no run, `seconds`."""
    passes = Passes(op.log)
    if runs:
        wait_for(lambda: passes.poll() >= 1, 10 * TICK, "a pass", interval=0.05)
        passes.count = 0
    target = round(seconds / TICK * runs)
    before, cpu0, t0 = api_requests(cluster), proc_cpu_seconds(pid), time.monotonic()
    rss = []
    while True:
        rss.append(proc_rss_mb(pid))
        elapsed = time.monotonic() - t0
        if (passes.poll() >= target if runs else elapsed >= seconds) or elapsed >= 2 * seconds:
            break
        time.sleep(0.05)
    cpu1, t1, after = proc_cpu_seconds(pid), time.monotonic(), api_requests(cluster)
    return Window(
        seconds=t1 - t0,
        runs=runs,
        passes=passes.count,
        requests=after - before,
        cpu_percent=100 * (cpu1 - cpu0) / (t1 - t0),
        rss_mb=max(rss),
        rss_peak_mb=proc_rss_mb(pid, "VmHWM"),
    )


def failed(requests: collections.Counter[Key]) -> int:
    return sum(n for (verb, _, code), n in requests.items() if verb == "POST" and code == "409")


# --- runs -------------------------------------------------------------------------------------------


class JobWatch:
    """Arrival times of a namespace's Jobs (by run), from a watch opened before the runs are applied."""

    def __init__(self, cluster: Cluster, namespace: str) -> None:
        self.batch = cluster.batch()
        self.namespace = namespace
        self.events: queue.Queue[tuple[str, str, float]] = queue.Queue()
        self.seen: dict[str, set[str]] = collections.defaultdict(set)
        self.last: dict[str, float] = {}
        rv = self.batch.list_namespaced_job(namespace).metadata.resource_version
        self.thread = threading.Thread(target=self._stream, args=(rv,), daemon=True)
        self.thread.start()

    def _stream(self, rv: str) -> None:
        """Until the cluster stops: a watch that ends or breaks resumes from the last version it saw."""
        while True:
            try:
                for event in watch.Watch().stream(
                    self.batch.list_namespaced_job, self.namespace, resource_version=rv, timeout_seconds=300
                ):
                    job = event["object"]
                    rv = job.metadata.resource_version
                    if event["type"] == "ADDED":
                        run = (job.metadata.labels or {}).get(RUN_LABEL, "")
                        self.events.put((run, job.metadata.name, time.monotonic()))
            except (ApiException, ProtocolError, OSError):
                time.sleep(1.0)

    def wait(self, jobs: dict[str, int], timeout: float) -> dict[str, float]:
        """When each run had its number of Jobs (monotonic time of the last one's event)."""
        deadline = time.monotonic() + timeout
        while any(len(self.seen[run]) < n for run, n in jobs.items()):
            try:
                run, job, at = self.events.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                missing = {run: n - len(self.seen[run]) for run, n in jobs.items() if len(self.seen[run]) < n}
                raise TimeoutError(f"Jobs still missing after {timeout:g}s: {missing}") from None
            self.seen[run].add(job)
            self.last[run] = at
        return {run: self.last[run] for run in jobs}


def settle(runs: Runs, names: list[str], timeout: float = 180) -> None:
    """Wait until every run has a state and no run's status changes over three reads two ticks apart."""
    deadline = time.monotonic() + timeout
    seen: list[dict[str, Any]] = []
    while True:
        seen = [*seen[-2:], {name: runs.get(name).get("status") or {} for name in names}]
        if len(seen) == 3 and seen[0] == seen[1] == seen[2] and all(s.get("state") for s in seen[2].values()):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"status of {len(names)} runs still changing after {timeout:g}s")
        time.sleep(2 * TICK)


def delete_all(cluster: Cluster, runs: Runs, timeout: float = 300) -> None:
    """Delete every run and wait until they and their Jobs are gone (collected through ownerReferences)."""
    api = runs.api
    for item in api.list_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL)["items"]:
        try:
            api.delete_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL, item["metadata"]["name"])
        except ApiException as e:
            if e.status != 404:
                raise

    def gone() -> bool:
        left = runs.api.list_namespaced_custom_object(API_GROUP, API_VERSION, NAMESPACE, PLURAL)["items"]
        return not left and not cluster.batch().list_namespaced_job(NAMESPACE, limit=1).items

    wait_for(gone, timeout, "runs and their Jobs deleted", interval=1.0)


@dataclass
class Results:
    jobs_seconds: dict[int, float] = field(default_factory=dict)
    windows: dict[str, Window] = field(default_factory=dict)
    many_jobs_seconds: float = 0.0
    creation_failed: int = 0
    profile: dict[str, float] = field(default_factory=dict)


def measure(cluster: Cluster, op: Operator, sizes: list[int], steady: set[int], many: int, seconds: float) -> Results:
    out = Results()
    runs = Runs(cluster, NAMESPACE)
    jobs = JobWatch(cluster, NAMESPACE)
    pid = op.start().pid
    time.sleep(2 * TICK)  # started, namespace watched
    out.windows["idle"] = window(cluster, op, pid, seconds, 0)
    for n in sizes:
        name = f"size-{n}"
        print(f"bench.operator: {n} clients", flush=True)
        before = api_requests(cluster)
        t0 = time.monotonic()
        runs.create(resource(name, n))
        out.jobs_seconds[n] = jobs.wait({name: n + 1}, 120)[name] - t0
        out.creation_failed += failed(api_requests(cluster) - before)
        if n in steady:
            settle(runs, [name])
            out.windows[f"{n}"] = window(cluster, op, pid, seconds, 1)
        delete_all(cluster, runs)
    print(f"bench.operator: {many} runs of 3 clients", flush=True)
    names = [f"many-{i:02d}" for i in range(many)]
    before = api_requests(cluster)
    t0 = time.monotonic()
    for name in names:
        runs.create(resource(name, 3))
    out.many_jobs_seconds = max(jobs.wait(dict.fromkeys(names, 4), 300).values()) - t0
    out.creation_failed += failed(api_requests(cluster) - before)
    settle(runs, names)
    out.windows["many"] = window(cluster, op, pid, seconds, many)
    op.stop()
    out.profile = profile(cluster, op.log.parent, 2 * seconds)
    return out


# --- where the CPU goes ----------------------------------------------------------------------------

S3_SETUP = "S3 client set-up (boto3 session and client)"
S3_REQUESTS = "S3 requests"
KUBE_CALLS = "Kubernetes API calls (the generated client: request, answer decoded into model objects)"
KUBE_DICTS = "model objects turned back into dicts (sanitize_for_serialization)"


def category(path: str, func: str) -> str | None:
    """The part of the operator's work a profiled entry point stands for (its cumulative time counts)."""
    if path.endswith("boto3/session.py") and func in ("__init__", "client"):
        return S3_SETUP
    if path.endswith("botocore/client.py") and func == "_make_api_call":
        return S3_REQUESTS
    if "/kubernetes/client/api/" in path and not func.startswith("_") and not func.endswith("_info"):
        return KUBE_CALLS
    if path.endswith("kubernetes/client/api_client.py") and func == "sanitize_for_serialization":
        return KUBE_DICTS
    return None


def profile(cluster: Cluster, folder: Path, seconds: float) -> dict[str, float]:
    """CPU seconds by category, from a second operator process profiled in every thread (bench/profiled.py)
    over `seconds` with the runs in place; "all" is the whole process, start-up included."""
    out = folder / "operator.prof"
    env = {**os.environ, **cluster.env(), "FEDTUNE_PROFILE": str(out)}
    with (folder / "profiled.log").open("ab") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "bench.profiled", "operator", "-n", NAMESPACE, "--standalone"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=REPO,
        )
    try:
        time.sleep(seconds)
    finally:
        proc.terminate()
        proc.wait(60)
    stats = pstats.Stats(str(out)).stats  # type: ignore[attr-defined]
    shares: collections.Counter[str] = collections.Counter()
    for (path, _, func), (_, _, tottime, cumtime, _) in stats.items():
        shares["all"] += tottime
        part = category(path, func)
        if part is not None:
            shares[part] += cumtime
    return dict(shares)


# --- the report ------------------------------------------------------------------------------------


def write(r: Results, many: int, load: tuple[float, ...], secs: float) -> None:
    idle, busy = r.windows["idle"], r.windows["many"]
    one = r.windows.get("1")
    base_jobs = r.jobs_seconds[min(r.jobs_seconds)]
    lines = [
        "# Operator benchmark",
        "",
        f"Written by `make bench` (`python -m bench.operator`) on {datetime.date.today()} in {secs:.0f} s.",
        "",
        f"- Machine: {machine()}; load average at start {load[0]:.1f}, at end {os.getloadavg()[0]:.1f} "
        "(a shared machine: other work ran beside the benchmark). The operator, the whole control plane "
        "(etcd, kube-apiserver, controller-manager, scheduler), the node agent and S3 share these cores.",
        f"- Cluster: the test cluster (tests/cluster), Kubernetes {build.KUBERNETES_VERSION}; `fedtune operator` as "
        f"a process watching one namespace, tick {TICK:g} s (FEDTUNE_RECONCILE_SECONDS, the default).",
        "- Runs: the tiny federation's spec with N clients, storage in the cluster's S3 server; every pod selects "
        "a node pool that does not exist, so pods stay Pending and only the operator works.",
        "- How each figure is taken: see the docstring of bench/operator.py. Requests are the API server's "
        "`apiserver_request_total` for the operator's verbs and resources, over a window of "
        f"{idle.seconds:.0f} s ({busy.seconds:.0f} s with {many} runs) at steady state. A pass is one call of a "
        "run's timer (kopf logs each): one tick when the operator keeps up.",
        "- Targets: 100 clients' Jobs within 5 s of apply; requests per tick independent of the number of clients "
        f"and no failed creates; with {many} runs RSS at most 150 MB and CPU at most 25% of a core.",
        "",
        "## Apply → all child Jobs",
        "",
        "| clients | Jobs | seconds | per Job, ms | ÷ 1 client |",
        "| ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, sec in sorted(r.jobs_seconds.items()):
        lines.append(f"| {n} | {n + 1} | {sec:.2f} | {1000 * sec / (n + 1):.0f} | {sec / base_jobs:.1f}× |")
    lines += [
        f"| {many} runs × 3 | {many * 4} | {r.many_jobs_seconds:.2f} | {1000 * r.many_jobs_seconds / (many * 4):.0f} "
        f"| {r.many_jobs_seconds / base_jobs:.1f}× |",
        "",
        f"Failed creates (POST answered 409) while the Jobs were created: {r.creation_failed}.",
        "",
        "## Steady state: API requests per pass",
        "",
        "| runs × clients | passes ÷ ticks | requests / pass | ÷ 1 client | failed creates | operator CPU | "
        "CPU ms / pass | by verb and resource, per pass |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for key, w in r.windows.items():
        label = {"idle": "none (idle)", "many": f"{many} × 3"}.get(key, f"1 × {key}")
        if not w.passes:
            lines.append(
                f"| {label} | - | - | - | {w.failed_creates} | {w.cpu_percent:.1f}% | - | "
                f"in the whole window: {w.breakdown()} |"
            )
            continue
        ratio = f"{w.per_pass(w.total) / one.per_pass(one.total):.2f}×" if one and one.passes else "-"
        cpu_ms = 10 * w.cpu_percent * w.seconds / w.passes
        lines.append(
            f"| {label} | {w.kept:.2f} | {w.per_pass(w.total):.2f} | {ratio} | {w.failed_creates} | "
            f"{w.cpu_percent:.1f}% | {cpu_ms:.0f} | {w.breakdown()} |"
        )
    lines += [
        "",
        f"## Memory and CPU with {many} runs",
        "",
        "| operator | RSS MB (max) | peak RSS MB | CPU, % of a core | ÷ idle RSS |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, w in (("idle, no run", idle), (f"{many} runs × 3 clients", busy)):
        lines.append(
            f"| {label} | {w.rss_mb:.0f} | {w.rss_peak_mb:.0f} | {w.cpu_percent:.1f} | {w.rss_mb / idle.rss_mb:.2f}× |"
        )
    lines += ["", *where_cpu_goes(r.profile, many), "", *verdict(r, many), ""]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


def where_cpu_goes(shares: dict[str, float], many: int) -> list[str]:
    total = shares.get("all", 0.0)
    if not total:
        return []
    out = [
        f"## Where the CPU goes with {many} runs",
        "",
        f"A second operator process, profiled in every thread on thread CPU time (bench/profiled.py), ran with the "
        f"{many} runs in place; {total:.1f} s of CPU in all, its start-up included:",
        "",
        "| part | CPU s | share |",
        "| --- | ---: | ---: |",
    ]
    for part in (S3_SETUP, S3_REQUESTS, KUBE_CALLS, KUBE_DICTS):
        out.append(f"| {part} | {shares.get(part, 0.0):.1f} | {shares.get(part, 0.0) / total:.0%} |")
    return out


def verdict(r: Results, many: int) -> list[str]:
    def met(ok: bool) -> str:
        return "met" if ok else "**not met**"

    busy = r.windows["many"]
    steady = {k: w for k, w in r.windows.items() if k not in ("idle", "many") and w.passes}
    per_pass = [w.per_pass(w.total) for w in steady.values()] or [float("nan")]
    spread = max(per_pass) / min(per_pass)
    fails = r.creation_failed + sum(w.failed_creates for w in r.windows.values())
    hundred = r.jobs_seconds.get(100)
    kept = ", ".join(f"{k} clients {w.kept:.2f}" for k, w in steady.items())
    out = ["## Targets", ""]
    if hundred is not None:
        out.append(f"- 100 clients' Jobs {hundred:.2f} s after apply: {met(hundred <= 5)} (target ≤ 5 s).")
    out += [
        f"- Requests per pass from {min(r.jobs_seconds)} to {max(r.jobs_seconds)} clients within {spread:.2f}× of "
        f"each other: {met(spread <= 1.1)} (target: independent of the number of clients). Passes per nominal tick: "
        f"{kept}; {busy.kept:.2f} with {many} runs.",
        f"- Failed creates: {fails}: {met(fails == 0)} (target: none).",
        f"- {many} runs: RSS {busy.rss_mb:.0f} MB: {met(busy.rss_mb <= 150)} (target ≤ 150 MB); CPU "
        f"{busy.cpu_percent:.1f}% of a core: {met(busy.cpu_percent <= 25)} (target ≤ 25%).",
    ]
    return [*out, "", *why(r, fails)]


def why(r: Results, fails: int) -> list[str]:
    """What the figures above point at, for the targets they miss."""
    out = []
    if fails:
        steady = sum(w.failed_creates for w in r.windows.values())
        out.append(
            "- A create answered 409 means the object appeared between a pass's list of the run's children and its "
            f"POST: two passes over the same run at once. {r.creation_failed} came while runs' children were created, "
            f"{steady} in the steady windows: kopf starts a run's timer on its first event, beside the create "
            "handler, and both create what is missing."
        )
    patched = {k: w for k, w in r.windows.items() if any(res == PLURAL and v == "PATCH" for v, res, _ in w.requests)}
    if patched:
        out.append(
            f"- Status was written at steady state ({', '.join(patched)}): something status reports changed "
            "between passes; with every pod held Pending, likely the scheduler's Unschedulable message, which "
            "status quotes and the scheduler rewrites as it retries (passes of one run never overlap)."
        )
    shares, total = r.profile, r.profile.get("all", 0.0)
    if total and shares.get(S3_SETUP, 0.0) / total >= 0.1:
        out.append(
            f"- {shares[S3_SETUP] / total:.0%} of the CPU builds S3 clients: the run's store is opened afresh on every "
            "pass, and each boto3 Session loads and parses botocore's data files (endpoints, the S3 model) anew."
        )
    if total and (shares.get(KUBE_CALLS, 0.0) + shares.get(KUBE_DICTS, 0.0)) / total >= 0.1:
        kube = shares.get(KUBE_CALLS, 0.0) + shares.get(KUBE_DICTS, 0.0)
        out.append(
            f"- {kube / total:.0%} goes to Kubernetes calls: each pass lists the run's Jobs, pods and labelled "
            "Secrets (three requests, whatever the number of clients); an index over them kept by watches would "
            "make a pass list nothing."
        )
    return out


def start_cluster(folder: Path) -> Cluster:
    missing = [n for n, path in build.binaries().items() if not path.is_file()]
    if missing:
        raise SystemExit(f"cluster binaries not built ({', '.join(missing)}): run `make cluster-deps`")
    cluster = Cluster(folder / "cluster").start()
    try:
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
        core = cluster.core()
        core.create_namespace({"metadata": {"name": NAMESPACE}})
        cluster.put_s3_secret(NAMESPACE)
        wait_for(lambda: core.read_namespaced_service_account("default", NAMESPACE), 30, "service account")
    except BaseException:
        cluster.stop()
        raise
    return cluster


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.operator", description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default=f"1,10,100,{MAX_CLIENTS}", help="clients per run, comma-separated")
    ap.add_argument("--steady", default=f"1,100,{MAX_CLIENTS}", help="sizes whose steady state is measured")
    ap.add_argument("--runs", type=int, default=50, help="runs of 3 clients at once")
    ap.add_argument("--window", type=float, default=30.0, help="seconds of each steady-state window")
    args = ap.parse_args()
    sizes = [int(x) for x in args.sizes.split(",")]
    steady = {int(x) for x in args.steady.split(",")}
    t0, load = time.monotonic(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix=f"fedtune-bench-{secrets.token_hex(3)}-") as tmp:
        cluster = start_cluster(Path(tmp))
        op = Operator(cluster, NAMESPACE, Path(tmp) / "operator.log")
        try:
            results = measure(cluster, op, sizes, steady, args.runs, args.window)
        finally:
            op.stop()
            cluster.stop()
    write(results, args.runs, load, time.monotonic() - t0)
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
