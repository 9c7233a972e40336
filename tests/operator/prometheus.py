"""A real Prometheus for the tests, and the scrape configuration the Prometheus Operator would make of the
chart's ServiceMonitor and PodMonitor, so the tests scrape exactly what the chart asks for."""

from __future__ import annotations

import contextlib
import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from tests.cluster.harness import build
from tests.cluster.harness.procs import free_port, wait_for

Obj = dict[str, Any]


class Prometheus:
    """The HTTP API of a running Prometheus."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _get(self, path: str, **params: str) -> Any:
        with urllib.request.urlopen(f"{self.url}{path}?{urllib.parse.urlencode(params)}", timeout=10) as r:
            body = json.loads(r.read())
        return body["data"]

    def query(self, expr: str) -> list[Obj]:
        """An instant query: the series it returns now."""
        result: list[Obj] = self._get("/api/v1/query", query=expr)["result"]
        return result

    def query_range(self, expr: str, start: float, end: float, step: str = "1s") -> list[Obj]:
        """A range query, as a Grafana time-series panel runs it."""
        result: list[Obj] = self._get("/api/v1/query_range", query=expr, start=str(start), end=str(end), step=step)[
            "result"
        ]
        return result

    def targets(self) -> list[Obj]:
        """The active scrape targets, with their labels and health."""
        active: list[Obj] = self._get("/api/v1/targets", state="active")["activeTargets"]
        return active


@contextlib.contextmanager
def running(folder: Path, scrape_configs: list[Obj]) -> Iterator[Prometheus]:
    """A Prometheus with these scrape configurations, stopped on exit."""
    binary = build.binaries()["prometheus"]
    if not binary.is_file():
        raise RuntimeError("prometheus not built: run `make cluster-deps`")
    folder.mkdir(parents=True, exist_ok=True)
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"}, "scrape_configs": scrape_configs}
    (folder / "prometheus.yml").write_text(yaml.safe_dump(config))
    web = free_port()
    with (folder / "prometheus.log").open("wb") as log:
        proc = subprocess.Popen(
            [
                binary,
                f"--config.file={folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{web}",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    prom = Prometheus(f"http://127.0.0.1:{web}")
    try:
        wait_for(lambda: urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2).status == 200, 60, "prometheus")
        yield prom
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _meta_label(kind: str, label: str, present: bool = False) -> str:
    name = re.sub(r"[^a-zA-Z0-9_]", "_", label)
    return f"__meta_kubernetes_{kind}_label{'present' if present else ''}_{name}"


def _relabeling(r: Obj) -> Obj:
    """A monitor's relabeling (camelCase, as in the CRD) as Prometheus configuration."""
    keys = {"sourceLabels": "source_labels", "targetLabel": "target_label"}
    return {keys.get(k, k): v for k, v in r.items()}


def scrape_config(monitor: Obj, kubeconfig: Path, interval: str = "1s") -> Obj:
    """What the Prometheus Operator generates for a PodMonitor or ServiceMonitor with one endpoint.

    Pods discovered directly (PodMonitor) or through their Service's EndpointSlices (ServiceMonitor, as
    with the operator's serviceDiscoveryRole EndpointSlice); kept by the selector's labels and the
    endpoint's port name; finished pods dropped; namespace, pod, container, endpoint, service and job set
    as the operator sets them (job: the Service's name, or namespace/name of the PodMonitor), then the
    monitor's own relabelings.
    """
    meta, spec = monitor["metadata"], monitor["spec"]
    pods = monitor["kind"] == "PodMonitor"
    endpoints = spec["podMetricsEndpoints" if pods else "endpoints"]
    assert len(endpoints) == 1, f"{monitor['kind']} {meta['name']}: one endpoint expected"
    endpoint = endpoints[0]
    discovery: Obj = {"role": "pod" if pods else "endpointslice", "kubeconfig_file": str(kubeconfig)}
    selector = spec.get("namespaceSelector") or {}
    if not selector.get("any"):
        discovery["namespaces"] = {"names": selector.get("matchNames") or [meta["namespace"]]}
    selected = "pod" if pods else "service"
    relabel: list[Obj] = [
        {
            "action": "keep",
            "source_labels": [_meta_label(selected, k), _meta_label(selected, k, present=True)],
            "regex": f"({re.escape(v)});true",
        }
        for k, v in spec["selector"]["matchLabels"].items()
    ]
    port_label = "__meta_kubernetes_pod_container_port_name" if pods else "__meta_kubernetes_endpointslice_port_name"
    relabel += [
        {"action": "keep", "source_labels": [port_label], "regex": endpoint["port"]},
        {"action": "drop", "source_labels": ["__meta_kubernetes_pod_phase"], "regex": "(Failed|Succeeded)"},
        {"source_labels": ["__meta_kubernetes_namespace"], "target_label": "namespace"},
        {"source_labels": ["__meta_kubernetes_pod_name"], "target_label": "pod"},
        {"source_labels": ["__meta_kubernetes_pod_container_name"], "target_label": "container"},
        {"target_label": "endpoint", "replacement": endpoint["port"]},
    ]
    if pods:
        relabel.append({"target_label": "job", "replacement": f"{meta['namespace']}/{meta['name']}"})
    else:
        for label in ("service", "job"):
            relabel.append({"source_labels": ["__meta_kubernetes_service_name"], "target_label": label})
    relabel += [_relabeling(r) for r in endpoint.get("relabelings") or []]
    return {
        "job_name": f"{monitor['kind'].lower()}/{meta['namespace']}/{meta['name']}/0",
        "honor_labels": bool(endpoint.get("honorLabels", False)),
        "scrape_interval": interval,
        "kubernetes_sd_configs": [discovery],
        "relabel_configs": relabel,
    }
