"""etcd, kube-apiserver, kube-controller-manager and kube-scheduler on loopback.

Clients authenticate with certificates from the cluster's own CA and RBAC decides what they may
do; the API server signs service-account tokens, and the controller-manager runs its default
controllers (Jobs, garbage collection, namespaces, node lifecycle, service accounts, ...).
"""

from __future__ import annotations

import ssl
import subprocess
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import build, procs
from .pki import Pair, Pki

SERVICE_CIDR = "10.0.0.0/24"


def write_kubeconfig(path: Path, server: str, ca: Path, client: Pair, user: str) -> Path:
    """A kubeconfig with the credentials inlined by path, usable by kubectl and the Python client."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fedtune", "cluster": {"server": server, "certificate-authority": str(ca)}}],
        "users": [{"name": user, "user": {"client-certificate": str(client.cert), "client-key": str(client.key)}}],
        "contexts": [{"name": "fedtune", "context": {"cluster": "fedtune", "user": user, "namespace": "default"}}],
        "current-context": "fedtune",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@dataclass
class ControlPlane:
    """The four control-plane processes of one cluster, with their state under one folder."""

    folder: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    api_port: int = 0

    @property
    def pki(self) -> Pki:
        return Pki(self.folder / "pki")

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.api_port}"

    @property
    def kubeconfig(self) -> Path:
        return self.folder / "kubeconfig"

    def logs(self, name: str) -> Path:
        return self.folder / "logs" / f"{name}.log"

    def start(self, timeout: float = 120.0) -> None:
        """Start every component and return once the API server is ready."""
        bins = build.binaries()
        pki = self.pki.create()
        etcd_port, peer_port = procs.free_port(), procs.free_port()
        self.api_port = procs.free_port()
        self.procs["etcd"] = procs.start(
            [
                str(bins["etcd"]),
                "--name=default",
                f"--data-dir={self.folder / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                f"--listen-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{peer_port}",
                f"--initial-cluster=default=http://127.0.0.1:{peer_port}",
                "--unsafe-no-fsync",
                "--log-level=warn",
                "--quota-backend-bytes=2147483648",
            ],
            self.logs("etcd"),
        )
        procs.wait_for(lambda: procs.port_open(etcd_port), 30, "etcd")
        self.procs["kube-apiserver"] = procs.start(
            [
                str(bins["kube-apiserver"]),
                f"--etcd-servers=http://127.0.0.1:{etcd_port}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={self.api_port}",
                f"--cert-dir={self.folder / 'apiserver-certs'}",
                f"--tls-cert-file={pki.pair('apiserver').cert}",
                f"--tls-private-key-file={pki.pair('apiserver').key}",
                f"--client-ca-file={pki.ca.cert}",
                "--authorization-mode=Node,RBAC",
                "--anonymous-auth=true",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki.sa_pub}",
                f"--service-account-signing-key-file={pki.sa_key}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                f"--kubelet-client-certificate={pki.pair('apiserver-kubelet-client').cert}",
                f"--kubelet-client-key={pki.pair('apiserver-kubelet-client').key}",
                f"--kubelet-certificate-authority={pki.ca.cert}",
                "--kubelet-preferred-address-types=InternalIP",
                "--profiling=false",
                "--v=1",
                "--enable-admission-plugins=NodeRestriction",
                "--endpoint-reconciler-type=none",
            ],
            self.logs("kube-apiserver"),
        )
        self._wait_ready(timeout)
        admin = pki.pair("admin")
        write_kubeconfig(self.kubeconfig, self.server, pki.ca.cert, admin, "fedtune-admin")
        cm_conf = write_kubeconfig(
            self.folder / "controller-manager.kubeconfig",
            self.server,
            pki.ca.cert,
            pki.pair("controller-manager"),
            "system:kube-controller-manager",
        )
        sched_conf = write_kubeconfig(
            self.folder / "scheduler.kubeconfig",
            self.server,
            pki.ca.cert,
            pki.pair("scheduler"),
            "system:kube-scheduler",
        )
        self.procs["kube-controller-manager"] = procs.start(
            [
                str(bins["kube-controller-manager"]),
                *_component_flags(cm_conf),
                f"--service-account-private-key-file={pki.sa_key}",
                f"--root-ca-file={pki.ca.cert}",
                "--use-service-account-credentials=true",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--node-monitor-period=2s",
                "--node-monitor-grace-period=30s",
                f"--cert-dir={self.folder / 'controller-manager-certs'}",
                "--profiling=false",
                "--v=1",
            ],
            self.logs("kube-controller-manager"),
        )
        self.procs["kube-scheduler"] = procs.start(
            [
                str(bins["kube-scheduler"]),
                *_component_flags(sched_conf),
                f"--cert-dir={self.folder / 'scheduler-certs'}",
                "--profiling=false",
                "--v=1",
            ],
            self.logs("kube-scheduler"),
        )

    def _context(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca.cert))
        admin = self.pki.pair("admin")
        ctx.load_cert_chain(str(admin.cert), str(admin.key))
        return ctx

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
        """A raw authenticated GET against the API server (health checks, discovery)."""
        try:
            with urllib.request.urlopen(self.server + path, context=self._context(), timeout=timeout) as r:
                return int(r.status), bytes(r.read())
        except urllib.error.HTTPError as e:
            return int(e.code), bytes(e.read())

    def _wait_ready(self, timeout: float) -> None:
        def ready() -> bool:
            self.check_alive()
            return self.get("/readyz")[0] == 200

        procs.wait_for(ready, timeout, "kube-apiserver /readyz", interval=0.2)

    def check_alive(self) -> None:
        """Raise if a component died (so a test fails with its log instead of hanging)."""
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = self.logs(name).read_text(errors="replace")[-3000:]
                raise procs.Fatal(f"{name} exited with {p.returncode}:\n{tail}")

    def stop(self) -> None:
        """Stop in reverse order of start: scheduler and controllers first, etcd last."""
        for name in reversed(list(self.procs)):
            procs.stop(self.procs.pop(name), grace=10.0)


def _component_flags(kubeconfig: Path) -> list[str]:
    """What the controller-manager and the scheduler share: one identity, a loopback port, no election."""
    return [
        f"--kubeconfig={kubeconfig}",
        f"--authentication-kubeconfig={kubeconfig}",
        f"--authorization-kubeconfig={kubeconfig}",
        "--bind-address=127.0.0.1",
        f"--secure-port={procs.free_port()}",
        "--leader-elect=false",
    ]
