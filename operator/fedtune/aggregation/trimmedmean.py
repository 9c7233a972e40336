"""Trimmed mean (Yin et al. 2018): per coordinate, drop the ⌊β·K⌋ smallest and largest values, average
the rest (β = trimFraction). Unweighted, like the median, and like it worked one tensor key at a time,
so with the aggregator's lazy updates only that key's K tensors are in memory.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from fedtune.aggregation.base import ClientUpdate, State, Strategy, collect
from fedtune.aggregation.fedavg import apply_delta
from fedtune.aggregation.order import trimmed_sum
from fedtune.tensors import single_threaded


def trim_count(n: int, fraction: float) -> int:
    """Values cut from each end, as scipy's trim_mean counts them."""
    return math.floor(fraction * n)


class TrimmedMean(Strategy):
    name = "trimmedmean"

    @single_threaded()
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        ups = collect(updates, 1, "trimmedmean")
        cut = trim_count(len(ups), self.spec.trim_fraction)
        kept = len(ups) - 2 * cut
        delta = {k: trimmed_sum([u.delta[k] for u in ups], cut).div_(kept) for k in ups[0].delta}
        return apply_delta(global_state, delta), server_state
