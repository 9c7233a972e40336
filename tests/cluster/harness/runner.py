"""One pod's life as local processes: init containers in order, then the containers, restarts by
restartPolicy, graceful termination, and the pod status a kubelet would report.

Everything here is driven by ``PodRunner.sync`` from the agent's single reconcile thread, so every
process is forked from that thread (its parent-death signal stays valid for the agent's lifetime).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import podspec
from .network import PodNetwork
from .procs import die_with_parent

Obj = dict[str, Any]
BACKOFF_START = 1.0
BACKOFF_MAX = 10.0
VOLUME_REFRESH_SECONDS = 120.0


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Container:
    """The process of one container and what the kubelet remembers about it."""

    spec: Obj
    init: bool = False
    proc: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    started_at: str | None = None
    terminated: Obj | None = None
    last_terminated: Obj | None = None
    waiting: Obj | None = field(default_factory=lambda: {"reason": "ContainerCreating"})
    not_before: float = 0.0
    backoff: float = BACKOFF_START

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


@dataclass
class Context:
    """What every runner shares: API look-ups, folders, pod addresses and the environment pods inherit."""

    lookup: podspec.Lookup
    pods_root: Path
    pvc_root: Path
    base_env: dict[str, str]
    network: PodNetwork


class PodRunner:
    """Runs one pod bound to one of the agent's nodes."""

    def __init__(self, pod: Obj, ctx: Context) -> None:
        meta = pod["metadata"]
        self.ctx = ctx
        self.uid: str = meta["uid"]
        self.namespace: str = meta["namespace"]
        self.name: str = meta["name"]
        self.node: str = pod["spec"]["nodeName"]
        self.folder = ctx.pods_root / self.namespace / f"{self.name}-{self.uid}"
        self.volumes = podspec.Volumes(self.folder)
        self.init = [Container(c, init=True) for c in pod["spec"].get("initContainers") or []]
        self.main = [Container(c) for c in pod["spec"]["containers"]]
        self.policy: str = pod["spec"].get("restartPolicy") or "Always"
        self.start_time = (pod.get("status") or {}).get("startTime") or now()
        self.prepared = False
        self.config_error: str | None = None
        self.terminating_since: float | None = None
        self.kill_deadline: float | None = None
        self.last_status: Obj | None = None
        self.started = time.monotonic()
        self.refresh_at = 0.0
        self.deadline_exceeded = False
        self.address = ctx.network.claim(self.uid, (pod.get("status") or {}).get("podIP"))
        self.pod = pod

    # --- driving -------------------------------------------------------------------------------

    def containers(self) -> list[Container]:
        return self.init + self.main

    def find(self, name: str) -> Container | None:
        return next((c for c in self.containers() if c.name == name), None)

    def log_path(self, container: str, previous: bool = False) -> Path:
        return self.folder / "logs" / (f"{container}.previous.log" if previous else f"{container}.log")

    def sync(self, pod: Obj) -> None:
        """Advance the pod one step towards its spec (or towards its end when it is being deleted)."""
        # The downward API reads the pod's address before the API server has heard of it.
        self.pod = {**pod, "status": {**(pod.get("status") or {}), "podIP": self.address}}
        if pod["metadata"].get("deletionTimestamp"):
            self._terminate(int(pod["metadata"].get("deletionGracePeriodSeconds") or 0))
            return
        if self.phase() in ("Succeeded", "Failed"):
            return
        deadline = pod["spec"].get("activeDeadlineSeconds")
        if self.deadline_exceeded or (deadline and time.monotonic() - self.started > int(deadline)):
            self.deadline_exceeded = True
            self._terminate(int(pod["spec"].get("terminationGracePeriodSeconds", 30)))
            return
        if not self.prepared or time.monotonic() >= self.refresh_at:
            try:
                self.volumes.materialise(pod, self.ctx.lookup, self.ctx.pvc_root)
                self.prepared = True
                self.config_error = None
            except podspec.ConfigError as exc:
                self.config_error = None if self.prepared else str(exc)
                if not self.prepared:
                    return
            # Secrets, ConfigMaps and tokens are re-read now and then, as a kubelet does.
            self.refresh_at = time.monotonic() + VOLUME_REFRESH_SECONDS
        self._reap()
        pending_init = next((c for c in self.init if not self._done(c)), None)
        if pending_init is not None:
            if self._may_start(pending_init):
                self._start(pending_init)
            return
        for c in self.main:
            if self._may_start(c):
                self._start(c)

    def _done(self, c: Container) -> bool:
        return c.terminated is not None and c.terminated.get("exitCode") == 0

    def _will_restart(self, c: Container) -> bool:
        if c.terminated is None:
            return True
        code = c.terminated.get("exitCode")
        if c.init:
            return code != 0 and self.policy != "Never"
        return self.policy == "Always" or (self.policy == "OnFailure" and code != 0)

    def _may_start(self, c: Container) -> bool:
        if c.proc is not None:
            return False  # running, or exited since the last reap: the next sync records its end first
        if c.terminated is None:
            return True
        return self._will_restart(c) and time.monotonic() >= c.not_before

    def _reap(self) -> None:
        for c in self.containers():
            if c.proc is None or c.proc.poll() is None:
                continue
            code = c.proc.returncode
            exit_code = 128 - code if code < 0 else code
            c.terminated = {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": c.started_at,
                "finishedAt": now(),
                "containerID": f"fedtune://{c.proc.pid}",
            }
            if code < 0:
                c.terminated["signal"] = -code
            c.proc = None
            with contextlib.suppress(FileNotFoundError):
                (self.folder / f"{c.name}.pid").unlink()
            if self._will_restart(c) and self.terminating_since is None:
                c.not_before = time.monotonic() + c.backoff
                c.backoff = min(c.backoff * 2, BACKOFF_MAX)

    def _start(self, c: Container) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        if c.terminated is not None:
            c.last_terminated = c.terminated
            c.terminated = None
            c.restart_count += 1
        try:
            mounts = self.volumes.mount(c.spec)
            env = dict(self.ctx.base_env)
            env.update(podspec.mounts_env(self.volumes.root, self.folder, mounts))
            env["HOSTNAME"] = self.name
            env["HOME"] = str(self.folder / "home")
            env = podspec.container_env(self.pod, c.spec, self.ctx.lookup, env, mounts)
            argv = podspec.in_own_mounts(podspec.command_line(c.spec, env, mounts), mounts)
        except podspec.ConfigError as exc:
            c.waiting = {"reason": "CreateContainerConfigError", "message": str(exc)}
            return
        (self.folder / "home").mkdir(parents=True, exist_ok=True)
        workdir = c.spec.get("workingDir") or "/"
        mapped = podspec.rewrite_paths(workdir, mounts)
        cwd = Path(mapped) if mapped != workdir else self.volumes.root / workdir.lstrip("/")
        cwd.mkdir(parents=True, exist_ok=True)
        log = self.log_path(c.name)
        log.parent.mkdir(parents=True, exist_ok=True)
        if log.exists() and c.restart_count > 0:
            log.replace(self.log_path(c.name, previous=True))
        parent = os.getpid()
        try:
            with log.open("ab") as out:
                c.proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=cwd,
                    start_new_session=True,
                    preexec_fn=lambda: die_with_parent(parent),
                )
        except OSError as exc:
            stamp = now()
            c.terminated = {
                "exitCode": 128,
                "reason": "StartError",
                "message": str(exc),
                "startedAt": stamp,
                "finishedAt": stamp,
            }
            c.not_before = time.monotonic() + c.backoff
            c.backoff = min(c.backoff * 2, BACKOFF_MAX)
            return
        c.started_at = now()
        c.waiting = None
        (self.folder / f"{c.name}.pid").write_text(str(c.proc.pid))

    # --- ending --------------------------------------------------------------------------------

    def signal_all(self, sig: int) -> None:
        for c in self.containers():
            if c.running and c.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, sig)

    def _terminate(self, grace: int) -> None:
        if self.terminating_since is None:
            self.terminating_since = time.monotonic()
            self.kill_deadline = self.terminating_since + grace
            self.signal_all(signal.SIGTERM)
        elif self.kill_deadline is not None and time.monotonic() >= self.kill_deadline:
            self.signal_all(signal.SIGKILL)
        self._reap()

    def ended(self) -> bool:
        """Every process has ended for good: the pod's address can go to another pod."""
        return self.phase() in ("Succeeded", "Failed") and not any(c.running for c in self.containers())

    def finished_terminating(self) -> bool:
        return self.terminating_since is not None and not any(c.running for c in self.containers())

    def kill_now(self) -> None:
        """The pod is gone from the API (or its node is): stop its processes at once."""
        self.signal_all(signal.SIGKILL)
        for c in self.containers():
            if c.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    c.proc.wait(5)
        self._reap()

    # --- status --------------------------------------------------------------------------------

    def phase(self) -> str:
        if self.deadline_exceeded and not any(c.running for c in self.containers()):
            return "Failed"
        if any(c.running for c in self.containers()):
            return "Running" if all(self._done(c) for c in self.init) else "Pending"
        if self.init and not all(self._done(c) for c in self.init):
            failed = any(c.terminated and not self._will_restart(c) for c in self.init)
            return "Failed" if failed else "Pending"
        if any(c.terminated is None for c in self.main):
            return "Pending" if all(c.started_at is None for c in self.main) else "Running"
        if any(self._will_restart(c) for c in self.main) and self.terminating_since is None:
            return "Running"
        if all(c.terminated and c.terminated.get("exitCode") == 0 for c in self.main):
            return "Succeeded"
        return "Failed"

    def _container_status(self, c: Container) -> Obj:
        state: Obj
        if c.running:
            state = {"running": {"startedAt": c.started_at}}
        elif c.terminated is not None and not (self._will_restart(c) and self.terminating_since is None):
            state = {"terminated": c.terminated}
        elif c.terminated is not None:
            state = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off restarting failed container"}}
        elif self.config_error:
            state = {"waiting": {"reason": "CreateContainerConfigError", "message": self.config_error}}
        else:
            state = {"waiting": c.waiting or {"reason": "PodInitializing" if self.init else "ContainerCreating"}}
        status: Obj = {
            "name": c.name,
            "image": c.spec.get("image", ""),
            "imageID": "",
            "ready": c.running and not c.init,
            "started": c.running,
            "restartCount": c.restart_count,
            "state": state,
            "lastState": {"terminated": c.last_terminated} if c.last_terminated else {},
        }
        if c.running and c.proc is not None:
            status["containerID"] = f"fedtune://{c.proc.pid}"
        elif c.terminated and "containerID" in c.terminated:
            status["containerID"] = c.terminated["containerID"]
        return status

    def status(self) -> Obj:
        """The pod status as a kubelet would post it."""
        phase = self.phase()
        init_done = all(self._done(c) for c in self.init)
        ready = phase == "Running" and all(c.running for c in self.main)
        stamp = now()

        def cond(kind: str, ok: bool, reason: str | None = None) -> Obj:
            out: Obj = {"type": kind, "status": "True" if ok else "False", "lastProbeTime": None}
            previous = {c["type"]: c for c in (self.pod.get("status") or {}).get("conditions") or []}
            same = previous.get(kind, {}).get("status") == out["status"]
            out["lastTransitionTime"] = previous[kind].get("lastTransitionTime") if same else stamp
            if reason and not ok:
                out["reason"] = reason
            return out

        conditions = [
            cond("PodReadyToStartContainers", self.prepared),
            cond("Initialized", init_done, "ContainersNotInitialized"),
            cond("Ready", ready, "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady"),
            cond(
                "ContainersReady",
                ready,
                "PodCompleted" if phase in ("Succeeded", "Failed") else "ContainersNotReady",
            ),
        ]
        status: Obj = {
            "phase": phase,
            "conditions": conditions,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": self.address,
            "podIPs": [{"ip": self.address}],
            "startTime": self.start_time,
            "containerStatuses": [self._container_status(c) for c in self.main],
        }
        if self.deadline_exceeded and phase == "Failed":
            status["reason"] = "DeadlineExceeded"
            status["message"] = "Pod was active on the node longer than the specified deadline"
        if self.init:
            status["initContainerStatuses"] = [self._container_status(c) for c in self.init]
        return status
