"""Privacy accounting by opacus's Rényi-DP accountant (Mironov 2017; subsampled Gaussian, Mironov et al. 2019).

One federated round is one step of the subsampled Gaussian mechanism: noise multiplier z on the sum of
clipped updates, each client taking part with probability q = clientsPerRound / clients. The RDP
analysis is for Poisson sampling of clients; fedtune samples a fixed number per round, the usual
approximation in DP-FedAvg (McMahan et al. 2018). With every client in every round (q = 1) it is exact.
"""

from __future__ import annotations

import math

from opacus.accountants import RDPAccountant  # type: ignore[import-untyped]


def epsilon(noise_multiplier: float, sample_rate: float, rounds: int, delta: float) -> float:
    """ε of (ε, δ)-DP after `rounds` rounds; 0 before the first, infinite without noise."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    acc = RDPAccountant()
    acc.history = [(noise_multiplier, sample_rate, rounds)]
    return float(acc.get_epsilon(delta))
