"""FedProx (Li et al. 2020): the proximal term mu/2·||w − w_global||² acts in each client's training.

The server side aggregates exactly as FedAvg; the strategy exists so the spec names it and clients
know to add the term (`spec.aggregation.proximalMu`).
"""

from __future__ import annotations

from fedtune.aggregation.fedavg import FedAvg


class FedProx(FedAvg):
    name = "fedprox"
