"""Adaptive server optimizers (Reddi et al. 2021, "Adaptive Federated Optimization", Algorithm 2).

The mean client update Δ is a pseudo-gradient step. With β1 = serverMomentum, β2 = beta2,
τ = tau and η = serverLearningRate:

    m ← β1·m + (1 − β1)·Δ
    v ← second_moment(v, Δ²)            (Adagrad, Adam or Yogi; v starts at τ²)
    w ← w + η·m / (√v + τ)

m and v live in the server state (`m/<key>`, `v/<key>`); every operation is deterministic float32
arithmetic on tensors saved and loaded bit-exactly, so a restarted aggregator continues bit-for-bit.
"""

from __future__ import annotations

from abc import abstractmethod

import torch

from fedtune.aggregation.base import State
from fedtune.aggregation.fedavg import MeanStrategy, apply_delta
from fedtune.tensors import single_threaded


class FedOpt(MeanStrategy):
    """The shared step; subclasses say only how the second moment moves."""

    @abstractmethod
    def second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        """The new second-moment estimate from the old one and the squared pseudo-gradient."""

    @single_threaded()
    def step(self, global_state: State, mean: State, server_state: State) -> tuple[State, State]:
        beta1, tau = self.spec.server_momentum, self.spec.tau
        state = dict(server_state)
        direction: State = {}
        for k, d in mean.items():
            m = server_state.get(f"m/{k}", torch.zeros_like(d))
            v = server_state.get(f"v/{k}", torch.full_like(d, tau * tau))
            m = m.mul(beta1).add_(d, alpha=1.0 - beta1)
            v = self.second_moment(v, d * d)
            state[f"m/{k}"], state[f"v/{k}"] = m, v
            direction[k] = m / v.sqrt().add_(tau)
        return apply_delta(global_state, direction, self.spec.server_learning_rate), state
