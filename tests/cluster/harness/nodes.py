"""The fake node pools the node agent registers, and the label and taint conventions of GPU pools.

GPU nodes carry ``nvidia.com/gpu`` capacity, the GPU product label the NVIDIA GPU feature discovery
sets, a pool label, and the taint ``nvidia.com/gpu=present:NoSchedule`` that only GPU workloads
tolerate, as on a managed cluster.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
