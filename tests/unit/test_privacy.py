"""Client-level DP: clipping, secret noise, adaptive clipping, and epsilon against independent accountants."""

from __future__ import annotations

import math

import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.analysis.rdp import compute_rdp, get_privacy_spent

from fedtune.api.spec import PrivacySpec
from fedtune.privacy import CLIP_NORM, ClientLevelDP, clip, epsilon, next_clip_norm
from fedtune.privacy.client_dp import secure_gaussian, update_noise_multiplier


def norm(state: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float((v.double() ** 2).sum()) for v in state.values()))


def test_clip_scales_only_updates_above_the_norm() -> None:
    big = {"a": torch.full((4,), 3.0), "b": torch.full((2,), 4.0)}
    small = {"a": torch.full((4,), 0.1)}
    clipped = clip(big, norm(big), 2.0)
    assert norm(clipped) == pytest.approx(2.0, rel=1e-6)
    assert torch.allclose(clipped["a"] / clipped["b"][0], big["a"] / big["b"][0])  # direction kept
    assert clip(small, norm(small), 2.0) is small


def test_clip_keeps_a_huge_update_instead_of_flushing_it_to_zero() -> None:
    # Norm 2e38 with clip norm 1e-8: the factor 5e-47 is below float32's smallest subnormal, so scaling in
    # float32 flushes the update to zero.
    huge = {"a": torch.tensor([1.2e38, 1.6e38])}
    clipped = clip(huge, norm(huge), 1e-8)
    assert clipped["a"].dtype == torch.float32
    assert torch.allclose(clipped["a"], torch.tensor([6e-9, 8e-9]), rtol=1e-6)


def test_private_mean_without_noise_is_the_uniform_mean_of_clipped_updates() -> None:
    dp = ClientLevelDP(PrivacySpec(enabled=True, clip_norm=1.0, noise_multiplier=0.0))
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.0, 0.5])}]
    mean, state = dp.private_mean(((u, norm(u)) for u in ups), {})
    # [3, 4] has norm 5 → [0.6, 0.8]; mean with [0, 0.5]
    assert torch.allclose(mean["w"], torch.tensor([0.3, 0.65]))
    assert CLIP_NORM not in state


def test_noise_has_the_stated_scale_and_is_never_the_same_twice() -> None:
    """Noise comes from the OS's secure source: the same spec, seed and round give different noise."""
    spec = PrivacySpec(enabled=True, clip_norm=0.5, noise_multiplier=2.0)
    dp = ClientLevelDP(spec)
    zero = {"w": torch.zeros(200_000)}
    ups = [(zero, 0.0)] * 4
    a, _ = dp.private_mean(iter(ups), {})
    b, _ = dp.private_mean(iter(ups), {})
    assert not torch.equal(a["w"], b["w"])  # a restarted aggregator draws fresh noise
    # std on the sum is z·C = 1.0; on the mean of 4 it is 0.25
    for noised in (a, b):
        assert float(noised["w"].std()) == pytest.approx(0.25, rel=0.01)
        assert abs(float(noised["w"].mean())) < 0.005
    # Gaussian, not merely the right variance: the share within one sigma is 68.3%.
    within = float((a["w"].abs() <= 0.25).float().mean())
    assert within == pytest.approx(0.6827, abs=0.005)


def test_secure_gaussian_depends_on_no_seed() -> None:
    torch.manual_seed(0)
    first = secure_gaussian((1000,))
    torch.manual_seed(0)
    assert not torch.equal(first, secure_gaussian((1000,)))
    assert secure_gaussian((3, 5)).shape == (3, 5) and secure_gaussian((7,)).dtype == torch.float32


@pytest.mark.parametrize("quantile", [0.3, 0.5, 0.9])
@pytest.mark.parametrize("noise", [0.0, 1.0])
def test_adaptive_clipping_converges_to_the_target_quantile(quantile: float, noise: float) -> None:
    """Norms ~ lognormal(0, 0.5): the q-quantile is exp(0.5·Φ⁻¹(q)); the clip norm must settle there."""
    spec = PrivacySpec(
        enabled=True, clip_norm=0.1, adaptive_clipping=True, target_quantile=quantile, noise_multiplier=noise
    )
    gen = torch.Generator().manual_seed(11)
    c, trace = 0.1, []
    for _ in range(600):
        norms = torch.exp(0.5 * torch.randn(100, generator=gen)).tolist()
        c = next_clip_norm(c, norms, spec)
        trace.append(c)
    true = math.exp(0.5 * math.sqrt(2) * torch.special.erfinv(torch.tensor(2 * quantile - 1)).item())
    settled = sum(trace[-200:]) / 200
    assert settled == pytest.approx(true, rel=0.05)


def test_adaptive_clip_norm_is_carried_in_the_server_state() -> None:
    spec = PrivacySpec(enabled=True, clip_norm=1.0, adaptive_clipping=True, noise_multiplier=0.0)
    dp = ClientLevelDP(spec)
    ups = [({"w": torch.full((1,), 10.0)}, 10.0)] * 3  # all above: the clip norm must grow
    _, state = dp.private_mean(iter(ups), {})
    grown = dp.clip_norm(state)
    assert grown == pytest.approx(math.exp(0.2 * 0.5))
    assert state[CLIP_NORM].dim() == 0


def test_adaptive_clipping_raises_update_noise_to_keep_the_total() -> None:
    z = update_noise_multiplier(1.0, adaptive=True, updates=10)  # σ_b = max(0.5, 1) = 1
    assert z == pytest.approx((1 - 0.25) ** -0.5)
    assert 1.0 / z**2 + 1.0 / (2 * 1.0) ** 2 == pytest.approx(1.0)  # Theorem 1 of Andrew et al.
    assert update_noise_multiplier(1.0, adaptive=False, updates=10) == 1.0


@pytest.mark.parametrize(
    ("z", "q", "rounds", "delta"), [(1.1, 0.01, 1000, 1e-5), (0.8, 1.0, 20, 1e-6), (5.0, 0.3, 7, 1e-5)]
)
def test_epsilon_equals_the_librarys_own_computation(z: float, q: float, rounds: int, delta: float) -> None:
    acc = RDPAccountant()
    for _ in range(rounds):
        acc.step(noise_multiplier=z, sample_rate=q)
    assert epsilon(z, q, rounds, delta) == acc.get_epsilon(delta)
    alphas = RDPAccountant.DEFAULT_ALPHAS
    eps, _ = get_privacy_spent(
        orders=alphas, rdp=compute_rdp(q=q, noise_multiplier=z, steps=rounds, orders=alphas), delta=delta
    )
    assert epsilon(z, q, rounds, delta) == pytest.approx(eps, rel=1e-12)


def test_epsilon_edges_and_budget() -> None:
    assert epsilon(1.0, 0.5, 0, 1e-5) == 0.0
    assert epsilon(0.0, 0.5, 3, 1e-5) == math.inf
    dp = ClientLevelDP(PrivacySpec(enabled=True, noise_multiplier=1.0, target_epsilon=5.0))
    eps = [dp.client_epsilon(r) for r in range(1, 30)]
    assert eps == sorted(eps)
    last_ok = max(r for r in range(1, 30) if dp.within_budget(r))
    assert dp.client_epsilon(last_ok) <= 5.0 < dp.client_epsilon(last_ok + 1)


@pytest.mark.parametrize(("z", "taken_part", "delta"), [(1.0, 10, 1e-5), (0.7, 3, 1e-6), (4.0, 100, 1e-5)])
def test_per_client_epsilon_matches_an_independent_accountant(z: float, taken_part: int, delta: float) -> None:
    """A client's epsilon: the unamplified Gaussian mechanism composed over the rounds it took part in,
    as Google's dp-accounting computes it (a different implementation of the same RDP analysis)."""
    from dp_accounting import GaussianDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    acc = RdpAccountant()
    acc.compose(SelfComposedDpEvent(GaussianDpEvent(z), taken_part))
    dp = ClientLevelDP(PrivacySpec(enabled=True, noise_multiplier=z, delta=delta))
    assert dp.client_epsilon(taken_part) == pytest.approx(acc.get_epsilon(delta), rel=0.02)


def test_public_selection_is_accounted_without_amplification() -> None:
    """100 clients, 10 a round, z = 1, 100 rounds: amplification by sampling would claim about 7.9; a
    typical client takes part in 10 rounds and, its selection being public, has spent about 19."""
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, SelfComposedDpEvent
    from dp_accounting.rdp import RdpAccountant

    sampled = RdpAccountant()
    sampled.compose(SelfComposedDpEvent(PoissonSampledDpEvent(0.1, GaussianDpEvent(1.0)), 100))
    assert epsilon(1.0, 0.1, 100, 1e-5) == pytest.approx(sampled.get_epsilon(1e-5), rel=0.02)
    dp = ClientLevelDP(PrivacySpec(enabled=True, noise_multiplier=1.0, delta=1e-5))
    assert dp.client_epsilon(10) == pytest.approx(19.05, abs=0.05)
    assert dp.client_epsilon(10) > 2 * epsilon(1.0, 0.1, 100, 1e-5)
