"""Client-level differential privacy as a strategy around a mean-based one.

The inner strategy takes its step from the noised mean of the clipped updates (`ClientLevelDP`) instead
of their weighted mean, so no client's update reaches it, or anything released, without noise. It
lives here because `aggregation` and `privacy` do not import each other.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedtune.aggregation import ClientUpdate, State, Strategy
from fedtune.aggregation.fedavg import MeanStrategy
from fedtune.aggregation.validation import update_norm
from fedtune.privacy import ClientLevelDP


class PrivateStrategy(Strategy):
    """Clip each update to the clip norm, sum, add secure Gaussian noise, divide, then `inner.step`."""

    single_pass = True

    def __init__(self, inner: MeanStrategy, dp: ClientLevelDP) -> None:
        super().__init__(inner.spec)
        self.inner, self.dp = inner, dp
        self.name = inner.name

    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        clipped = ((u.delta, update_norm(u.delta) if u.norm is None else u.norm) for u in updates)
        mean, server_next = self.dp.private_mean(clipped, server_state)
        return self.inner.step(global_state, mean, server_next)
