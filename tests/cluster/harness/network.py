"""Pod addresses: each pod gets an address of its own, as a CNI gives each pod its own IP.

Every pod's processes share the host's network namespace, so two pods serving the same declared port
would clash on 0.0.0.0. Instead each pod gets an address of its own, reported as its ``status.podIP`` and
handed to it through the downward API; a process that binds its pod IP serves its declared ports beside
every other pod's. The addresses come from 198.19.0.0/16 (half of the range set aside for network
benchmarks, so on no real network; the other half is where proxies put their fake addresses), which
``route_pod_range`` makes local to this machine as 127.0.0.0/8 is: Endpoints and
EndpointSlices accept them (they refuse loopback addresses) and Prometheus' discovery reaches them. Where
the route cannot be added (not root), pods get 127.x.y.z addresses: they serve side by side, but no
Service finds them.

Each node agent takes a /24 of the range no other live agent holds (a lock file per block), so two
clusters on one machine never hand out the same address.
"""

from __future__ import annotations

import fcntl
import ipaddress
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import IO

POD_RANGE = ipaddress.ip_network("198.19.0.0/16")
LOOPBACK_RANGE = ipaddress.ip_network("127.0.0.0/8")
HOSTS = range(1, 255)


def route_pod_range() -> bool:
    """Make POD_RANGE local to this machine (an idempotent route); False where that is not allowed."""
    ip = shutil.which("ip")
    if ip is None or os.geteuid() != 0:
        return False
    done = subprocess.run([ip, "route", "replace", "local", str(POD_RANGE), "dev", "lo"], capture_output=True)
    return done.returncode == 0


class PodNetwork:
    """Hands out and takes back the pod addresses of one node agent, from a /24 of its own."""

    def __init__(self, pod_range: str, locks: Path | None = None) -> None:
        network = ipaddress.ip_network(pod_range)
        blocks = list(network.subnets(new_prefix=24))[1 if network == LOOPBACK_RANGE else 0 :]  # not 127.0.0.x
        folder = locks or Path(tempfile.gettempdir()) / "fedtune-pod-networks"
        folder.mkdir(parents=True, exist_ok=True)
        self._held: IO[str] | None = None
        for block in blocks:
            fh = (folder / f"{block.network_address}.lock").open("w")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                fh.close()
                continue
            self._held, self.block = fh, block  # held while this agent lives
            break
        else:
            raise RuntimeError(f"every /24 of {pod_range} is held by another node agent")
        self._by_uid: dict[str, str] = {}
        self._lock = threading.Lock()

    def claim(self, uid: str, previous: str | None = None) -> str:
        """The pod's address: the one it had (an agent restarted) when still free, else the lowest free one."""
        with self._lock:
            if uid in self._by_uid:
                return self._by_uid[uid]
            taken = set(self._by_uid.values())
            ours = [str(self.block.network_address + n) for n in HOSTS]
            if previous in ours and previous not in taken:
                address = str(previous)
            else:
                address = next((a for a in ours if a not in taken), None) or _exhausted(str(self.block))
            self._by_uid[uid] = address
            return address

    def release(self, uid: str) -> None:
        """A pod whose processes have all ended gives its address back, as its sandbox is torn down."""
        with self._lock:
            self._by_uid.pop(uid, None)


def _exhausted(block: str) -> str:
    raise RuntimeError(f"no free pod address left in {block}: more than {len(HOSTS)} pods running")
