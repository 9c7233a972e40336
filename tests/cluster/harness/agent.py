"""The node agent: the kubelet of the fake nodes, running their pods as local processes.

It registers its nodes, keeps them Ready with node-lease heartbeats, runs every pod the scheduler
binds to them (see ``runner``), reports pod status, finishes graceful deletions and serves
container logs to ``kubectl logs`` through the API server. Run as ``python -m
tests.cluster.harness.agent CONFIG.json``; it dies with the process that started it, and its pods'
processes die with it.

A node's ``fedtune.io/simulate`` annotation injects faults: ``not-ready`` posts Ready=False and
stops the lease, ``unreachable`` stops every heartbeat and every pod update (the node controller
then marks it Unknown, while its pods' processes run on). A deleted node is not registered again
and its pods' processes are killed, as if the machine died, until a file ``restore/<node>``
appears in the agent's state folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes import client, config, watch
from kubernetes.client.exceptions import ApiException

from . import podspec
from .logserver import serve_logs
from .network import PodNetwork
from .nodes import conditions, node_manifest
from .runner import Context, PodRunner

Obj = dict[str, Any]
SIMULATE = "fedtune.io/simulate"
LEASE_SECONDS = 40
RENEW_EVERY = 5.0


def _json(resp: Any) -> Obj:
    return json.loads(resp.data)  # type: ignore[no-any-return]


def _micro_now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ApiLookup(podspec.Lookup):
    """Secrets, ConfigMaps and bound service-account tokens, read through the API."""

    def __init__(self, core: client.CoreV1Api) -> None:
        self.core = core

    def _get(self, fn: Any, namespace: str, name: str) -> Obj | None:
        try:
            return _json(fn(name, namespace, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def secret(self, namespace: str, name: str) -> Obj | None:
        return self._get(self.core.read_namespaced_secret, namespace, name)

    def config_map(self, namespace: str, name: str) -> Obj | None:
        return self._get(self.core.read_namespaced_config_map, namespace, name)

    def token(self, pod: Obj, audience: str | None, expiration: int) -> str:
        meta = pod["metadata"]
        spec: Obj = {
            "expirationSeconds": expiration,
            "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]},
        }
        if audience:
            spec["audiences"] = [audience]
        body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec}
        sa = pod["spec"].get("serviceAccountName") or "default"
        resp = self.core.create_namespaced_service_account_token(sa, meta["namespace"], body, _preload_content=False)
        return str(_json(resp)["status"]["token"])


class Agent:
    """The kubelet of a set of fake nodes."""

    def __init__(self, cfg: Obj) -> None:
        self.cfg = cfg
        self.state = Path(cfg["state_dir"])
        self.nodes: dict[str, Obj] = {n["name"]: n for n in cfg["nodes"]}
        self.gone: set[str] = set()
        self.modes: dict[str, str] = {}
        self.runners: dict[str, PodRunner] = {}
        self.lock = threading.Lock()
        self.wake = threading.Event()
        self.stopping = threading.Event()
        self.kubelet_port = int(cfg["kubelet_port"])
        api = config.new_client_from_config(cfg["kubeconfig"])
        self.core = client.CoreV1Api(api)
        base = {k: os.environ[k] for k in podspec.INHERITED_ENV if k in os.environ}
        base["PATH"] = os.pathsep.join([*cfg.get("path_prefix", []), os.environ.get("PATH", "/usr/bin:/bin")])
        base["KUBERNETES_SERVICE_HOST"] = "127.0.0.1"
        base["KUBERNETES_SERVICE_PORT"] = str(cfg["api_port"])
        base["PYTHONUNBUFFERED"] = "1"
        network = PodNetwork(cfg["pod_range"])
        self.ctx = Context(ApiLookup(self.core), self.state / "pods", self.state / "pvc", base, network)

    # --- nodes ---------------------------------------------------------------------------------

    def register(self, names: list[str] | None = None) -> None:
        for name in names or list(self.nodes):
            node = self.nodes[name]
            body, status = node_manifest(node, self.kubelet_port)
            try:
                self.core.create_node(body, _preload_content=False)
            except ApiException as exc:
                if exc.status != 409:
                    raise
                self.core.patch_node(node["name"], {"metadata": {"labels": body["metadata"]["labels"]}})
            self.core.patch_node_status(node["name"], {"status": status}, _preload_content=False)

    def heartbeat_loop(self) -> None:
        api = config.new_client_from_config(self.cfg["kubeconfig"])
        core, coord = client.CoreV1Api(api), client.CoordinationV1Api(api)
        posted: dict[str, str] = {}
        last_renew: dict[str, float] = {}
        restore = self.state / "restore"
        while not self.stopping.is_set():
            for name in list(self.nodes):
                if name in self.gone and (restore / name).exists():
                    self.register([name])
                    (restore / name).unlink()
                    posted.pop(name, None)
                    with self.lock:
                        self.gone.discard(name)
                if name in self.gone:
                    continue
                try:
                    self._heartbeat(core, coord, name, posted, last_renew)
                except Exception as exc:  # the API may be briefly unavailable; keep beating
                    print(f"heartbeat {name}: {exc}", file=sys.stderr, flush=True)
            self.stopping.wait(1.0)

    def _heartbeat(self, core: Any, coord: Any, name: str, posted: dict[str, str], last: dict[str, float]) -> None:
        try:
            node = _json(core.read_node(name, _preload_content=False))
        except ApiException as exc:
            if exc.status == 404:
                with self.lock:
                    self.gone.add(name)
                self.wake.set()
                return
            raise
        mode = (node["metadata"].get("annotations") or {}).get(SIMULATE, "")
        with self.lock:
            if self.modes.get(name) != mode:
                self.modes[name] = mode
                (self.state / "modes.json").write_text(json.dumps(self.modes, sort_keys=True))
        if mode == "unreachable":
            posted[name] = mode
            return
        ready_now = next((c for c in node["status"].get("conditions") or [] if c["type"] == "Ready"), {})
        want_ready = mode != "not-ready"
        if posted.get(name) != mode or (ready_now.get("status") == "True") != want_ready:
            msg = (
                "fault injected by the test harness" if not want_ready else "fedtune node agent is posting ready status"
            )
            conds = conditions(want_ready, "KubeletReady" if want_ready else "KubeletNotReady", msg)
            core.patch_node_status(name, {"status": {"conditions": conds}}, _preload_content=False)
            posted[name] = mode
        if not want_ready or time.monotonic() - last.get(name, 0.0) < RENEW_EVERY:
            return
        lease = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": name, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": name,
                "leaseDurationSeconds": LEASE_SECONDS,
                "renewTime": _micro_now(),
            },
        }
        try:
            coord.patch_namespaced_lease(name, "kube-node-lease", {"spec": lease["spec"]}, _preload_content=False)
        except ApiException as exc:
            if exc.status != 404:
                raise
            owner = {"apiVersion": "v1", "kind": "Node", "name": name, "uid": node["metadata"]["uid"]}
            lease["metadata"]["ownerReferences"] = [owner]  # type: ignore[index]
            coord.create_namespaced_lease("kube-node-lease", lease, _preload_content=False)
        last[name] = time.monotonic()

    # --- pods ----------------------------------------------------------------------------------

    def watch_loop(self) -> None:
        api = config.new_client_from_config(self.cfg["kubeconfig"])
        core = client.CoreV1Api(api)
        while not self.stopping.is_set():
            try:
                for _event in watch.Watch().stream(
                    core.list_pod_for_all_namespaces, timeout_seconds=60, _request_timeout=90
                ):
                    self.wake.set()
                    if self.stopping.is_set():
                        return
            except Exception as exc:  # reconnect after API hiccups; the reconcile loop resyncs anyway
                print(f"watch: {exc}", file=sys.stderr, flush=True)
                self.stopping.wait(1.0)

    def reconcile(self) -> None:
        pods = _json(self.core.list_pod_for_all_namespaces(_preload_content=False))["items"]
        with self.lock:
            live = set(self.nodes) - self.gone
            frozen = {n for n, mode in self.modes.items() if mode == "unreachable"}
        seen = set()
        # Pods that already have an address claim it before new pods take the lowest free ones.
        for pod in sorted(pods, key=lambda p: not (p.get("status") or {}).get("podIP")):
            node = pod["spec"].get("nodeName")
            if node not in live:
                continue
            uid = pod["metadata"]["uid"]
            seen.add(uid)
            if node in frozen:
                continue  # cut off from the API: its processes run on, unseen and unmanaged
            runner = self.runners.get(uid)
            if runner is None:
                if pod.get("status", {}).get("phase") in ("Succeeded", "Failed") and not pod["metadata"].get(
                    "deletionTimestamp"
                ):
                    continue
                runner = self.runners[uid] = PodRunner(pod, self.ctx)
            try:
                runner.sync(pod)
                self._report(runner)
                if runner.ended():
                    self.ctx.network.release(uid)
            except Exception as exc:  # one pod's trouble must not stall the others
                print(f"pod {runner.namespace}/{runner.name}: {exc!r}", file=sys.stderr, flush=True)
        for uid in list(self.runners):
            if uid not in seen:
                self.runners.pop(uid).kill_now()
                self.ctx.network.release(uid)

    def _report(self, runner: PodRunner) -> None:
        status = runner.status()
        terminal = (runner.pod.get("status") or {}).get("phase") in ("Succeeded", "Failed")
        try:
            if status != runner.last_status and not (terminal and status["phase"] != runner.pod["status"]["phase"]):
                self.core.patch_namespaced_pod_status(
                    runner.name, runner.namespace, {"status": status}, _preload_content=False
                )
                runner.last_status = status
            if runner.pod["metadata"].get("deletionTimestamp") and runner.finished_terminating():
                body = client.V1DeleteOptions(
                    grace_period_seconds=0, preconditions=client.V1Preconditions(uid=runner.uid)
                )
                self.core.delete_namespaced_pod(runner.name, runner.namespace, body=body, _preload_content=False)
        except ApiException as exc:
            if exc.status not in (404, 409):
                raise

    def run(self) -> None:
        self.register()
        server = serve_logs(self, self.cfg)
        threads = [threading.Thread(target=f, daemon=True) for f in (self.heartbeat_loop, self.watch_loop)]
        for t in threads:
            t.start()
        (self.state / "agent.ready").write_text(str(os.getpid()))
        try:
            while not self.stopping.is_set():
                self.wake.wait(0.5)
                self.wake.clear()
                try:
                    self.reconcile()
                except Exception as exc:  # keep the node alive through API hiccups
                    print(f"reconcile: {exc!r}", file=sys.stderr, flush=True)
                    self.stopping.wait(0.5)
        finally:
            for runner in self.runners.values():
                runner.signal_all(signal.SIGTERM)
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(c.running for r in self.runners.values() for c in r.containers()):
                time.sleep(0.1)
            for runner in self.runners.values():
                runner.kill_now()
            server.shutdown()


def main() -> None:
    cfg = json.loads(Path(sys.argv[1]).read_text())
    agent = Agent(cfg)

    def stop(_sig: int, _frame: Any) -> None:
        agent.stopping.set()
        agent.wake.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    with contextlib.suppress(KeyboardInterrupt):
        agent.run()


if __name__ == "__main__":
    main()
