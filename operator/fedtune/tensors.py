"""Tensor helpers shared by `aggregation` and `privacy`, which must not import each other."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_threaded() -> Iterator[None]:
    """Run torch's CPU ops on one thread for the duration.

    Aggregation is elementwise work over many tensors of a few hundred kB each: memory bound, so a
    second thread adds nothing but a synchronisation per op, and when the cores are shared (an
    aggregator pod asks for one CPU by default) that wait costs 20× the op itself. The thin matrix
    products of Krum's Gram matrix fare the same.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
