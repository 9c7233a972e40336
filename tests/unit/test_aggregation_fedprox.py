"""FedProx: the server aggregates as FedAvg; the client's proximal term pulls training towards the global."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from fedtune.aggregation import ClientUpdate, make_strategy
from fedtune.api.spec import AggregationSpec
from fedtune.training.model import device
from fedtune.training.trainer import Options, train


class TwoLogits(torch.nn.Module):
    """Logits (w0, w1) at every position: cross-entropy towards token 0 alone has no optimum (w0 grows
    forever), while with FedProx's mu/2·||w||² it sits at w = (a, −a) where mu·a = σ(−2a)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(2))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(logits=self.w.expand(*input_ids.shape, 2))


@pytest.mark.parametrize("optimum", [0.5, 1.0, 2.0])
def test_proximal_term_moves_the_optimum_to_its_hand_computed_value(optimum: float) -> None:
    mu = 1 / (optimum * (1 + math.exp(2 * optimum)))  # solves mu·a = σ(−2a) for a = optimum
    model = TwoLogits().to(device())
    batch = {"input_ids": torch.zeros(1, 2, dtype=torch.long), "labels": torch.zeros(1, 2, dtype=torch.long)}
    batch["attention_mask"] = torch.ones(1, 2, dtype=torch.long)
    steps = 1500
    train(model, [[batch]] * steps, Options(rate=lambda i: 0.05 * (1 - i / steps), proximal_mu=mu))
    torch.testing.assert_close(model.w.detach().cpu(), torch.tensor([optimum, -optimum]), rtol=0, atol=0.02)


def test_fedprox_aggregates_exactly_as_fedavg() -> None:
    gen = torch.Generator().manual_seed(5)
    glob = {"a": torch.randn(3, 4, generator=gen)}
    ups = [ClientUpdate(c, w, {"a": torch.randn(3, 4, generator=gen)}) for c, w in [("x", 2.0), ("y", 5.0)]]
    prox, _ = make_strategy(AggregationSpec(strategy="fedprox", proximal_mu=0.5)).aggregate(glob, ups, {})
    avg, _ = make_strategy(AggregationSpec(strategy="fedavg")).aggregate(glob, ups, {})
    assert torch.equal(prox["a"], avg["a"])
