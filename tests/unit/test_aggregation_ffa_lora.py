"""FFA-LoRA: with A frozen and shared, FedAvg of B-only updates is exactly the mean of the products B·A."""

from __future__ import annotations

import torch

from fedtune.aggregation import ClientUpdate, make_strategy
from fedtune.api.spec import AggregationSpec


def test_fedavg_of_b_only_updates_equals_the_mean_of_the_products() -> None:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4, 16, generator=gen)  # lora_A: r × in, frozen at its seeded init
    b = torch.randn(16, 4, generator=gen) * 0.1  # lora_B: out × r
    glob = {"lora_A": a, "lora_B": b}
    weights = [3.0, 1.0, 2.0]
    deltas = [torch.randn(16, 4, generator=gen) * 0.05 for _ in weights]
    ups = [ClientUpdate(f"c{i}", w, {"lora_B": d}) for i, (w, d) in enumerate(zip(weights, deltas, strict=True))]
    new, _ = make_strategy(AggregationSpec(strategy="fedavg")).aggregate(glob, ups, {})
    assert torch.equal(new["lora_A"], a)
    products = sum(w * ((b + d) @ a) for w, d in zip(weights, deltas, strict=True)) / sum(weights)
    assert torch.allclose(new["lora_B"] @ a, products, atol=1e-6, rtol=0)


def test_with_a_trained_too_the_mean_of_products_is_not_reached() -> None:
    """Plain LoRA: mean(B)·mean(A) ≠ mean(B·A), the inexactness FFA-LoRA removes."""
    gen = torch.Generator().manual_seed(1)
    a = torch.randn(4, 16, generator=gen)
    b = torch.randn(16, 4, generator=gen) * 0.1
    ups = [
        ClientUpdate(
            f"c{i}",
            1.0,
            {"lora_A": torch.randn(4, 16, generator=gen) * 0.5, "lora_B": torch.randn(16, 4, generator=gen) * 0.5},
        )
        for i in range(3)
    ]
    new, _ = make_strategy(AggregationSpec(strategy="fedavg")).aggregate({"lora_A": a, "lora_B": b}, ups, {})
    products = sum((b + u.delta["lora_B"]) @ (a + u.delta["lora_A"]) for u in ups) / 3
    assert (new["lora_B"] @ new["lora_A"] - products).abs().max() > 1e-2
