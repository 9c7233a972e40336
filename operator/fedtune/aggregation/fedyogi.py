"""FedYogi: v ← v − (1 − β2)·Δ²·sign(v − Δ²) (Reddi et al. 2021); v grows more slowly than Adam's."""

from __future__ import annotations

import torch

from fedtune.aggregation.fedopt import FedOpt


class FedYogi(FedOpt):
    name = "fedyogi"

    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return v - (1.0 - self.spec.beta2) * d2 * torch.sign(v - d2)
