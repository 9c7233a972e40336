"""FedAvgM (Hsu et al. 2019): server momentum on the mean update.

m ← β·m + Δ̄,  w ← w + η·m, with β = serverMomentum and η = serverLearningRate. The momentum is kept
in the server state under `momentum/<key>`, so a restarted aggregator continues where it stopped.
"""

from __future__ import annotations

from fedtune.aggregation.base import State
from fedtune.aggregation.fedavg import MeanStrategy, apply_delta
from fedtune.tensors import single_threaded

PREFIX = "momentum/"


class FedAvgM(MeanStrategy):
    name = "fedavgm"

    @single_threaded()
    def step(self, global_state: State, mean: State, server_state: State) -> tuple[State, State]:
        beta = self.spec.server_momentum
        state = dict(server_state)
        for k, d in mean.items():
            prev = server_state.get(PREFIX + k)
            state[PREFIX + k] = d if prev is None else prev.mul(beta).add_(d)
        momentum = {k: state[PREFIX + k] for k in mean}
        return apply_delta(global_state, momentum, self.spec.server_learning_rate), state
