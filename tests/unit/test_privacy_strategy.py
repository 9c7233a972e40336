"""Client-level DP as a strategy wrapper: the inner strategy steps on the noised mean of the clipped
updates, exactly as if that mean were its only update, with noise from the secure source."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from fedtune.aggregation import ClientUpdate, State, make_strategy
from fedtune.aggregation.fedavg import MeanStrategy
from fedtune.aggregation.validation import update_norm
from fedtune.api.spec import AggregationSpec, PrivacySpec
from fedtune.federation.private_strategy import PrivateStrategy
from fedtune.privacy import CLIP_NORM, ClientLevelDP, client_dp


def updates(seed: int = 0) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, scale in enumerate([0.1, 2.0, 0.5, 7.0]):  # some within the clip norm, some above
        delta = {"a": torch.randn(8, 4, generator=gen) * scale, "b": torch.randn(16, generator=gen) * scale}
        out.append(ClientUpdate(f"c{i}", 10.0 * (i + 1), delta, update_norm(delta)))
    return out


def seeded(seed: int) -> Callable[[torch.Size | tuple[int, ...]], torch.Tensor]:
    """Stands in for the secure source, so that two computations can draw the same noise."""
    gen = torch.Generator().manual_seed(seed)
    return lambda shape: torch.randn(shape, generator=gen)


def inner(name: str) -> MeanStrategy:
    s = make_strategy(AggregationSpec(strategy=name))
    assert isinstance(s, MeanStrategy)
    return s


@pytest.mark.parametrize("name", ["fedavg", "fedavgm", "fedadam"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_the_wrapper_is_the_noised_mean_handed_to_the_inner_strategy(
    name: str, adaptive: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Equal, bit for bit, to noising the mean first and aggregating it as the one update of the round."""
    dp = ClientLevelDP(PrivacySpec(enabled=True, clip_norm=1.0, noise_multiplier=0.8, adaptive_clipping=adaptive))
    glob: State = {"a": torch.ones(8, 4), "b": torch.zeros(16)}
    server: State = {CLIP_NORM: torch.tensor(1.5, dtype=torch.float64)} if adaptive else {}

    monkeypatch.setattr(client_dp, "secure_gaussian", seeded(7))
    got, got_server = PrivateStrategy(inner(name), dp).aggregate(glob, iter(updates()), server)
    monkeypatch.setattr(client_dp, "secure_gaussian", seeded(7))
    mean, server_next = dp.private_mean(((u.delta, update_norm(u.delta)) for u in updates()), server)
    want, want_server = inner(name).aggregate(glob, [ClientUpdate("mean", 1.0, mean)], server_next)

    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert got_server.keys() == want_server.keys() and all(
        torch.equal(got_server[k], want_server[k]) for k in want_server
    )
    assert (CLIP_NORM in got_server) == adaptive


def test_the_wrapper_adds_secure_noise_of_the_stated_scale() -> None:
    spec = PrivacySpec(enabled=True, clip_norm=0.5, noise_multiplier=2.0)
    zero = {"w": torch.zeros(100_000)}
    ups = [ClientUpdate(f"c{i}", 1.0, zero, 0.0) for i in range(4)]
    glob = {"w": torch.zeros(100_000)}
    wrapped = PrivateStrategy(inner("fedavg"), ClientLevelDP(spec))
    a, _ = wrapped.aggregate(glob, ups, {})
    b, _ = wrapped.aggregate(glob, ups, {})
    assert not torch.equal(a["w"], b["w"])  # fresh noise every time: from the OS, not from a seed
    # The noiseless result is zero: all that moved the global is noise of std z·C / n = 0.25.
    assert float(a["w"].std()) == pytest.approx(0.25, rel=0.02)


def test_a_missing_norm_is_computed_and_every_update_clipped_to_the_clip_norm() -> None:
    dp = ClientLevelDP(PrivacySpec(enabled=True, clip_norm=1.0, noise_multiplier=0.0))
    glob: State = {"a": torch.zeros(8, 4), "b": torch.zeros(16)}
    with_norms = updates()
    without = [ClientUpdate(u.client, u.weight, u.delta) for u in with_norms]
    wrapped = PrivateStrategy(inner("fedavg"), dp)
    a, _ = wrapped.aggregate(glob, with_norms, {})
    b, _ = wrapped.aggregate(glob, without, {})
    assert all(torch.equal(a[k], b[k]) for k in glob)
    # Without noise: the unweighted mean of the clipped updates, each of norm at most C.
    clipped = [{k: v * min(1.0, 1.0 / update_norm(u.delta)) for k, v in u.delta.items()} for u in with_norms]
    for k in glob:
        torch.testing.assert_close(a[k], sum(c[k] for c in clipped) / 4, rtol=1e-6, atol=1e-7)
