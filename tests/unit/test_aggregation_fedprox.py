"""FedProx: the server aggregates as FedAvg; the client's proximal term pulls training towards the global."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fedtune.aggregation import ClientUpdate, make_strategy
from fedtune.api.spec import AggregationSpec
from fedtune.training.trainer import train


class Quadratic(torch.nn.Module):
    """loss = ||w − target||², minimised at the target; w starts at 0 (the 'global')."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))

    def forward(self, target: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(loss=((self.w - target) ** 2).sum())


@pytest.mark.parametrize(("mu", "optimum"), [(0.0, 10.0), (2.0, 5.0), (18.0, 1.0)])
def test_proximal_term_moves_the_optimum_to_its_hand_computed_value(mu: float, optimum: float) -> None:
    # d/dw [(w − 10)² + mu/2·w²] = 0  ⇒  w = 20 / (2 + mu)
    model = Quadratic()
    batches = [{"target": torch.full((3,), 10.0)}] * 600
    train(model, batches, learning_rate=0.05, proximal_mu=mu)
    assert torch.allclose(model.w.detach(), torch.full((3,), optimum), atol=0.05)


def test_fedprox_aggregates_exactly_as_fedavg() -> None:
    gen = torch.Generator().manual_seed(5)
    glob = {"a": torch.randn(3, 4, generator=gen)}
    ups = [ClientUpdate(c, w, {"a": torch.randn(3, 4, generator=gen)}) for c, w in [("x", 2.0), ("y", 5.0)]]
    prox, _ = make_strategy(AggregationSpec(strategy="fedprox", proximal_mu=0.5)).aggregate(glob, ups, {})
    avg, _ = make_strategy(AggregationSpec(strategy="fedavg")).aggregate(glob, ups, {})
    assert torch.equal(prox["a"], avg["a"])
