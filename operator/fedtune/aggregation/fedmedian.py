"""FedMedian (Yin et al. 2018): the coordinate-wise median of the updates, robust to outliers.

Weights are ignored: a weight would let one client claim many votes. A rank statistic needs all
updates together, so the work runs one tensor key at a time: with the aggregator's lazy updates only
that key's K tensors are in memory, never K whole updates.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedtune.aggregation.base import ClientUpdate, State, Strategy, collect
from fedtune.aggregation.fedavg import apply_delta
from fedtune.aggregation.order import median
from fedtune.tensors import single_threaded


class FedMedian(Strategy):
    name = "fedmedian"

    @single_threaded()
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        ups = collect(updates, 1, "fedmedian")
        delta = {k: median([u.delta[k] for u in ups]) for k in ups[0].delta}
        return apply_delta(global_state, delta), server_state
