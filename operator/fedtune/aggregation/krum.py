"""Krum (Blanchard et al. 2017): the one update closest to its K − f − 2 nearest neighbours.

With f = byzantineClients it tolerates f arbitrary updates when K > 2f + 2. Distances, scores and the
rule for equal scores are in `distances`: centred float64 distances, and equal scores go to the client
name that sorts first, so the choice depends neither on arrival order nor on rounding.
"""

from __future__ import annotations

from collections.abc import Iterable

from fedtune.aggregation.base import ClientUpdate, State, Strategy, collect
from fedtune.aggregation.distances import krum_choice
from fedtune.aggregation.fedavg import apply_delta, weighted_mean
from fedtune.tensors import single_threaded


class Krum(Strategy):
    name = "krum"

    def keep(self, n: int) -> int:
        """How many of the best-scored updates are averaged: one for Krum."""
        return 1

    def select(self, ups: list[ClientUpdate]) -> list[ClientUpdate]:
        """The `keep` updates of lowest Krum score, best first."""
        return krum_choice(ups, self.spec.byzantine_clients, self.keep(len(ups)), rescore=False)

    @single_threaded()
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        f = self.spec.byzantine_clients
        ups = collect(updates, 2 * f + 3, f"{self.name} with byzantineClients={f}")
        return apply_delta(global_state, weighted_mean(self.select(ups))), server_state
