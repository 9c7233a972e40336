"""A client on several GPUs: one process per GPU under torchrun, rank 0 speaking for all of them.

Gradients travel over the default group (NCCL on CUDA, gloo on a CPU); decisions, adapter states and
counts travel over a separate gloo group, so ranks waiting on rank 0 (which may poll storage for a
long time between rounds) wait on the CPU with a long timeout rather than on a GPU collective.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from fedtune.errors import FedtuneError

T = TypeVar("T")
log = logging.getLogger("fedtune.client")

# Rank 0 may wait this long for the next global (or the final one) while the other ranks wait for it.
CONTROL_TIMEOUT = timedelta(hours=24)


def is_worker() -> bool:
    """Whether this process is one of torchrun's workers."""
    return "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_argv(nproc: int, args: list[str]) -> list[str]:
    """The command that runs `python -m fedtune ARGS` once per GPU on this machine."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--standalone",
        "-m",
        "fedtune",
        *args,
    ]


def relaunch(nproc: int) -> None:
    """Replace this process with torchrun running this same command once per GPU (never returns)."""
    argv = torchrun_argv(nproc, sys.argv[1:])
    os.execv(argv[0], argv)


def check_devices(gpus: int, field: str) -> None:
    """A client that asks for more GPUs than it sees fails naming the field, not deep in torchrun (on a CPU
    the ranks are processes, as in tests)."""
    if torch.cuda.is_available() and torch.cuda.device_count() < gpus:
        raise FedtuneError(f"{field}: {gpus} GPUs asked for, this machine has {torch.cuda.device_count()}")


def check_batch(batch_size: int, world: int) -> None:
    """Every optimizer step's batch is split evenly across the ranks."""
    if batch_size % world:
        raise FedtuneError(f"spec.training.batchSize: {batch_size} does not split evenly across {world} GPUs")


@dataclass(frozen=True)
class Group:
    """This process's place among the client's ranks; the default is a client of one process."""

    rank: int = 0
    world: int = 1
    control: Any = None  # the gloo group for decisions and counts (None: one process)

    @property
    def main(self) -> bool:
        """Rank 0: the one rank that reads and writes storage."""
        return self.rank == 0

    def share(self, obj: T) -> T:
        """Rank 0's `obj` on every rank (the others pass anything, typically None)."""
        if self.world == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.control)
        shared: T = box[0]
        return shared

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks, in float64 so token counts stay exact."""
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t, group=self.control)
        return [float(v) for v in t]

    def wrap(self, model: Any) -> Any:
        """The model for training: under DDP, gradients of the trainable weights only are all-reduced."""
        if self.world == 1:
            return model
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        frozen += [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen)  # type: ignore[no-untyped-call]
        ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
        return DistributedDataParallel(model, device_ids=ids)

    def accumulating(self, model: Any, last: bool) -> Any:
        """Skip the gradient all-reduce on every micro-batch but a step's last."""
        if last or not isinstance(model, DistributedDataParallel):
            return nullcontext()
        return model.no_sync()


def unwrap(model: Any) -> Any:
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextmanager
def joined() -> Iterator[Group]:
    """Join torchrun's process group for the life of the block: each rank on its own GPU when there are GPUs."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    log.info("rank %d of %d (%s)", rank, world, backend)
    try:
        yield Group(rank, world, dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT))
    finally:
        dist.destroy_process_group()
