"""The test cluster's kubelet counts every restart, even when a container exits between two looks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.cluster.harness import podspec
from tests.cluster.harness.network import POD_RANGE, PodNetwork
from tests.cluster.harness.runner import Context, PodRunner


def test_a_container_that_exits_before_it_is_reaped_is_not_started_again_uncounted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pod = {
        "metadata": {"uid": "u1", "namespace": "ns", "name": "retry"},
        "spec": {
            "nodeName": "n1",
            "restartPolicy": "OnFailure",
            "containers": [{"name": "main", "command": [sys.executable, "-c", "raise SystemExit(1)"]}],
        },
    }
    context = Context(
        podspec.Lookup(), tmp_path / "pods", tmp_path / "pvc", {}, PodNetwork(str(POD_RANGE), tmp_path / "net")
    )
    runner = PodRunner(pod, context)
    runner.sync(pod)
    (container,) = runner.main
    assert container.proc is not None
    first = container.proc
    first.wait(30)

    # The process has ended but this sync's reap ran just before it did: nothing may start now.
    with monkeypatch.context() as m:
        m.setattr(runner, "_reap", lambda: None)
        runner.sync(pod)
    assert container.proc is first and container.restart_count == 0

    runner.sync(pod)  # reaps, then waits out the back-off before the restart
    assert container.terminated is not None and container.terminated["exitCode"] == 1
    container.not_before = 0.0
    runner.sync(pod)
    assert container.restart_count == 1 and container.last_terminated is not None
    assert container.last_terminated["exitCode"] == 1
    runner.kill_now()
