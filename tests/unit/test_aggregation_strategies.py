"""Each strategy against a reference computed by hand on small fixed inputs."""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator

import pytest
import torch

from fedtune.aggregation import STRATEGIES, ClientUpdate, State, make_strategy
from fedtune.aggregation.encoding import load_state, save_state
from fedtune.api.spec import AggregationSpec, StrategyName
from fedtune.errors import FedtuneError


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float32)


def up(client: str, weight: float, *xs: float) -> ClientUpdate:
    return ClientUpdate(client, weight, {"w": t(*xs)})


def agg(strategy: str, glob: State, ups: list[ClientUpdate], state: State | None = None, **kw: float):
    s = make_strategy(AggregationSpec(strategy=strategy, **kw))
    return s.aggregate(glob, ups, state or {})


def test_every_spec_strategy_is_registered() -> None:
    assert set(STRATEGIES) == {s.value for s in StrategyName}


def test_unknown_strategy_names_the_field() -> None:
    spec = AggregationSpec.model_construct(strategy="nope")
    with pytest.raises(FedtuneError, match=r"spec\.aggregation\.strategy"):
        make_strategy(spec)


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_fedavg_and_fedprox_take_the_example_weighted_mean(name: str) -> None:
    glob = {"w": t(0.5, 0.5), "frozen": t(7.0)}
    ups = [up("a", 1, 1.0, 2.0), up("b", 3, 3.0, -2.0)]
    new, state = agg(name, glob, ups)
    # (1·[1, 2] + 3·[3, −2]) / 4 = [2.5, −1]
    assert torch.equal(new["w"], t(3.0, -0.5))
    assert torch.equal(new["frozen"], t(7.0))
    assert state == {}


def test_fedavg_keeps_the_globals_dtype() -> None:
    glob = {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}
    new, _ = agg("fedavg", glob, [up("a", 1, 0.5, 0.5)])
    assert new["w"].dtype == torch.bfloat16
    assert new["w"].tolist() == [1.5, 2.5]


def test_fedavg_rejects_an_empty_round() -> None:
    with pytest.raises(FedtuneError, match="no update"):
        agg("fedavg", {"w": t(0.0)}, [])


def test_mean_based_strategies_hold_at_most_two_updates() -> None:
    """Streaming: an update is released before the one after next is loaded."""
    live: set[int] = set()
    peak = 0

    def stream() -> Iterator[ClientUpdate]:
        nonlocal peak
        for i in range(12):
            u = ClientUpdate(f"c{i}", 1.0, {"w": torch.full((64,), float(i))})
            live.add(i)
            weakref.finalize(u, live.discard, i)
            peak = max(peak, len(live))
            yield u
            del u

    for name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        live.clear()
        peak = 0
        s = make_strategy(AggregationSpec(strategy=name))
        new, _ = s.aggregate({"w": torch.zeros(64)}, stream(), {})
        assert peak <= 2, name
        if name == "fedavg":
            assert torch.equal(new["w"], torch.full((64,), 5.5))


def test_fedavgm_momentum_by_hand() -> None:
    glob = {"w": t(0.0)}
    kw = {"server_momentum": 0.5, "server_learning_rate": 2.0}
    g1, s1 = agg("fedavgm", glob, [up("a", 1, 1.0)], **kw)
    # m = 1, w = 0 + 2·1
    assert torch.equal(g1["w"], t(2.0))
    g2, s2 = agg("fedavgm", g1, [up("a", 1, 4.0)], s1, **kw)
    # m = 0.5·1 + 4 = 4.5, w = 2 + 2·4.5
    assert torch.equal(s2["momentum/w"], t(4.5))
    assert torch.equal(g2["w"], t(11.0))


def adaptive_reference(kind: str, deltas: list[float], beta1: float, beta2: float, tau: float, lr: float):
    """Reddi et al. 2021, Algorithm 2, on one scalar coordinate in float64."""
    w, m, v = 0.0, 0.0, tau * tau
    for d in deltas:
        m = beta1 * m + (1 - beta1) * d
        if kind == "fedadam":
            v = beta2 * v + (1 - beta2) * d * d
        elif kind == "fedyogi":
            v = v - (1 - beta2) * d * d * math.copysign(1.0, v - d * d) if v != d * d else v
        else:
            v = v + d * d
        w = w + lr * m / (math.sqrt(v) + tau)
    return w, m, v


@pytest.mark.parametrize("kind", ["fedadam", "fedyogi", "fedadagrad"])
def test_server_optimizers_by_hand_with_a_restart(kind: str) -> None:
    kw = {"server_momentum": 0.9, "beta2": 0.99, "tau": 0.01, "server_learning_rate": 0.1}
    rounds = [[0.3, -0.1], [0.2, 0.4], [-0.5, 0.05]]
    glob: State = {"w": t(0.0, 0.0)}
    state: State = {}
    for r, deltas in enumerate(rounds):
        ups = [up("a", 1, deltas[0]), up("b", 1, deltas[1])]
        glob, state = agg(kind, glob, ups, state, **kw)
        if r == 1:  # the aggregator restarts: everything comes back from bytes
            glob, state = load_state(save_state(glob)), load_state(save_state(state))
    means = [(a + b) / 2 for a, b in rounds]
    w, m, v = adaptive_reference(kind, means, 0.9, 0.99, 0.01, 0.1)
    assert glob["w"][0].item() == pytest.approx(w, rel=1e-5)
    assert state["m/w"][0].item() == pytest.approx(m, rel=1e-5)
    assert state["v/w"][0].item() == pytest.approx(v, rel=1e-5)


@pytest.mark.parametrize("kind", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_restarted_aggregator_continues_bit_for_bit(kind: str) -> None:
    gen = torch.Generator().manual_seed(3)
    glob0: State = {"a": torch.randn(4, 8, generator=gen), "b": torch.randn(8, generator=gen)}
    rounds = [
        [
            ClientUpdate(c, float(1 + i), {k: torch.randn(v.shape, generator=gen) * 0.1 for k, v in glob0.items()})
            for i, c in enumerate("xyz")
        ]
        for _ in range(3)
    ]
    s = make_strategy(AggregationSpec(strategy=kind))

    def run(restart: bool) -> tuple[State, State]:
        glob, state = glob0, {}
        for ups in rounds:
            glob, state = s.aggregate(glob, ups, state)
            if restart:
                glob, state = load_state(save_state(glob)), load_state(save_state(state))
        return glob, state

    (ga, sa), (gb, sb) = run(False), run(True)
    assert all(torch.equal(ga[k], gb[k]) for k in ga)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_fedmedian_by_hand() -> None:
    ups = [up(c, 1, a, b) for c, a, b in [("a", 1, 0), ("b", 5, 0), ("c", 2, 1), ("d", 4, 1), ("e", 100, 9)]]
    new, _ = agg("fedmedian", {"w": t(10.0, 0.0)}, ups)
    assert torch.equal(new["w"], t(14.0, 1.0))
    new, _ = agg("fedmedian", {"w": t(0.0, 0.0)}, ups[:4])  # even count: mean of the middle two
    assert torch.equal(new["w"], t(3.0, 0.5))


def test_trimmedmean_by_hand() -> None:
    ups = [up(c, 1, a) for c, a in [("a", 1), ("b", 5), ("c", 2), ("d", 4), ("e", 100)]]
    new, _ = agg("trimmedmean", {"w": t(0.0)}, ups, trim_fraction=0.2)
    assert new["w"].item() == pytest.approx(11 / 3, abs=1e-6)  # (5 + 2 + 4) / 3
    new, _ = agg("trimmedmean", {"w": t(0.0)}, ups, trim_fraction=0.1)  # ⌊0.5⌋ = 0: plain mean
    assert new["w"].item() == pytest.approx(112 / 5, abs=1e-5)


def test_krum_and_multikrum_by_hand() -> None:
    # f = 1, K = 5: score = summed squared distance to the 2 nearest others.
    # 0: 1+4=5, 1: 1+1=2, 2: 1+1=2, 3: 1+4=5, 10: 49+64=113.
    ups = [up(c, 1, x) for c, x in [("a", 0), ("b", 1), ("c", 2), ("d", 3), ("e", 10)]]
    new, _ = agg("krum", {"w": t(0.0)}, ups, byzantine_clients=1)
    assert new["w"].item() == 1.0  # the tie 1 / 2 goes to the earlier update
    new, _ = agg("multikrum", {"w": t(0.0)}, ups, byzantine_clients=1)
    assert new["w"].item() == 1.5  # mean of 0, 1, 2, 3


def test_krum_needs_enough_clients() -> None:
    ups = [up(c, 1, 0.0) for c in "abcd"]
    with pytest.raises(FedtuneError, match="at least 5"):
        agg("krum", {"w": t(0.0)}, ups, byzantine_clients=1)


def test_bulyan_by_hand() -> None:
    # f = 1, n = 7: Krum picks 2, 3, 1, 4, 0 in turn (100 never); median of those 2; the 3 values
    # nearest to it are 1, 2, 3, so the coordinate becomes 2.
    ups = [up(f"c{i}", 1, x, -x) for i, x in enumerate([0, 1, 2, 3, 4, 5, 100])]
    new, _ = agg("bulyan", {"w": t(0.0, 0.0)}, ups, byzantine_clients=1)
    assert torch.equal(new["w"], t(2.0, -2.0))
