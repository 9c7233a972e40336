"""Metrics scraped by a real Prometheus: the operator's while it reconciles a run, and every party of a run
installed with Helm, discovered as the chart's ServiceMonitor and PodMonitor say, behind every dashboard
panel."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kubernetes.client.exceptions import ApiException

from fedtune.api import API_GROUP, API_VERSION, PLURAL
from tests.cluster.harness.cluster import Cluster
from tests.cluster.harness.procs import free_port, wait_for
from tests.operator import prometheus
from tests.operator.chart import CHART, DASHBOARD, helm, one, render
from tests.operator.conftest import POOLS, Operator, Runs, running_pod, tiny_run

pytestmark = [pytest.mark.cluster, pytest.mark.slow]
# Panels whose metric exists only where a GPU does: on this machine their query must come back empty.
GPU_ONLY = {"Client peak GPU memory"}


@pytest.fixture
def scraping_a_port(tmp_path: Path) -> Iterator[tuple[prometheus.Prometheus, int]]:
    """A Prometheus scraping one port on this machine every second; yields it and the port to serve on."""
    port = free_port()
    job = {"job_name": "fedtune-operator", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}
    with prometheus.running(tmp_path / "prometheus", [job]) as prom:
        yield prom, port


def test_run_state_reaches_prometheus(
    operator: Operator, runs: Runs, tiny_data: str, scraping_a_port: tuple[prometheus.Prometheus, int]
) -> None:
    prom, port = scraping_a_port
    operator.start("--standalone", "--metrics-port", str(port))
    runs.create(tiny_run("observed", aggregation={"rounds": 1}))
    runs.wait_state("observed", "Succeeded", timeout=300)
    ns = operator.namespace

    def succeeded_seen() -> bool:
        series = prom.query(f'fedtune_run_condition{{namespace="{ns}",name="observed",state="Succeeded"}} == 1')
        return len(series) == 1

    wait_for(succeeded_seen, 30, "the Succeeded condition in Prometheus")
    info = prom.query(f'fedtune_run_info{{namespace="{ns}",name="observed"}}')
    assert info and info[0]["metric"]["strategy"] == "fedavg"
    up = prom.query('up{job="fedtune-operator"}')
    assert up and up[0]["value"][1] == "1"


def panel_queries(namespace: str, name: str) -> dict[str, list[str]]:
    """Every query of every dashboard panel, with its variables set as Grafana would for one run."""
    dashboard = json.loads(DASHBOARD.read_text())
    values = {"$namespace": namespace, "$name": name, "$__rate_interval": "15s"}
    out: dict[str, list[str]] = {}
    for panel in dashboard["panels"]:
        exprs = []
        for target in panel["targets"]:
            expr = target["expr"]
            for var, value in values.items():
                expr = expr.replace(var, value)
            assert "$" not in expr, f"panel {panel['title']!r}: unknown variable in {expr}"
            exprs.append(expr)
        out[panel["title"]] = exprs
    return out


def test_every_dashboard_panel_has_data_from_a_run_on_the_cluster(
    crds: Cluster, namespace: str, tiny_data: str, tmp_path: Path
) -> None:
    """The operator installed with Helm as a pod, two runs of three clients (one private): Prometheus finds
    the operator through the ServiceMonitor's Service and the runs' pods through the PodMonitor, scrapes
    each on its own pod IP, and every panel's query, both runs selected, returns data over their time."""
    if not crds.pods_routed:
        pytest.skip("pod addresses are loopback ones here (routing 198.19.0.0/16 locally needs root): no Endpoints")
    monitors = render(
        "--set",
        "rbac.scope=namespaced,metrics.serviceMonitor.enabled=true,metrics.podMonitor.enabled=true",
        namespace=namespace,
    )
    jobs = [prometheus.scrape_config(one(monitors, kind), crds.kubeconfig) for kind in ("ServiceMonitor", "PodMonitor")]
    kube = ("--kubeconfig", str(crds.kubeconfig), "--namespace", namespace)
    runs = Runs(crds, namespace)
    privacy = {"enabled": True, "clipNorm": 0.5, "noiseMultiplier": 1.0, "delta": 1e-5}
    with prometheus.running(tmp_path / "prometheus", jobs) as prom:
        try:
            helm("install", "ft", str(CHART), *kube, "--skip-crds", "--set", "rbac.scope=namespaced")
            running_pod(crds, namespace, "app.kubernetes.io/component=operator")
            start = time.time()
            # Losses are exported only without differential privacy, epsilon only with it: two runs.
            runs.create(tiny_run("private", privacy=privacy, aggregation={"rounds": 4}))
            runs.create(tiny_run("plain", aggregation={"rounds": 4}))
            for run in ("private", "plain"):
                runs.wait_state(run, "Succeeded", timeout=400)

            def operator_saw_it() -> bool:
                done = prom.query(f'fedtune_run_condition{{namespace="{namespace}",state="Succeeded"}} == 1')
                return len(done) == 2

            wait_for(operator_saw_it, 30, "the operator's Succeeded condition in Prometheus")
            end = time.time()
            results = {
                title: [prom.query_range(e, start, end) for e in exprs]
                for title, exprs in panel_queries(namespace, "private|plain").items()
            }
            empty = sorted(t for t, r in results.items() if not all(r) and t not in GPU_ONLY)
            assert not empty, f"panels with no data: {empty}"
            assert not any(s for t in GPU_ONLY for s in results[t]), "GPU memory reported on a machine with no GPU"
            steps = prom.query_range(f'fedtune_client_steps_total{{namespace="{namespace}",name="plain"}}', start, end)
            # Target labels come from the pods the operator made: each client's series names its own pod.
            assert sorted(s["metric"]["client"] for s in steps) == sorted(POOLS)
            assert all(f"client-{s['metric']['client']}" in s["metric"]["pod"] for s in steps)
            # Every pod (the operator, two aggregators, six clients) was scraped at an address of its own.
            up = prom.query_range(f'up{{namespace="{namespace}"}}', start, end)
            instances = {s["metric"]["pod"]: s["metric"]["instance"] for s in up}
            assert len(instances) == 9 and len(set(instances.values())) == 9, instances
        finally:
            for run in ("private", "plain"):
                with contextlib.suppress(ApiException):
                    runs.api.delete_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, run)
            helm("uninstall", "ft", *kube, "--wait", "--timeout", "60s", check=False)
