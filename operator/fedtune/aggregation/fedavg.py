"""FedAvg (McMahan et al. 2017): the example-weighted mean of client updates, streamed."""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterable

import torch

from fedtune.aggregation.base import ClientUpdate, State, Strategy
from fedtune.errors import FedtuneError
from fedtune.tensors import single_threaded


@single_threaded()
def weighted_sum(updates: Iterable[ClientUpdate]) -> tuple[State, float]:
    """Weighted sum of deltas and the sum of weights, accumulated in place one update at a time.

    Peak memory is the accumulator plus the update being added, however many updates there are.
    Accumulation stays in the updates' float32: at the scale of adapter deltas its rounding is far
    below the noise of training, and a float64 accumulator would halve the throughput.
    """
    acc: State = {}
    total = 0.0
    for u in updates:
        if u.weight <= 0:
            raise FedtuneError(f"aggregation: update of {u.client} has weight {u.weight}, needs > 0")
        for k, v in u.delta.items():
            if k in acc:
                acc[k].add_(v, alpha=u.weight)
            else:
                acc[k] = v.to(torch.float32) * u.weight
        total += u.weight
    if total <= 0:
        raise FedtuneError("aggregation: no update to average")
    return acc, total


def weighted_mean(updates: Iterable[ClientUpdate]) -> State:
    """Weighted mean of deltas, streamed as in `weighted_sum`."""
    acc, total = weighted_sum(updates)
    for v in acc.values():
        v.div_(total)
    return acc


@single_threaded()
def apply_delta(global_state: State, delta: State, scale: float = 1.0, reuse_delta: bool = False) -> State:
    """global + scale·delta on the keys the delta has; other keys (frozen ones) unchanged.

    With `reuse_delta` the float32 delta is a scratch buffer the caller gives up: the sum is written
    into it, one pass over memory and no new allocation.
    """
    out = dict(global_state)
    for k, d in delta.items():
        g = global_state[k]
        if reuse_delta:
            out[k] = torch.add(g, d, alpha=scale, out=d).to(g.dtype)
        else:
            out[k] = g.to(torch.promote_types(g.dtype, torch.float32)).add(d, alpha=scale).to(g.dtype)
    return out


class MeanStrategy(Strategy):
    """A strategy whose next global is a function of the round's mean update alone: the mean is
    streamed, and `step` applies it. Differential privacy replaces the weighted mean with a noised one
    and calls the same `step`."""

    single_pass = True

    @abstractmethod
    def step(self, global_state: State, mean: State, server_state: State) -> tuple[State, State]:
        """The next global and server state from the round's mean update, a buffer `step` may overwrite."""

    @single_threaded()
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        return self.step(global_state, weighted_mean(updates), server_state)


class FedAvg(MeanStrategy):
    """The weighted mean of the updates added to the global."""

    name = "fedavg"

    def step(self, global_state: State, mean: State, server_state: State) -> tuple[State, State]:
        return apply_delta(global_state, mean, reuse_delta=True), server_state
