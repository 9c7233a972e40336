"""Krum (Blanchard et al. 2017): the one update closest to its K − f − 2 nearest neighbours.

With f = byzantineClients it tolerates f arbitrary updates when K > 2f + 2. Distances come from a Gram
matrix (see `distances`).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from fedtune.aggregation.base import ClientUpdate, State, Strategy, collect
from fedtune.aggregation.distances import krum_scores, squared_distances
from fedtune.aggregation.fedavg import apply_delta, weighted_mean
from fedtune.tensors import single_threaded


class Krum(Strategy):
    name = "krum"

    def keep(self, n: int) -> int:
        """How many of the best-scored updates are averaged: one for Krum."""
        return 1

    def select(self, ups: list[ClientUpdate]) -> list[ClientUpdate]:
        """The `keep` updates of lowest Krum score, ties to the earlier update."""
        f = self.spec.byzantine_clients
        scores = krum_scores(squared_distances(ups), f)
        order = torch.sort(scores, stable=True).indices[: self.keep(len(ups))]
        return [ups[int(i)] for i in order]

    @single_threaded()
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        f = self.spec.byzantine_clients
        ups = collect(updates, 2 * f + 3, f"{self.name} with byzantineClients={f}")
        return apply_delta(global_state, weighted_mean(self.select(ups))), server_state
