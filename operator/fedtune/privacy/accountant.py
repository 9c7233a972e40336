"""Privacy accounting by opacus's Rényi-DP accountant (Mironov 2017; subsampled Gaussian, Mironov et al. 2019).

One federated round is one step of the Gaussian mechanism: noise multiplier z on the sum of clipped
updates. With a sampling rate q < 1 the analysis is that of Poisson-subsampled rounds; fedtune's own
accounting uses q = 1 per client over the rounds it took part in, since the selection is public.
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
