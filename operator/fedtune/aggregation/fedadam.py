"""FedAdam: v ← β2·v + (1 − β2)·Δ² (Reddi et al. 2021)."""

from __future__ import annotations

import torch

from fedtune.aggregation.fedopt import FedOpt


class FedAdam(FedOpt):
    name = "fedadam"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        b2 = self.spec.beta2
        return v.mul(b2).add_(d2, alpha=1.0 - b2)
