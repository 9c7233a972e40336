"""FedAdagrad: v ← v + Δ² (Reddi et al. 2021)."""

from __future__ import annotations

import torch

from fedtune.aggregation.fedopt import FedOpt


class FedAdagrad(FedOpt):
    name = "fedadagrad"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v + d2
