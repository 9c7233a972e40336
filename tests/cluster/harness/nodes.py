"""The fake node pools the node agent registers, and the label and taint conventions of GPU pools.

GPU nodes carry ``nvidia.com/gpu`` capacity, the GPU product label the NVIDIA GPU feature discovery
sets, a pool label, and the taint ``nvidia.com/gpu=present:NoSchedule`` that only GPU workloads
tolerate, as on a managed cluster. The Node objects themselves are written here too: loopback
addresses, the agent's port as the kubelet endpoint, and the conditions a healthy kubelet posts.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .build import KUBERNETES_VERSION

POOL_LABEL = "fedtune.io/pool"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT = {"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}


@dataclass(frozen=True)
class Pool:
    """A group of identical nodes."""

    name: str
    count: int
    gpus: int = 0
    product: str = ""
    cpu: str = "16"
    memory: str = "64Gi"
    labels: dict[str, str] = field(default_factory=dict)

    def nodes(self) -> list[dict[str, Any]]:
        """The node entries of the agent's configuration."""
        labels = {POOL_LABEL: self.name, **self.labels}
        capacity = {"cpu": self.cpu, "memory": self.memory}
        taints: list[dict[str, str]] = []
        if self.gpus:
            labels["nvidia.com/gpu.product"] = self.product
            labels["nvidia.com/gpu.count"] = str(self.gpus)
            capacity[GPU_RESOURCE] = str(self.gpus)
            taints.append(GPU_TAINT)
        return [
            {"name": f"{self.name}-{i}", "labels": labels, "capacity": capacity, "taints": taints}
            for i in range(self.count)
        ]


DEFAULT_POOLS = (
    Pool("gpu-a100", 2, gpus=4, product="NVIDIA-A100-SXM4-80GB"),
    Pool("gpu-h100", 1, gpus=8, product="NVIDIA-H100-80GB-HBM3", cpu="64", memory="512Gi"),
    Pool("cpu", 1, cpu="8", memory="32Gi"),
)


def node_manifest(node: dict[str, Any], kubelet_port: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Node object and its status for one node of the agent's configuration."""
    labels = {
        "kubernetes.io/hostname": node["name"],
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        **node.get("labels", {}),
    }
    capacity = {
        "cpu": "16",
        "memory": "64Gi",
        "pods": "110",
        "ephemeral-storage": "100Gi",
        **node.get("capacity", {}),
    }
    body = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": node["name"], "labels": labels},
        "spec": {"taints": node.get("taints", [])},
    }
    return body, {
        "capacity": capacity,
        "allocatable": capacity,
        "addresses": [
            {"type": "InternalIP", "address": "127.0.0.1"},
            {"type": "Hostname", "address": node["name"]},
        ],
        "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_port}},
        "nodeInfo": {
            "machineID": node["name"],
            "systemUUID": node["name"],
            "bootID": node["name"],
            "kernelVersion": os.uname().release,
            "osImage": "fedtune node agent",
            "containerRuntimeVersion": "fedtune://1",
            "kubeletVersion": KUBERNETES_VERSION,
            "kubeProxyVersion": "",
            "operatingSystem": "linux",
            "architecture": "amd64",
        },
        "conditions": conditions(True),
    }


def conditions(
    ready: bool, reason: str = "KubeletReady", message: str = "fedtune node agent is posting ready status"
) -> list[dict[str, Any]]:
    """Node conditions with fresh heartbeat times: no pressure, and Ready as asked."""
    stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = [
        {
            "type": t,
            "status": "False",
            "reason": f"KubeletHasSufficient{t[:-8] if t.endswith('Pressure') else t}",
            "message": "ok",
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
        for t in ("MemoryPressure", "DiskPressure", "PIDPressure")
    ]
    out.append(
        {
            "type": "Ready",
            "status": "True" if ready else "False",
            "reason": reason,
            "message": message,
            "lastHeartbeatTime": stamp,
            "lastTransitionTime": stamp,
        }
    )
    return out
