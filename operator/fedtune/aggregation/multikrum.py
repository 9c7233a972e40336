"""Multi-Krum (Blanchard et al. 2017): the weighted mean of the K − f updates of best Krum score."""

from __future__ import annotations

from fedtune.aggregation.krum import Krum


class MultiKrum(Krum):
    name = "multikrum"

    def keep(self, n: int) -> int:
        return n - self.spec.byzantine_clients
