"""A whole test cluster: control plane, fake GPU node pools run by the node agent, and S3 storage.

``Cluster`` is what the pytest fixtures and ``make cluster-up`` start. It also injects faults: kill a
pod's process, make a node NotReady or unreachable, delete a node, stop and restart the S3 server.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from . import procs
from .controlplane import ControlPlane
from .network import LOOPBACK_RANGE, POD_RANGE, route_pod_range
from .nodes import DEFAULT_POOLS, Pool
from .s3 import S3Server

REPO = Path(__file__).resolve().parents[3]
SIMULATE = "fedtune.io/simulate"
BUCKET = "fedtune"
S3_SECRET = "fedtune-s3"
QUICKSTART_CLIENTS = ("clinic", "bank", "devops")
# The label that lets a run reference a Secret (fedtune.api.spec.CREDENTIALS_LABEL).
CREDENTIALS_LABEL = "fedtune.io/credentials"


@dataclass
class Cluster:
    """A running cluster; every process it starts dies with the process that started it."""

    folder: Path
    pools: Sequence[Pool] = DEFAULT_POOLS
    s3: S3Server | None = None
    python: str = sys.executable
    control_plane: ControlPlane = field(init=False)
    pods_routed: bool = field(init=False)
    agent: subprocess.Popen[bytes] | None = None
    own_s3: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.control_plane = ControlPlane(self.folder)
        # Pod addresses Services and Prometheus can reach (see network); loopback ones where not allowed.
        self.pods_routed = route_pod_range()

    # --- lifecycle ------------------------------------------------------------------------------

    def start(self, timeout: float = 120.0) -> Cluster:
        """Start everything and return once pods can be scheduled and run."""
        t0 = time.monotonic()
        try:
            if self.s3 is None:
                self.s3 = S3Server(self.folder / "s3")
                self.own_s3 = True
            if not self.s3.running:
                self.s3.start()
            self.control_plane.start(timeout)
            self.timings["apiserver_ready_s"] = time.monotonic() - t0
            self._start_agent()
            self._wait_usable(timeout)
            self.bootstrap()
        except BaseException:
            self.stop()
            raise
        self.timings["start_s"] = time.monotonic() - t0
        return self

    def _start_agent(self) -> None:
        pki = self.control_plane.pki
        cfg = {
            "kubeconfig": str(self.kubeconfig),
            "state_dir": str(self.folder / "agent"),
            "nodes": [n for p in self.pools for n in p.nodes()],
            "kubelet_port": procs.free_port(),
            "api_port": self.control_plane.api_port,
            "serving_cert": str(pki.pair("agent-serving").cert),
            "serving_key": str(pki.pair("agent-serving").key),
            "path_prefix": [str(Path(self.python).parent)],
            "pod_range": str(POD_RANGE if self.pods_routed else LOOPBACK_RANGE),
        }
        (self.folder / "agent").mkdir(parents=True, exist_ok=True)
        path = self.folder / "agent.json"
        path.write_text(json.dumps(cfg, indent=2))
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        self.agent = procs.start(
            [self.python, "-m", "tests.cluster.harness.agent", str(path)],
            self.control_plane.logs("node-agent"),
            env=env,
            cwd=REPO,
        )

    def _wait_usable(self, timeout: float) -> None:
        core = self.core()
        names = {n["name"] for p in self.pools for n in p.nodes()}

        def usable() -> bool:
            self.check_alive()
            nodes = core.list_node().items
            ready = {
                n.metadata.name
                for n in nodes
                if any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or [])
            }
            if not names <= ready:
                return False
            core.read_namespaced_service_account("default", "default")
            core.read_namespaced_config_map("kube-root-ca.crt", "default")
            return True

        procs.wait_for(usable, timeout, "ready nodes and the default service account", interval=0.2)

    def bootstrap(self) -> None:
        """The bucket, the fedtune-s3 Secret (root's keys, in namespace default), and one account per
        party of the cluster quickstart (examples/cluster/quickstart.yaml) with the run's bucket policy."""
        assert self.s3 is not None
        self.s3.create_bucket(BUCKET)
        self.put_s3_secret("default")
        self.add_parties("default", "quickstart", QUICKSTART_CLIENTS)

    def add_parties(self, namespace: str, run: str, clients: Sequence[str]) -> None:
        """One S3 account per party of a run, each in a Secret `fedtune-<party>` of the namespace, and the
        run's bucket policy (`fedtune policy`) merged into the bucket's, plus read access for each client
        to its own example data (`data/<client>.jsonl`). The run's uid is not known yet: its root is
        matched as `runs/<namespace>/<run>-*`."""
        from fedtune.federation.policy import bucket_policy

        assert self.s3 is not None
        parties = ["aggregator", *clients]
        keys = {party: self.s3.add_account(f"{namespace}.{run}.{party}") for party in parties}
        for party, (access, secret) in keys.items():
            self.put_s3_secret(namespace, f"fedtune-{party}", (access, secret))
        principals = {party: access for party, (access, _) in keys.items()}
        aggregator = principals.pop("aggregator")
        policy = bucket_policy(f"s3://{BUCKET}/runs/{namespace}/{run}-*", aggregator, principals)
        data = [
            {
                "Sid": f"{namespace}.{run}.{client}.data",
                "Effect": "Allow",
                "Principal": {"AWS": [principals[client]]},
                "Action": ["s3:GetObject"],
                "Resource": [f"arn:aws:s3:::{BUCKET}/data/{client}.jsonl"],
            }
            for client in clients
        ]
        tag = f"{namespace}.{run}."
        for statement in policy["Statement"]:
            statement["Sid"] = tag + statement["Sid"]
        self.s3.merge_policy(BUCKET, tag, [*policy["Statement"], *data])

    def put_s3_secret(self, namespace: str, name: str = S3_SECRET, keys: tuple[str, str] | None = None) -> None:
        """Write S3 credentials (root's, or an account's `keys`) and the endpoint as a Secret in a namespace."""
        assert self.s3 is not None
        data = {
            **(self.s3.env_for(*keys) if keys else self.s3.env()),
            "endpoint": self.s3.endpoint,
            "accessKey": keys[0] if keys else self.s3.access_key,
            "secretKey": keys[1] if keys else self.s3.secret_key,
            "region": self.s3.region,
            "bucket": BUCKET,
        }
        body = client.V1Secret(
            metadata=client.V1ObjectMeta(name=name, namespace=namespace, labels={CREDENTIALS_LABEL: "true"}),
            data={k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        )
        try:
            self.core().create_namespaced_secret(namespace, body)
        except ApiException as exc:
            if exc.status != 409:
                raise
            self.core().replace_namespaced_secret(name, namespace, body)

    def check_alive(self) -> None:
        self.control_plane.check_alive()
        if self.agent is not None and self.agent.poll() is not None:
            tail = self.control_plane.logs("node-agent").read_text(errors="replace")[-3000:]
            raise procs.Fatal(f"node agent exited with {self.agent.returncode}:\n{tail}")

    def stop(self) -> None:
        """Stop the agent (and so every pod process), the control plane, and an S3 server it owns."""
        procs.stop(self.agent, grace=10.0)
        self.agent = None
        # Should the agent have died abruptly, its pods' own children may still run: end their groups.
        for pid_file in (self.folder / "agent" / "pods").glob("*/*/*.pid"):
            with contextlib.suppress(ValueError, OSError):
                os.killpg(int(pid_file.read_text()), signal.SIGKILL)
        self.control_plane.stop()
        if self.own_s3 and self.s3 is not None:
            self.s3.stop()

    # --- access ---------------------------------------------------------------------------------

    @property
    def kubeconfig(self) -> Path:
        return self.control_plane.kubeconfig

    def api_client(self) -> client.ApiClient:
        return config.new_client_from_config(str(self.kubeconfig))

    def core(self) -> client.CoreV1Api:
        return client.CoreV1Api(self.api_client())

    def batch(self) -> client.BatchV1Api:
        return client.BatchV1Api(self.api_client())

    def kubectl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster."""
        return subprocess.run(
            ["kubectl", f"--kubeconfig={self.kubeconfig}", *args], capture_output=True, text=True, check=check
        )

    def env(self) -> dict[str, str]:
        """Environment for a process (an operator, kubectl) that should talk to this cluster."""
        return {"KUBECONFIG": str(self.kubeconfig)}

    # --- faults ---------------------------------------------------------------------------------

    def pod_folder(self, namespace: str, name: str) -> Path:
        uid = self.core().read_namespaced_pod(name, namespace).metadata.uid
        return self.folder / "agent" / "pods" / namespace / f"{name}-{uid}"

    def pod_pid(self, namespace: str, name: str, container: str | None = None) -> int:
        """The process id of a running container of a pod (its first container by default)."""
        pod = self.core().read_namespaced_pod(name, namespace)
        container = container or pod.spec.containers[0].name
        pid_file = self.pod_folder(namespace, name) / f"{container}.pid"
        text = procs.wait_for(lambda: pid_file.is_file() and pid_file.read_text(), 60, f"{pid_file}")
        return int(str(text))

    def pod_ip(self, namespace: str, name: str, timeout: float = 60.0) -> str:
        """A pod's own address (127.x.y.z on loopback), once its node has reported it."""
        found = procs.wait_for(
            lambda: self.core().read_namespaced_pod(name, namespace).status.pod_ip, timeout, f"{namespace}/{name}'s IP"
        )
        return str(found)

    def kill_pod(self, namespace: str, name: str, container: str | None = None, sig: int = signal.SIGKILL) -> int:
        """Kill a container's process (and its children) as a crash or OOM kill would; returns the pid."""
        pid = self.pod_pid(namespace, name, container)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)
        return pid

    def _simulate(self, node: str, mode: str | None) -> None:
        self.core().patch_node(node, {"metadata": {"annotations": {SIMULATE: mode}}})

    def node_ready(self, node: str) -> str:
        """The status of a node's Ready condition: True, False or Unknown."""
        conds = self.core().read_node(node).status.conditions or []
        return next((c.status for c in conds if c.type == "Ready"), "Unknown")

    def make_node_not_ready(self, node: str, timeout: float = 30.0) -> None:
        """The node's agent posts Ready=False and stops renewing its lease."""
        self._simulate(node, "not-ready")
        procs.wait_for(lambda: self.node_ready(node) == "False", timeout, f"node {node} NotReady")

    def node_agent_mode(self, node: str) -> str:
        """The fault the node agent currently simulates for a node ('' when none)."""
        path = self.folder / "agent" / "modes.json"
        return str(json.loads(path.read_text()).get(node, "")) if path.is_file() else ""

    def make_node_unreachable(self, node: str) -> None:
        """The node stops every heartbeat; the node controller marks it Unknown after its grace period."""
        self._simulate(node, "unreachable")

    def make_node_ready(self, node: str, timeout: float = 30.0) -> None:
        self._simulate(node, None)
        procs.wait_for(lambda: self.node_ready(node) == "True", timeout, f"node {node} Ready")

    def delete_node(self, node: str) -> None:
        """Delete the Node: its pods' processes die, as if the machine were lost."""
        with contextlib.suppress(ApiException):
            self.core().delete_node(node)

    def restore_node(self, node: str, timeout: float = 30.0) -> None:
        """Register a deleted node again (a replacement machine joins) and wait until it is Ready."""
        restore = self.folder / "agent" / "restore"
        restore.mkdir(parents=True, exist_ok=True)
        (restore / node).touch()
        procs.wait_for(lambda: self.node_ready(node) == "True", timeout, f"node {node} registered again")

    def stop_s3(self) -> None:
        assert self.s3 is not None
        self.s3.stop()

    def start_s3(self) -> None:
        assert self.s3 is not None
        self.s3.start()

    # --- waiting --------------------------------------------------------------------------------

    def wait_pod(self, namespace: str, name: str, phases: Sequence[str], timeout: float = 60.0) -> Any:
        """Poll until a pod reaches one of the phases; returns the pod."""

        def reached() -> Any:
            self.check_alive()
            pod = self.core().read_namespaced_pod(name, namespace)
            return pod if pod.status.phase in phases else None

        return procs.wait_for(reached, timeout, f"pod {namespace}/{name} in {list(phases)}", interval=0.2)
