"""SIGKILL of the aggregator or a client mid-round: restarted, the run finishes and no committed
round is redone or lost. Two aggregators on one run: exactly one commits, and a stale one (paused past
its lease) commits nothing once it wakes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from fedtune.api import load_resource
from fedtune.federation import protocol as p
from fedtune.federation.records import Ledger
from fedtune.federation.signing import AGGREGATOR, client_party
from fedtune.federation.verify import verify_run
from fedtune.local.identities import CONFIG, key_path, local_config, local_ledger
from fedtune.local.runner import resolve_paths
from tests.federation.conftest import TOPICS, tiny_resource, write_data

pytestmark = pytest.mark.slow


def wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


LEASE_SECONDS = 2


class Fleet:
    """The aggregator and clients as the pods would run them, each with its own key."""

    def __init__(
        self,
        spec: Path,
        root: Path,
        logs: Path,
        store: str | None = None,
        env: dict[str, dict[str, str]] | None = None,
    ) -> None:
        """Keys and config in `root`; records in `store` (default: `root` itself); `env` per party name."""
        self.root, self.logs, self.store = root, logs, store or str(root)
        self.env = env or {}
        resource = load_resource(spec)
        local_config(root, resource.model_copy(update={"spec": resolve_paths(resource.spec, spec.parent)}))
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        """Start a client by its name, or an aggregator under any name starting with 'aggregator'."""
        party = AGGREGATOR if name.startswith("aggregator") else client_party(name)
        command = ["aggregator"] if party == AGGREGATOR else ["client", "--name", name]
        common = ["--run-root", self.store, "--config", str(self.root / CONFIG)]
        own = self.env.get("aggregator" if party == AGGREGATOR else name, {})
        env = {**os.environ, "OMP_NUM_THREADS": "1", "FEDTUNE_LEASE_SECONDS": str(LEASE_SECONDS), **own}
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedtune", *command, *common, "--signing-key", str(key_path(self.root, party))],
                stdout=log,
                stderr=log,
                env=env,
            )

    def signal(self, name: str, sig: signal.Signals) -> None:
        self.procs[name].send_signal(sig)

    def kill(self, name: str) -> None:
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait()

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(errors="replace")

    def wait_all(self, timeout: float, codes: dict[str, int] | None = None) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            want = (codes or {}).get(name, 0)
            assert code == want, f"{name} exited {code}, not {want}: {self.log(name)[-2000:]}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, Ledger]]:
    write_data(tmp_path / "data")
    doc = tiny_resource(tmp_path / "data", training={"localSteps": 12}, aggregation={"rounds": 4})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    (tmp_path / "logs").mkdir()
    f = Fleet(spec, tmp_path / "root", tmp_path / "logs")
    try:
        yield f, local_ledger(f.root)
    finally:
        f.stop()


def committed(ledger: Ledger) -> dict[str, bytes]:
    """Every committed record of the run, by key (a client's ready record changes on each start, by design)."""
    store = ledger.store
    keys = [k for prefix in (p.COORDINATOR, p.CLIENTS) for k in store.list(prefix)]
    return {k: store.get(k) for k in keys if k.endswith(".json") and not k.endswith("/ready.json")}


def test_killed_aggregator_and_client_resume_without_redoing_rounds(fleet: tuple[Fleet, Ledger]) -> None:
    f, ledger = fleet
    store = ledger.store
    f.start("aggregator")
    for name in TOPICS:
        f.start(name)

    # The aggregator dies while round 1 is open: one update is in, the round is not closed.
    wait(
        lambda: store.exists(p.global_marker(1)) and any(store.exists(p.update_marker(1, c)) for c in TOPICS),
        240,
        "round 1 updates",
    )
    f.kill("aggregator")
    before = committed(ledger)
    assert p.global_marker(1) in before and p.update_marker(0, "alpha") in before
    f.start("aggregator")

    # A client dies in round 2 before its update is committed: the round waits for it.
    wait(lambda: store.exists(p.global_marker(2)), 240, "global 2")
    victim = "gamma"
    if store.exists(p.update_marker(2, victim)):
        pytest.fail("client finished round 2 before it could be killed; raise localSteps")
    f.kill(victim)
    f.start(victim)

    f.wait_all(timeout=300)
    after = committed(ledger)
    assert all(after[k] == v for k, v in before.items()), "a committed record was rewritten"
    final = ledger.final()
    assert final is not None and final.rounds == 4
    s2 = ledger.summary(2)
    assert s2 is not None and victim in s2.participants
    for r in range(4):
        s = ledger.summary(r)
        assert s is not None and s.participants == sorted(TOPICS), (r, s)
    # The restarted aggregator took a new lease epoch; the chain still verifies end to end.
    verified = verify_run(ledger)
    assert verified.final == final and sorted(set(verified.epochs)) == [1, 2]


def test_two_aggregators_started_together_one_commits(fleet: tuple[Fleet, Ledger]) -> None:
    f, ledger = fleet
    f.start("aggregator-a")
    f.start("aggregator-b")
    for name in TOPICS:
        f.start(name)
    f.wait_all(timeout=300)
    standby = [n for n in ("aggregator-a", "aggregator-b") if "standing by" in f.log(n)]
    assert len(standby) == 1, "exactly one aggregator must stand by"
    assert "finished by another aggregator" in f.log(standby[0])
    verified = verify_run(ledger)
    assert verified.final is not None and set(verified.epochs) == {1}


def test_a_stale_aggregator_commits_nothing_after_its_lease_was_taken(fleet: tuple[Fleet, Ledger]) -> None:
    """Paused past its lease (a GC pause, a partitioned node), the old aggregator wakes to a newer epoch."""
    f, ledger = fleet
    store = ledger.store
    f.start("aggregator-old")
    for name in TOPICS:
        f.start(name)
    wait(lambda: store.exists(p.global_marker(1)), 240, "global 1")
    f.signal("aggregator-old", signal.SIGSTOP)
    f.start("aggregator-new")
    wait(lambda: store.exists(p.lease_claim(2)), 60, "the new aggregator's lease")
    wait(lambda: store.exists(p.global_marker(2)), 240, "global 2 from the new aggregator")
    f.signal("aggregator-old", signal.SIGCONT)
    f.wait_all(timeout=300, codes={"aggregator-old": 1})
    assert "was taken over by epoch 2" in f.log("aggregator-old")
    verified = verify_run(ledger)
    assert verified.final is not None
    assert all(e == 1 for e in verified.epochs[:2]) and all(e == 2 for e in verified.epochs[2:])
