"""Krum, Multi-Krum and Bulyan pick exactly: distances survive a large common component, equal scores go
to the client name that sorts first, and the order updates arrive in changes nothing."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import pytest
import torch

from fedtune.aggregation import ClientUpdate, State, make_strategy
from fedtune.aggregation.bulyan import Bulyan
from fedtune.aggregation.distances import krum_scores, squared_distances
from fedtune.aggregation.krum import Krum
from fedtune.api.spec import AggregationSpec

F = 1  # byzantineClients throughout
N = 7  # updates per round: Bulyan's least for f = 1


def strategy(name: str, n: int = N) -> Krum | Bulyan:
    s = make_strategy(AggregationSpec(strategy=name, min_clients=n, byzantine_clients=F))
    assert isinstance(s, Krum | Bulyan)
    return s


def names(ups: list[ClientUpdate]) -> list[str]:
    return [u.client for u in ups]


def exact_distances(ups: list[ClientUpdate]) -> torch.Tensor:
    """‖Δi − Δj‖² from the differences themselves, in float64: the reference."""
    flat = [torch.cat([u.delta[k].reshape(-1) for k in u.delta]).double() for u in ups]
    return torch.stack([torch.stack([(a - b).square().sum() for b in flat]) for a in flat])


def shuffles(ups: list[ClientUpdate], seed: int) -> Iterator[list[ClientUpdate]]:
    """The updates in ten arrival orders."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(10):
        yield [ups[int(i)] for i in torch.randperm(len(ups), generator=gen)]


def float32_gram_distances(ups: list[ClientUpdate]) -> torch.Tensor:
    """‖a‖² + ‖b‖² − 2⟨a, b⟩ with float32 products per key, as Krum and Bulyan computed it before."""
    gram = torch.zeros(len(ups), len(ups), dtype=torch.float64)
    for key in ups[0].delta:
        x = torch.stack([u.delta[key].reshape(-1).float() for u in ups])
        gram += (x @ x.T).double()
    sq = gram.diagonal()
    return (sq[:, None] + sq[None, :] - 2 * gram).clamp(min=0).fill_diagonal_(0)


def float32_gram_choice(ups: list[ClientUpdate], count: int, rescore: bool) -> list[str]:
    """The selection as it was: float32 Gram distances, equal scores to the earlier arrival."""
    d2 = float32_gram_distances(ups)
    zero = torch.zeros(len(ups), dtype=torch.float64)
    ranked = krum_scores(d2, zero, F)[0]
    left = list(range(len(ups)))
    out = []
    for _ in range(count):
        scores = krum_scores(d2[left][:, left], zero[left], F)[0] if rescore else ranked[left]
        out.append(ups[left.pop(int(torch.argmin(scores)))].client)
    return out


# --- a large common component --------------------------------------------------------------------

COMMON, R = 1024.0, 0.01


def star() -> list[ClientUpdate]:
    """A common component of norm 8192 on 64 coordinates; beside it a centre c3, five spokes at distance
    R in orthogonal directions, and c0, an outlier at 3R, arriving first.

    Krum scores (4 nearest, in units of R²): centre 4, spokes 1 + 3·2 = 7, outlier 9 + 3·10 = 39. In
    float32 every ‖Δi‖² and ⟨Δi, Δj⟩ is 2²⁶ plus less than half a unit in its last place, in any
    summation order, so the Gram expansion sees every distance as 0.
    """
    ups = []
    for i, offset in enumerate([3 * R, R, R, 0.0, R, R, R]):
        delta = torch.zeros(80)
        delta[:64] = COMMON
        delta[64 + i] = offset
        ups.append(ClientUpdate(f"c{i}", 1.0, {"w": delta.reshape(8, 10)}))
    return ups


def test_float32_gram_sees_no_distance_under_a_common_component_and_centring_does() -> None:
    ups = star()
    exact = exact_distances(ups)
    assert exact.max() > 0
    assert float32_gram_distances(ups).count_nonzero() == 0
    d2, _ = squared_distances(ups)
    assert torch.allclose(d2, exact, rtol=1e-9, atol=0)


@pytest.mark.parametrize(
    ("name", "count", "rescore", "want"),
    [
        ("krum", 1, False, ["c3"]),
        ("multikrum", N - F, False, ["c3", "c1", "c2", "c4", "c5", "c6"]),
        ("bulyan", N - 2 * F, True, ["c3", "c1", "c2", "c4", "c5"]),
    ],
)
def test_correlated_updates_the_float32_gram_picks_the_outlier_and_centred_distances_do_not(
    name: str, count: int, rescore: bool, want: list[str]
) -> None:
    ups = star()
    assert "c0" in float32_gram_choice(ups, count, rescore)
    assert names(strategy(name).select(ups)) == want


def test_krum_and_bulyan_return_the_centre_under_a_common_component() -> None:
    ups = star()
    zero = {"w": torch.zeros(8, 10)}
    centre = ups[3].delta["w"]
    for name in ("krum", "bulyan"):
        new, _ = strategy(name).aggregate(zero, ups, {})
        assert torch.equal(new["w"], centre)


def test_distances_keep_full_precision_for_random_correlated_updates() -> None:
    """A random common component of norm 10⁴ and deviations of norm about 0.1: the float32 Gram
    expansion is off by more than the distances themselves, the centred one by less than 1e-9 of them."""
    gen = torch.Generator().manual_seed(1)
    common = {k: torch.randn(s, generator=gen) for k, s in {"a": (16, 256), "b": (256, 16)}.items()}
    scale = 1e4 / torch.cat([c.reshape(-1) for c in common.values()]).norm()
    ups = [
        ClientUpdate(
            f"c{i}", 1.0, {k: c * scale + torch.randn(c.shape, generator=gen) * 1e-3 for k, c in common.items()}
        )
        for i in range(N)
    ]
    exact = exact_distances(ups)
    assert (float32_gram_distances(ups) - exact).abs().max() > exact.max()
    d2, _ = squared_distances(ups)
    assert (d2 - exact).abs().max() < 1e-9 * exact.max()
    best = int(torch.argmin(krum_scores(exact, torch.zeros(N, dtype=torch.float64), F)[0]))
    assert names(strategy("krum").select(ups)) == [f"c{best}"]


# --- ties and arrival order ----------------------------------------------------------------------


def symmetric(clients: list[str]) -> list[ClientUpdate]:
    """Updates that are coordinate permutations of one another on a common component: every distance
    between two of them is the same, so every Krum score is."""
    gen = torch.Generator().manual_seed(2)
    bump = torch.randn(16, generator=gen) * 0.01
    ups = []
    for i, client in enumerate(clients):
        delta = torch.full((len(clients), 16), 1000.0)
        delta[i] += bump
        ups.append(ClientUpdate(client, 1.0, {"w": delta}))
    return ups


@pytest.mark.parametrize(
    ("name", "clients", "want"),
    [
        ("krum", ["m", "b", "x", "a", "k"], ["a"]),
        ("multikrum", ["m", "b", "x", "a", "k"], ["a", "b", "k", "m"]),
        ("bulyan", ["m", "b", "x", "a", "k", "z", "c"], ["a", "b", "c", "k", "m"]),
    ],
)
def test_equal_scores_go_to_the_client_name_that_sorts_first_in_any_arrival_order(
    name: str, clients: list[str], want: list[str]
) -> None:
    ups = symmetric(clients)
    d2, _ = squared_distances(ups)
    assert torch.allclose(d2[~torch.eye(len(ups), dtype=torch.bool)], d2[0, 1], rtol=1e-12, atol=0)
    s = strategy(name, len(ups))
    for order in shuffles(ups, seed=7):
        assert names(s.select(order)) == want


def random_round(seed: int) -> tuple[list[ClientUpdate], State]:
    """N updates around a large common component, one of them scaled far off, and a zero global."""
    gen = torch.Generator().manual_seed(seed)
    shapes = {"q.lora_A": (4, 32), "q.lora_B": (32, 4)}
    common = {k: torch.randn(s, generator=gen) * 100 for k, s in shapes.items()}
    ups = [
        ClientUpdate(
            f"c{i}",
            1.0 + i,
            {k: c + torch.randn(c.shape, generator=gen) * (50 if i == 4 else 1) for k, c in common.items()},
        )
        for i in range(N)
    ]
    return ups, {k: torch.zeros(s) for k, s in shapes.items()}


def test_identical_updates_tie_by_client_name() -> None:
    ups, _ = random_round(seed=3)
    twin = ClientUpdate("a-twin", 1.0, ups[2].delta)
    ups = [*ups[:4], twin]  # ups[2] and its twin: the two closest, each scoring the same
    s = strategy("krum", len(ups))
    assert names(s.select(ups)) == ["a-twin"]
    assert names(s.select(ups[::-1])) == ["a-twin"]


@pytest.mark.parametrize("name", ["krum", "multikrum", "bulyan"])
def test_arrival_order_changes_neither_the_selection_nor_a_bit_of_the_result(name: str) -> None:
    ups, zero = random_round(seed=4)
    s = strategy(name)
    want_names = names(s.select(ups))
    want, _ = s.aggregate(zero, ups, {})
    for order in shuffles(ups, seed=5):
        assert names(s.select(order)) == want_names
        got, _ = s.aggregate(zero, order, {})
        assert all(torch.equal(got[k], want[k]) for k in want)
    assert "c4" not in want_names


class CountingState(dict[str, torch.Tensor]):
    """A delta that counts how often each tensor is looked up, as a lazy one would load it."""

    def __init__(self, data: Mapping[str, torch.Tensor]) -> None:
        super().__init__(data)
        self.lookups: dict[str, int] = {}

    def __getitem__(self, key: str) -> torch.Tensor:
        self.lookups[key] = self.lookups.get(key, 0) + 1
        return super().__getitem__(key)


def test_distances_look_each_tensor_up_once() -> None:
    ups, _ = random_round(seed=6)
    counted = [ClientUpdate(u.client, u.weight, CountingState(u.delta)) for u in ups]
    squared_distances(counted)
    assert all(isinstance(u.delta, CountingState) and u.delta.lookups == dict.fromkeys(u.delta, 1) for u in counted)
