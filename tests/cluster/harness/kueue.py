"""Kueue on a test cluster: its CRDs, its namespace and its manager, built from source like the rest.

The CRDs are installed as Kueue's release manifests install them, with the conversion webhook of the
workload, queue and cohort kinds pointing at Kueue's webhook Service: Kueue's own certificate management
fills in their CA bundles and its Secret, which the harness writes into its cert folder as a kubelet
would mount it. No admission webhook is registered (the API server could
not reach a webhook served on the host), so fedtune's Workloads and the test's queues meet Kueue's
controllers as they are, and nothing else in the cluster waits on Kueue. Metrics and the on-demand
visibility API are off; the manager's readiness endpoint says when it admits.
"""

from __future__ import annotations

import base64
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import yaml
from kubernetes.client.exceptions import ApiException

from . import build, procs
from .cluster import Cluster

NAMESPACE = "kueue-system"
WEBHOOK_SERVICE = "kueue-webhook-service"
WEBHOOK_SECRET = "kueue-webhook-server-cert"
# The kinds whose CRDs Kueue's release gives a conversion webhook (and whose CA bundle it manages).
CONVERTED = ("localqueues", "clusterqueues", "cohorts", "workloads", "multikueueclusters")


def _crds(folder: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(folder.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        if crd["spec"]["names"]["plural"] in CONVERTED:
            service = {"namespace": NAMESPACE, "name": WEBHOOK_SERVICE, "path": "/convert"}
            crd["spec"]["conversion"] = {
                "strategy": "Webhook",
                "webhook": {"clientConfig": {"service": service}, "conversionReviewVersions": ["v1"]},
            }
        docs.append(crd)
    return docs


class Kueue:
    """Kueue's manager running against one test cluster; stop() ends it (its CRDs stay)."""

    def __init__(self, cluster: Cluster, folder: Path) -> None:
        self.cluster = cluster
        self.folder = folder
        self.component = build.kueue()
        self.proc: subprocess.Popen[bytes] | None = None
        self.health = procs.free_port()

    def start(self, timeout: float = 120.0) -> Kueue:
        if not self.component.cached():
            raise RuntimeError("kueue not built: run `make cluster-deps`")
        self.folder.mkdir(parents=True, exist_ok=True)
        crds = self.folder / "crds.yaml"
        crds.write_text(yaml.safe_dump_all(_crds(self.component.folder / "crds")))
        self.cluster.kubectl("apply", "--server-side", "--force-conflicts", "-f", str(crds))
        for crd in CONVERTED:
            self.cluster.kubectl("wait", "--for=condition=Established", f"crd/{crd}.kueue.x-k8s.io", "--timeout=60s")
        # The namespace, and the empty Secret the release ships for Kueue to fill with its certificates.
        core = self.cluster.core()
        for create, args in (
            (core.create_namespace, ({"metadata": {"name": NAMESPACE}},)),
            (core.create_namespaced_secret, (NAMESPACE, {"metadata": {"name": WEBHOOK_SECRET}})),
        ):
            try:
                create(*args)
            except ApiException as exc:
                if exc.status != 409:
                    raise
        config = {
            "apiVersion": "config.kueue.x-k8s.io/v1beta2",
            "kind": "Configuration",
            "namespace": NAMESPACE,
            "health": {"healthProbeBindAddress": f"127.0.0.1:{self.health}"},
            "metrics": {"bindAddress": "0"},
            "webhook": {"host": "127.0.0.1", "port": procs.free_port(), "certDir": str(self.folder / "certs")},
            "leaderElection": {"leaderElect": False},
            "internalCertManagement": {
                "enable": True,
                "webhookServiceName": WEBHOOK_SERVICE,
                "webhookSecretName": WEBHOOK_SECRET,
            },
            "manageJobsWithoutQueueName": False,
            "integrations": {"frameworks": ["batch/job"]},
            "featureGates": {"VisibilityOnDemand": False},
        }
        path = self.folder / "config.yaml"
        path.write_text(yaml.safe_dump(config))
        binary = str(self.component.folder / "kueue")
        env = {**self.cluster.env(), "PATH": "/usr/bin:/bin"}
        self.proc = procs.start([binary, f"--config={path}", "--zap-log-level=2"], self.folder / "kueue.log", env=env)
        url = f"http://127.0.0.1:{self.health}/readyz"

        def ready() -> bool:
            self._alive()
            self._mount_certs()
            return urllib.request.urlopen(url, timeout=2).status == 200

        try:
            procs.wait_for(ready, timeout, url)
        except BaseException:
            self.stop()
            raise
        return self

    def _mount_certs(self) -> None:
        """Write the certificates Kueue put in its Secret into its cert folder, as a kubelet mounts a Secret."""
        secret = self.cluster.core().read_namespaced_secret(WEBHOOK_SECRET, NAMESPACE)
        folder = self.folder / "certs"
        folder.mkdir(exist_ok=True)
        for key, value in (secret.data or {}).items():
            path = folder / key
            if not path.exists():
                path.write_bytes(base64.b64decode(value))

    def _alive(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = (self.folder / "kueue.log").read_text()[-3000:]
            raise procs.Fatal(f"kueue exited with {self.proc.returncode}:\n{tail}")
        return True

    def stop(self) -> None:
        if self.proc is not None:
            procs.stop(self.proc)
            self.proc = None
