"""The operator's metrics, scraped by a real Prometheus while it reconciles a run."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.cluster.harness.procs import free_port, wait_for
from tests.operator.conftest import Operator, Runs, tiny_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, object]]:
        q = urllib.parse.urlencode({"query": expr})
        with urllib.request.urlopen(f"{self.url}/api/v1/query?{q}", timeout=5) as r:
            body = json.loads(r.read())
        result: list[dict[str, object]] = body["data"]["result"]
        return result


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prometheus, int]]:
    """A Prometheus scraping one target port every second; yields it and the port to serve on."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not installed: run `make cluster-deps`")
    target = free_port()
    web = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "fedtune-operator", "static_configs": [{"targets": [f"127.0.0.1:{target}"]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{web}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    prom = Prometheus(f"http://127.0.0.1:{web}")
    try:
        wait_for(lambda: urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2).status == 200, 60, "prometheus")
        yield prom, target
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_run_state_reaches_prometheus(
    operator: Operator, runs: Runs, tiny_data: str, prometheus: tuple[Prometheus, int]
) -> None:
    prom, port = prometheus
    operator.start("--standalone", "--metrics-port", str(port))
    runs.create(tiny_run("observed", aggregation={"rounds": 1}))
    runs.wait_state("observed", "Succeeded", timeout=300)
    ns = operator.namespace

    def succeeded_seen() -> bool:
        series = prom.query(f'fedtune_run_condition{{namespace="{ns}",name="observed",state="Succeeded"}} == 1')
        return len(series) == 1

    wait_for(succeeded_seen, 30, "the Succeeded condition in Prometheus")
    info = prom.query(f'fedtune_run_info{{namespace="{ns}",name="observed"}}')
    assert info and info[0]["metric"]["strategy"] == "fedavg"  # type: ignore[index]
    up = prom.query('up{job="fedtune-operator"}')
    assert up and up[0]["value"][1] == "1"  # type: ignore[index]
