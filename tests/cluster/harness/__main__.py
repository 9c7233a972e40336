"""``python -m tests.cluster.harness up|down|status|deps``: the test cluster for humans.

``up`` builds what is missing, starts a background supervisor that owns the cluster (every process
dies with it), waits until the cluster is usable, writes ``.cluster/kubeconfig``, links the tools
into ``.cluster/bin/`` and prints how to use it. ``down`` stops the supervisor and so everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from . import build, procs

REPO = Path(__file__).resolve().parents[3]
HOME = REPO / ".cluster"
STATE = HOME / "state"
READY = HOME / "ready.json"
PIDFILE = HOME / "supervisor.pid"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _supervisor_pid() -> int | None:
    with contextlib.suppress(FileNotFoundError, ValueError):
        pid = int(PIDFILE.read_text())
        if _alive(pid):
            return pid
    return None


def link_tools() -> dict[str, str]:
    """Link every binary the cluster uses into .cluster/bin/."""
    bindir = HOME / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    tools = {name: str(path) for name, path in build.binaries().items()}
    tools.update(build.debian_tools())
    for name, target in tools.items():
        link = bindir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
    return tools


def deps() -> None:
    start = time.monotonic()
    spent = build.ensure()
    link_tools()
    took = time.monotonic() - start
    if spent:
        detail = ", ".join(f"{k} {v:.0f}s" for k, v in spent.items())
        print(f"cluster binaries built in {took:.0f}s ({detail}); cache {build.cache_size() / 2**30:.2f} GiB")
    else:
        print(f"cluster binaries cached under {build.cache_root()} ({took:.1f}s)")


def up() -> int:
    if _supervisor_pid() is not None and READY.is_file():
        print("cluster already running")
        status()
        return 0
    t0 = time.monotonic()
    spent = build.ensure()
    build_s = time.monotonic() - t0
    link_tools()
    if STATE.exists():
        shutil.rmtree(STATE)
    STATE.mkdir(parents=True)
    READY.unlink(missing_ok=True)
    t1 = time.monotonic()
    log = (HOME / "supervisor.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.cluster.harness", "serve"],
        cwd=REPO,
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={
            **os.environ,
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        },
    )
    PIDFILE.write_text(str(proc.pid))

    def ready() -> bool:
        if proc.poll() is not None:
            raise procs.Fatal(f"cluster failed to start:\n{(HOME / 'supervisor.log').read_text()[-4000:]}")
        return READY.is_file()

    procs.wait_for(ready, 300, "the cluster", interval=0.2)
    start_s = time.monotonic() - t1
    info = json.loads(READY.read_text())
    shutil.copy(info["kubeconfig"], HOME / "kubeconfig")
    if spent:
        print(f"cold build: {build_s:.0f}s ({', '.join(f'{k} {v:.0f}s' for k, v in spent.items())})")
    else:
        record = build.cache_root() / "build-times.json"
        times = json.loads(record.read_text()) if record.is_file() else {}
        cold = f", cold build took {sum(times.values()):.0f}s" if times else ""
        print(f"binaries cached under {build.cache_root()} ({build_s:.1f}s{cold})")
    print(f"cluster started in {start_s:.1f}s (warm start)")
    print(f"""
  export KUBECONFIG={HOME / "kubeconfig"} PATH={HOME / "bin"}:$PATH
  kubectl get nodes

S3: {info["s3_endpoint"]}  bucket {info["bucket"]}  (credentials in Secret default/fedtune-s3)
logs: {STATE / "logs"}    stop: make cluster-down""")
    return 0


def serve() -> int:
    """The background supervisor: start the cluster, report readiness, wait for SIGTERM."""
    from .cluster import BUCKET, Cluster

    stopping = False

    def on_signal(_sig: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    cluster = Cluster(STATE).start()
    try:
        assert cluster.s3 is not None
        info = {
            "kubeconfig": str(cluster.kubeconfig),
            "server": cluster.control_plane.server,
            "s3_endpoint": cluster.s3.endpoint,
            "bucket": BUCKET,
            "timings": cluster.timings,
            "pid": os.getpid(),
        }
        READY.write_text(json.dumps(info, indent=2))
        while not stopping:
            cluster.check_alive()
            time.sleep(0.5)
    finally:
        cluster.stop()
        READY.unlink(missing_ok=True)
    return 0


def down() -> int:
    pid = _supervisor_pid()
    if pid is None:
        print("cluster not running")
    else:
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + 60
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if _alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        print("cluster stopped")
    PIDFILE.unlink(missing_ok=True)
    READY.unlink(missing_ok=True)
    return 0


def status() -> int:
    pid = _supervisor_pid()
    if pid is None or not READY.is_file():
        print("cluster not running")
        return 1
    info = json.loads(READY.read_text())
    print(f"running (supervisor pid {pid}), API {info['server']}, S3 {info['s3_endpoint']}")
    subprocess.run(["kubectl", f"--kubeconfig={HOME / 'kubeconfig'}", "get", "nodes"], check=False)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.cluster.harness", description=__doc__)
    parser.add_argument("command", choices=["up", "down", "status", "deps", "serve"])
    args = parser.parse_args()
    commands = {"up": up, "down": down, "status": status, "serve": serve}
    if args.command == "deps":
        deps()
        return 0
    return commands[args.command]()


if __name__ == "__main__":
    sys.exit(main())
