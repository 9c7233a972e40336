"""The one small interface every aggregation strategy implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedtune.api.spec import AggregationSpec

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """A validated, decoded update: delta = client's adapter after local training − the round's global."""

    client: str
    weight: float
    delta: State


class Strategy(ABC):
    """Turns the round's global and its client updates into the next global.

    `updates` may be a lazy iterator that loads each update from storage when reached, so mean-based
    strategies hold about two updates in memory however many clients there are. `server_state` carries
    what a strategy keeps between rounds (momentum, moments); it is persisted with each global.
    """

    name: str = ""

    def __init__(self, spec: AggregationSpec) -> None:
        self.spec = spec

    @abstractmethod
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        """The next global and the next server state."""
