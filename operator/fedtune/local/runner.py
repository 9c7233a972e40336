"""`fedtune run`: the aggregator and every client as local processes over one run root.

The processes are the very commands the pods run (`fedtune aggregator`, `fedtune client`); this module
only starts them, restarts a crashed one up to spec.backoffLimit, and shows progress read from storage.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from fedtune.api import FederatedFineTune, FederatedFineTuneSpec, load_resource
from fedtune.errors import FedtuneError
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.federation.signing import AGGREGATOR, client_party
from fedtune.local import progress, report
from fedtune.local.identities import CONFIG, key_path, local_config
from fedtune.storage import ObjectStore, open_store
from fedtune.storage.local_fs import FileStore
from fedtune.training.data import read_jsonl
from fedtune.training.sources import resolve_model


@dataclass
class Proc:
    """A supervised child process and its restarts."""

    name: str
    argv: list[str]
    log: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    failed: str | None = None
    done: bool = False

    def start(self) -> None:
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as out:
            self.popen = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT, env=self.env)

    def last_error(self) -> str:
        lines = [ln for ln in self.log.read_text(errors="replace").splitlines() if ln.strip()]
        errors = [ln for ln in lines if ln.startswith("error:")]
        return (errors or lines or ["exited"])[-1].removeprefix("error: ")

    def stop(self) -> None:
        if self.popen and self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()


def resolve_paths(spec: FederatedFineTuneSpec, base_dir: Path) -> FederatedFineTuneSpec:
    """Data paths relative to the spec file become absolute file:// URLs, and a model folder an absolute
    path, so spec.json stands alone."""
    spec = spec.model_copy(deep=True)
    for c in spec.clients:
        for attr in ("uri", "eval_uri"):
            uri = getattr(c.data, attr)
            if uri and "://" not in uri:
                setattr(c.data, attr, f"file://{(base_dir / uri).resolve()}")
    if spec.model.path and spec.model.volume is None:
        spec.model.path = str((base_dir / Path(spec.model.path).expanduser()).resolve())
    return spec


def run_root(resource: FederatedFineTune, output: Path | None) -> ObjectStore:
    """The run's store: {output}/{name}, or {spec.storage.uri}/{name} when no output folder is given."""
    storage = resource.spec.storage
    root = str(output) if output is not None else storage.uri
    store = open_store(root, endpoint=storage.endpoint, region=storage.region, base_dir=Path.cwd())
    return store.child(resource.metadata.name)


def run_folder(store: ObjectStore, output: Path | None, name: str) -> Path:
    """The local folder of a run: its root when that is local, else {output}/{name} for what stays here."""
    return store.root if isinstance(store, FileStore) else (output or Path("fedtune-runs")) / name


def preflight(spec: FederatedFineTuneSpec, store: ObjectStore) -> None:
    """Problems a user can fix, found before any process starts: unreachable storage, unreadable data, a
    missing model folder; a uri model is downloaded here once, into the cache the processes share."""
    store.check()
    resolve_model(spec)
    for i, c in enumerate(spec.clients):
        for field, uri in (("uri", c.data.uri), ("evalUri", c.data.eval_uri)):
            if uri:
                # Reading every record checks every line a client will read, holding one line at a time.
                for _ in read_jsonl(uri, c.data, f"spec.clients[{i}].data.{field}", spec.storage.endpoint):
                    pass


def child_env(n_procs: int) -> dict[str, str]:
    """Threads split over the cores so the processes do not oversubscribe the machine."""
    env = dict(os.environ)
    threads = str(max(1, (os.cpu_count() or 1) // n_procs))
    env.setdefault("OMP_NUM_THREADS", threads)
    env.setdefault("MKL_NUM_THREADS", threads)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class LocalRun:
    """Supervises one run on this machine until the final adapter exists or the run cannot go on."""

    def __init__(
        self, spec_path: Path, output: Path | None = None, fresh: bool = False, console: Console | None = None
    ):
        resource = load_resource(spec_path)
        self.name = resource.metadata.name
        self.spec = resolve_paths(resource.spec, spec_path.parent)
        self.store = run_root(resource, output)
        self.folder = run_folder(self.store, output, self.name)
        if fresh:
            if not isinstance(self.store, FileStore):
                raise FedtuneError(f"--fresh deletes a local run folder; this run's root is {self.store.uri}")
            shutil.rmtree(self.folder, ignore_errors=True)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config = local_config(self.folder, resource.model_copy(update={"spec": self.spec}))
        self.ledger = Ledger(self.store, self.config.trust)
        self.console = console or Console()

    def _procs(self) -> list[Proc]:
        base = [sys.executable, "-m", "fedtune"]
        env = child_env(len(self.spec.clients) + 1)
        env["FEDTUNE_RUN_NAME"] = self.name
        env["FEDTUNE_NAMESPACE"] = "local"
        if self.spec.storage.endpoint:
            # The processes open the run root before they can read the spec that names the endpoint.
            env["FEDTUNE_S3_ENDPOINT"] = self.spec.storage.endpoint
        logs = self.folder / "logs"
        common = ["--run-root", self.store.uri, "--config", str(self.folder / CONFIG)]

        def key(party: str) -> list[str]:
            return ["--signing-key", str(key_path(self.folder, party))]

        procs = [Proc("aggregator", [*base, "aggregator", *common, *key(AGGREGATOR)], logs / "aggregator.log", env)]
        for c in self.spec.clients:
            argv = [*base, "client", *common, *key(client_party(c.name)), "--name", c.name]
            procs.append(Proc(c.name, argv, logs / f"{c.name}.log", env))
        return procs

    def _supervise(self, procs: list[Proc]) -> None:
        """Restart crashed processes up to backoffLimit; raise once the run cannot finish."""
        for proc in procs:
            if proc.popen is None or proc.done or proc.failed:
                continue
            code = proc.popen.poll()
            if code is None:
                continue
            if code == 0:
                proc.done = True
                continue
            if proc.restarts >= self.spec.backoff_limit:
                proc.failed = proc.last_error()
            else:
                proc.restarts += 1
                proc.start()
        agg = procs[0]
        if agg.failed:
            raise FedtuneError(f"the aggregator failed {agg.restarts + 1} times: {agg.failed}")
        failed = [pr for pr in procs[1:] if pr.failed]
        alive = len(procs) - 1 - len(failed)
        if failed and alive < self.spec.aggregation.min_clients and not self.ledger.finished():
            who = "; ".join(f"client {pr.name} failed: {pr.failed}" for pr in failed)
            raise FedtuneError(f"{who} (fewer than minClients={self.spec.aggregation.min_clients} clients left)")

    def run(self, live: bool = True) -> p.FinalSummary:
        preflight(self.spec, self.store)
        procs = self._procs()
        started = time.monotonic()
        view = progress.Progress(self.ledger, self.spec, procs, self.console, live=live)
        try:
            for proc in procs:
                proc.start()
            with view:
                while not procs[0].done:
                    self._supervise(procs)
                    view.refresh()
                    if procs[0].popen is not None:
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            procs[0].popen.wait(timeout=0.5)
                self._supervise(procs)
                view.refresh()
        finally:
            for proc in procs:
                proc.stop()
        final = self.ledger.final()
        if final is None:
            raise FedtuneError(f"the aggregator exited without a final summary (see {procs[0].log})")
        if final.failed:
            raise FedtuneError(f"the run failed: {final.failed} (see {procs[0].log})")
        records = report.round_records(self.ledger)
        report.write_metrics(records, self.folder)
        report.plot_loss(records, self.folder)
        self.console.print(report.client_table(self.ledger))
        if (comparison := report.baseline_table(self.ledger, self.folder, self.spec)) is not None:
            self.console.print(comparison)
        self.console.print(
            f"{final.rounds} rounds in {time.monotonic() - started:.0f}s; adapter: {final.adapter}\n"
            f"adapter sha256: {final.adapter_sha256} (check the whole run: fedtune verify {self.folder})\n"
            f"metrics: {self.folder / 'metrics.json'}\nplot: {self.folder / 'loss.png'}\n"
            f"logs: {self.folder / 'logs'}"
        )
        return final
