"""DP-FedAvg (McMahan et al. 2018) with optional adaptive clipping (Andrew et al. 2019).

Per round: each accepted update is scaled down to L2 norm ≤ C; the clipped updates are summed with
weight 1 each (an example-count weight would let one client's influence exceed C); Gaussian noise of
standard deviation z·C is added to the sum, which is divided by the number of updates. The result is
the mean update every mean-based strategy (FedAvg, FedAvgM, FedAdam, ...) then applies.

Adaptive clipping moves C geometrically towards the γ-quantile of the update norms:
C ← C·exp(−η·(b̄ − γ)), b̄ the noised share of updates with norm ≤ C, noised with σ_b = max(m/20, z)
on the count (m updates; m/20 as the paper suggests). To keep the accountant's z the total, the
update noise rises to z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2) (the paper's Theorem 1); σ_b ≥ z bounds z_Δ by 1.16·z.

The noise comes from the operating system's secure random source (os.urandom) inside the aggregator:
it is never derived from the spec and never written anywhere, so knowing the seed and every released
global does not let anyone subtract it. A restarted aggregator draws fresh noise for a round it had not
committed; only committed outputs are ever released.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping

import torch

from fedtune.api.spec import PrivacySpec
from fedtune.errors import FedtuneError
from fedtune.privacy.accountant import epsilon
from fedtune.tensors import single_threaded

State = dict[str, torch.Tensor]
CLIP_NORM = "dp/clip_norm"


def secure_gaussian(shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Standard normal float32 values from os.urandom by the Box-Muller transform.

    torch's own generators are seeded and predictable; 53-bit uniforms from the OS's CSPRNG are not.
    """
    n = math.prod(shape)
    pairs = (n + 1) // 2
    bits = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)
    u = (((bits >> 11) & (2**53 - 1)).to(torch.float64) + 1.0) * 2.0**-53  # (0, 1]: log(u) is finite
    radius = torch.sqrt(-2.0 * torch.log(u[:pairs]))
    angle = (2.0 * math.pi) * u[pairs:]
    z = torch.cat((radius * torch.cos(angle), radius * torch.sin(angle)))[:n]
    return z.to(torch.float32).reshape(shape)


def clip(delta: Mapping[str, torch.Tensor], norm: float, clip_norm: float) -> Mapping[str, torch.Tensor]:
    """The update scaled to L2 norm at most clip_norm (unchanged if already within).

    Scaled in float64: a float32 factor for a huge norm would be subnormal, or zero, and lose the update.
    """
    if norm <= clip_norm:
        return delta
    factor = clip_norm / norm
    return {k: (v.double() * factor).to(v.dtype) for k, v in delta.items()}


def count_stddev(updates: int, noise_multiplier: float) -> float:
    """σ_b, the noise on the count of unclipped updates (0 without noise)."""
    if noise_multiplier <= 0:
        return 0.0
    return max(updates / 20, noise_multiplier)


def update_noise_multiplier(noise_multiplier: float, adaptive: bool, updates: int) -> float:
    """z_Δ: the noise on the update sum that leaves z in total once the count is noised too."""
    if not adaptive or noise_multiplier <= 0:
        return noise_multiplier
    sb = count_stddev(updates, noise_multiplier)
    return float((noise_multiplier**-2 - (2 * sb) ** -2) ** -0.5)


def next_clip_norm(clip_norm: float, norms: list[float], spec: PrivacySpec) -> float:
    """One geometric step of the clip norm towards the target quantile of `norms`."""
    if not norms:
        return clip_norm
    below = float(sum(n <= clip_norm for n in norms))
    sb = count_stddev(len(norms), spec.noise_multiplier)
    if sb > 0:
        below += float(secure_gaussian((1,))) * sb
    share = below / len(norms)
    return clip_norm * math.exp(-spec.clip_learning_rate * (share - spec.target_quantile))


class ClientLevelDP:
    """Clipping, noising and accounting for one run."""

    def __init__(self, spec: PrivacySpec) -> None:
        self.spec = spec

    def clip_norm(self, server_state: State) -> float:
        """The clip norm in force: the spec's, or the adaptive one carried in the server state."""
        if self.spec.adaptive_clipping and CLIP_NORM in server_state:
            return float(server_state[CLIP_NORM])
        return self.spec.clip_norm

    @single_threaded()
    def private_mean(
        self, updates: Iterable[tuple[Mapping[str, torch.Tensor], float]], server_state: State
    ) -> tuple[State, State]:
        """The noised mean of the clipped updates of one round, and the server state for the next round.

        `updates` yields (delta, its L2 norm) and is consumed once, one update at a time.
        """
        c = self.clip_norm(server_state)
        acc: State = {}
        norms: list[float] = []
        for delta, norm in updates:
            for k, v in clip(delta, norm, c).items():
                if k in acc:
                    acc[k].add_(v)
                else:
                    acc[k] = v.to(torch.float32, copy=True)
            norms.append(norm)
        if not norms:
            raise FedtuneError("privacy: no update to average")
        z = update_noise_multiplier(self.spec.noise_multiplier, self.spec.adaptive_clipping, len(norms))
        for k in sorted(acc):
            v = acc[k]
            if z > 0:
                v.add_(secure_gaussian(v.shape), alpha=z * c)
            v.div_(len(norms))
        state = dict(server_state)
        if self.spec.adaptive_clipping:
            nxt = next_clip_norm(c, norms, self.spec)
            state[CLIP_NORM] = torch.tensor(nxt, dtype=torch.float64)
        return acc, state

    def client_epsilon(self, rounds_taken_part: int) -> float:
        """ε a client has spent after taking part in that many rounds, at the spec's δ.

        Who is selected is written in every global marker, so no client can count on the others not
        knowing it took part: sampling does not amplify privacy here, and each round a client takes part
        in costs it one unamplified Gaussian mechanism (sampling rate 1).
        """
        return epsilon(self.spec.noise_multiplier, 1.0, rounds_taken_part, self.spec.delta)

    def within_budget(self, rounds_taken_part: int) -> bool:
        """Whether a client that took part in that many rounds stays within targetEpsilon (no target: yes)."""
        target = self.spec.target_epsilon
        return target is None or self.client_epsilon(rounds_taken_part) <= target
