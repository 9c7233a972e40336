"""Strategies over lazy updates: rank- and distance-based ones hold one key's K tensors at a time, never
K updates, and give what they give on updates in memory."""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import pytest
import torch

from fedtune.aggregation import ClientUpdate, State, make_strategy
from fedtune.api.spec import AggregationSpec

KEYS = [f"l{i}.lora_{ab}" for i in range(4) for ab in "AB"]
K = 11


@dataclass
class Tally:
    """Tensors made through lazy mappings, and the most alive at once."""

    alive: set[int] = field(default_factory=set)
    peak: int = 0
    made: int = 0


class Lazy(Mapping[str, torch.Tensor]):
    """Builds a fresh tensor on each access, as a spooled update reads one, and tallies those alive."""

    def __init__(self, values: State, tally: Tally) -> None:
        self.values, self.tally = values, tally

    def __getitem__(self, key: str) -> torch.Tensor:
        t = self.values[key].clone()
        self.tally.made += 1
        self.tally.alive.add(id(t))
        self.tally.peak = max(self.tally.peak, len(self.tally.alive))
        weakref.finalize(t, self.tally.alive.discard, id(t))
        return t

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)


def updates() -> list[State]:
    gen = torch.Generator().manual_seed(5)
    return [{k: torch.randn(6, 8, generator=gen) for k in KEYS} for _ in range(K)]


@pytest.mark.parametrize(
    ("strategy", "extra"),
    [
        ("fedmedian", {}),
        ("trimmedmean", {"trim_fraction": 0.2}),
        ("krum", {"byzantine_clients": 2}),
        ("multikrum", {"byzantine_clients": 2}),
        ("bulyan", {"byzantine_clients": 2}),
    ],
)
def test_robust_strategies_hold_one_keys_tensors_at_a_time(strategy: str, extra: dict[str, float]) -> None:
    deltas = updates()
    glob = {k: torch.zeros(6, 8) for k in KEYS}
    s = make_strategy(AggregationSpec(strategy=strategy, min_clients=K, **extra))
    in_memory, _ = s.aggregate(glob, [ClientUpdate(f"c{i:02d}", 1.0, d) for i, d in enumerate(deltas)], {})

    tally = Tally()
    lazy, _ = s.aggregate(glob, [ClientUpdate(f"c{i:02d}", 1.0, Lazy(d, tally)) for i, d in enumerate(deltas)], {})
    assert all(torch.equal(lazy[k], in_memory[k]) for k in KEYS)
    assert tally.made >= len(KEYS)  # it did read through the lazy mapping
    # The tensors of one key, or of two while one key's list gives way to the next's: not K·keys.
    assert tally.peak <= 2 * K < K * len(KEYS), tally.peak
