"""Robust strategies against one client sending a scaled-up update, and the order networks they use."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pytest
import torch

from fedtune.aggregation import ClientUpdate, State, make_strategy
from fedtune.aggregation.order import CHUNK, median, pruned_network, sort_rows, sorting_network, trimmed_sum
from fedtune.aggregation.validation import update_norm, validate_update
from fedtune.api.spec import AggregationSpec

SHAPES = {"q.lora_A": (4, 32), "q.lora_B": (32, 4), "v.lora_A": (4, 32)}


def honest_and_attacker(n: int, seed: int = 0) -> tuple[list[ClientUpdate], State]:
    """n − 1 honest updates scattered around a common direction, and one scaled up 100×."""
    gen = torch.Generator().manual_seed(seed)
    centre = {k: torch.randn(s, generator=gen) * 0.1 for k, s in SHAPES.items()}
    ups = [
        ClientUpdate(f"h{i}", 10.0, {k: c + torch.randn(c.shape, generator=gen) * 0.02 for k, c in centre.items()})
        for i in range(n - 1)
    ]
    honest_mean = {k: torch.stack([u.delta[k] for u in ups]).mean(0) for k in SHAPES}
    ups.insert(n // 2, ClientUpdate("evil", 10.0, {k: v * 100 for k, v in ups[0].delta.items()}))
    return ups, honest_mean


def distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    return update_norm({k: a[k] - b[k] for k in a})


@pytest.mark.parametrize(
    ("strategy", "n", "extra"),
    [
        ("fedmedian", 5, {}),
        ("trimmedmean", 5, {"trim_fraction": 0.2}),
        ("krum", 5, {"byzantine_clients": 1}),
        ("multikrum", 5, {"byzantine_clients": 1}),
        ("bulyan", 7, {"byzantine_clients": 1}),  # Bulyan needs n ≥ 4f + 3
    ],
)
def test_robust_strategies_stay_within_the_honest_spread(strategy: str, n: int, extra: dict[str, float]) -> None:
    ups, honest_mean = honest_and_attacker(n)
    honest = [u for u in ups if u.client != "evil"]
    # The stated bound: no farther from the honest mean than the farthest honest update is.
    spread = max(distance(u.delta, honest_mean) for u in honest)
    zero = {k: torch.zeros(s) for k, s in SHAPES.items()}
    new, _ = make_strategy(AggregationSpec(strategy=strategy, min_clients=n, **extra)).aggregate(zero, ups, {})
    assert distance(new, honest_mean) <= spread
    # FedAvg on the same round is pulled far off, so the bound above says something.
    avg, _ = make_strategy(AggregationSpec(strategy="fedavg")).aggregate(zero, ups, {})
    assert distance(avg, honest_mean) > 10 * spread


def test_norm_bound_rejects_the_scaled_update_before_fedavg() -> None:
    ups, honest_mean = honest_and_attacker(5)
    bound = 2 * max(update_norm(u.delta) for u in ups if u.client != "evil")
    trainable = {k: torch.zeros(s) for k, s in SHAPES.items()}
    reasons = {u.client: validate_update(u.delta, trainable, bound) for u in ups}
    assert reasons.pop("evil") is not None
    assert set(reasons.values()) == {None}
    kept = [u for u in ups if u.client != "evil"]
    new, _ = make_strategy(AggregationSpec(strategy="fedavg")).aggregate(trainable, kept, {})
    assert distance(new, honest_mean) < 1e-6


@pytest.mark.parametrize(
    ("n", "shape"),
    [
        (1, (257,)),
        (2, (257,)),
        (3, (257,)),
        (4, (257,)),
        (7, (257,)),
        (10, (2, CHUNK // 2 + 9)),
        (16, (257,)),
        (33, (3, 129)),
        (50, (CHUNK + 3,)),
    ],
)
def test_order_networks_match_numpy(n: int, shape: tuple[int, ...]) -> None:
    """Exact against numpy, on inputs that span more than one chunk of coordinates too."""
    gen = torch.Generator().manual_seed(n)
    rows = [torch.randn(shape, generator=gen) for _ in range(n)]
    rows[0].view(-1)[:20] = rows[-1].view(-1)[:20]  # ties
    before = [r.clone() for r in rows]
    ref = np.stack([r.numpy() for r in rows])
    assert torch.equal(median(rows), torch.from_numpy(np.median(ref, axis=0)))
    assert torch.equal(torch.stack(sort_rows(rows)), torch.from_numpy(np.sort(ref, axis=0)))
    for cut in range(0, (n + 1) // 2):
        want = np.sort(ref, axis=0)[cut : n - cut].astype(np.float64).sum(0)
        assert np.allclose(trimmed_sum(rows, cut).numpy(), want, atol=1e-5)
    assert all(torch.equal(r, b) for r, b in zip(rows, before, strict=True))  # inputs untouched


def test_pruning_drops_comparators_the_median_ignores() -> None:
    n = 100
    full = len(pruned_network(n, (1,) * n))  # one group: nothing matters, nothing kept
    med = len(pruned_network(n, tuple(int(p in (49, 50)) for p in range(n))))
    assert full == 0
    assert 0 < med < len(sorting_network(n))
