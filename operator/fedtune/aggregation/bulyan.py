"""Bulyan (El Mhamdi et al. 2018): Krum selection, then a trimmed coordinate-wise average.

With n updates and f = byzantineClients (n ≥ 4f + 3): θ = n − 2f updates are chosen by Krum one at a
time, each round on those not yet chosen; then per coordinate the β = θ − 2f values closest to the
median of the chosen ones are averaged. Those β values are a contiguous run of the sorted values, found
by dropping 2f times whichever end lies farther from the median (the upper end on a tie). The selection
follows `distances`' rule for equal scores, and the trimmed average is symmetric in its inputs, so the
result does not depend on the order the updates arrive in.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.aggregation.base import ClientUpdate, State, Strategy, collect
from fedtune.aggregation.distances import krum_choice
from fedtune.aggregation.fedavg import apply_delta
from fedtune.aggregation.order import sort_rows
from fedtune.tensors import single_threaded


@single_threaded()
def closest_to_median_mean(rows: list[torch.Tensor], drop: int) -> torch.Tensor:
    """Per coordinate, the mean of the len(rows) − drop values nearest the median."""
    s = torch.stack(sort_rows(rows))
    n = s.shape[0]
    mid = (s[(n - 1) // 2] + s[n // 2]) / 2
    lo = torch.zeros_like(mid, dtype=torch.long)
    hi = torch.full_like(lo, n - 1)
    for _ in range(drop):
        low_far = (mid - s.gather(0, lo[None])[0]) > (s.gather(0, hi[None])[0] - mid)
        lo = torch.where(low_far, lo + 1, lo)
        hi = torch.where(low_far, hi, hi - 1)
    csum = torch.cat([torch.zeros_like(s[:1]), s.cumsum(0)])
    total = csum.gather(0, (hi + 1)[None])[0] - csum.gather(0, lo[None])[0]
    return total / (n - drop)


class Bulyan(Strategy):
    name = "bulyan"

    def select(self, ups: list[ClientUpdate]) -> list[ClientUpdate]:
        """The n − 2f updates Krum picks one at a time, each among those not yet picked."""
        f = self.spec.byzantine_clients
        return krum_choice(ups, f, len(ups) - 2 * f, rescore=True)

    @single_threaded()
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        f = self.spec.byzantine_clients
        chosen = self.select(collect(updates, 4 * f + 3, f"{self.name} with byzantineClients={f}"))
        delta = {k: closest_to_median_mean([u.delta[k] for u in chosen], 2 * f) for k in chosen[0].delta}
        return apply_delta(global_state, delta), server_state
