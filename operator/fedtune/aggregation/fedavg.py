"""FedAvg (McMahan et al. 2017): the example-weighted mean of client updates, streamed."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.aggregation.base import ClientUpdate, State, Strategy
from fedtune.errors import FedtuneError


def weighted_mean(updates: Iterable[ClientUpdate]) -> State:
    """Example-weighted mean of deltas, accumulated in float64 one update at a time."""
    acc: dict[str, torch.Tensor] = {}
    total = 0.0
    for u in updates:
        for k, v in u.delta.items():
            if k in acc:
                acc[k].add_(v.to(torch.float64), alpha=u.weight)
            else:
                acc[k] = v.to(torch.float64).mul(u.weight)
        total += u.weight
    if total <= 0:
        raise FedtuneError("aggregation: no update with positive weight to average")
    return {k: v.div_(total) for k, v in acc.items()}


def apply_delta(global_state: State, delta: State, scale: float = 1.0) -> State:
    """global + scale·delta on the keys the delta has; other keys (frozen ones) unchanged."""
    out = dict(global_state)
    for k, d in delta.items():
        g = global_state[k]
        out[k] = (g.to(torch.float64) + scale * d).to(g.dtype)
    return out


class FedAvg(Strategy):
    name = "fedavg"

    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        return apply_delta(global_state, weighted_mean(updates)), server_state
