"""The one small interface every aggregation strategy implements, and helpers strategies share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fedtune.api.spec import AggregationSpec
from fedtune.errors import FedtuneError

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


def collect(updates: Iterable[ClientUpdate], least: int, why: str) -> list[ClientUpdate]:
    """All updates in memory, as rank- and distance-based strategies need them together."""
    out = list(updates)
    if len(out) < least:
        raise FedtuneError(f"aggregation: {why} needs at least {least} updates, got {len(out)}")
    return out
