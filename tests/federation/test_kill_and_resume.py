"""SIGKILL of the aggregator or a client mid-round: restarted, the run finishes and no committed
round is redone or lost."""

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

from fedtune.federation import protocol as p
from fedtune.storage import ObjectStore, open_store
from tests.federation.conftest import TOPICS, tiny_resource, write_data

pytestmark = pytest.mark.slow


def wait(check: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


class Fleet:
    """The aggregator and clients as the pods would run them."""

    def __init__(self, spec: Path, root: str, logs: Path) -> None:
        self.spec, self.root, self.logs = spec, root, logs
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str) -> None:
        args = ["aggregator", "--spec", str(self.spec)] if name == "aggregator" else ["client", "--name", name]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        with (self.logs / f"{name}.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", "fedtune", *args, "--run-root", self.root], stdout=log, stderr=log, env=env
            )

    def kill(self, name: str) -> None:
        self.procs[name].send_signal(signal.SIGKILL)
        self.procs[name].wait()

    def wait_all(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for name, proc in self.procs.items():
            code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            assert code == 0, f"{name} exited {code}: {(self.logs / f'{name}.log').read_text()[-2000:]}"

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[tuple[Fleet, ObjectStore]]:
    write_data(tmp_path / "data")
    doc = tiny_resource(tmp_path / "data", training={"localSteps": 12}, aggregation={"rounds": 4})
    spec = tmp_path / "spec.yaml"
    spec.write_text(yaml.safe_dump(doc))
    (tmp_path / "logs").mkdir()
    f = Fleet(spec, str(tmp_path / "root"), tmp_path / "logs")
    try:
        yield f, open_store(f.root)
    finally:
        f.stop()


def committed(store: ObjectStore) -> dict[str, bytes]:
    return {k: store.get(k) for k in store.list("rounds") if k.endswith(".json")}


def test_killed_aggregator_and_client_resume_without_redoing_rounds(fleet: tuple[Fleet, ObjectStore]) -> None:
    f, store = fleet
    f.start("aggregator")
    for name in TOPICS:
        f.start(name)

    # The aggregator dies while round 1 is open: one update is in, the round is not closed.
    wait(lambda: store.exists(p.global_marker(1)) and store.list("rounds/000001/updates"), 240, "round 1 updates")
    f.kill("aggregator")
    before = committed(store)
    assert p.global_marker(1) in before and p.summary(0) in before
    f.start("aggregator")

    # A client dies in round 2 before its update is committed: the round waits for it.
    wait(lambda: store.exists(p.global_marker(2)), 240, "global 2")
    victim = "gamma"
    if store.exists(p.update_marker(2, victim)):
        pytest.fail("client finished round 2 before it could be killed; raise localSteps")
    f.kill(victim)
    f.start(victim)

    f.wait_all(timeout=300)
    after = committed(store)
    assert all(after[k] == v for k, v in before.items()), "a committed record was rewritten"
    final = p.read_record(store, p.FINAL_SUMMARY, p.FinalSummary)
    assert final is not None and final.rounds == 4
    s2 = p.read_record(store, p.summary(2), p.RoundSummary)
    assert s2 is not None and victim in s2.participants
    for r in range(4):
        s = p.read_record(store, p.summary(r), p.RoundSummary)
        assert s is not None and s.participants == sorted(TOPICS), (r, s)
