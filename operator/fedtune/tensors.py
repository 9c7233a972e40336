"""Tensor helpers shared by `aggregation` and `privacy`, which must not import each other."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU ops on one thread for the duration.

    Aggregation is elementwise work over many tensors of a few hundred kB each: memory bound, so a
    second thread adds nothing but a synchronisation per op, and on a busy machine that wait costs
    20× the op itself. Matrix products (Krum's Gram matrix) stay outside this context.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
