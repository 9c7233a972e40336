"""The one small interface every aggregation strategy implements, and helpers strategies share."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from fedtune.api.spec import AggregationSpec
from fedtune.errors import FedtuneError

State = dict[str, torch.Tensor]


@dataclass
class ClientUpdate:
    """A checked, decoded update: delta = client's adapter after local training − the round's global.

    `delta` may be lazy, reading each tensor from the aggregator's local disk when it is indexed and
    caching nothing: index each key once and keep the tensor while it is needed. Its tensors are only
    read, never written. `norm` is the delta's L2 norm where the check that accepted it computed it.
    """

    client: str
    weight: float
    delta: Mapping[str, torch.Tensor]
    norm: float | None = None


class Strategy(ABC):
    """Turns the round's global and its client updates into the next global.

    A `single_pass` strategy consumes `updates` once, in order: the aggregator then hands it a lazy
    iterator that reads the next updates from storage while the current one is added, so it holds a
    few updates however many clients there are. Any other strategy gets a list of updates whose deltas
    are lazy (see `ClientUpdate`), so working one tensor key at a time holds K tensors of that key,
    never K updates. `server_state` carries what a strategy keeps between rounds (momentum, moments);
    it is persisted with each global.
    """

    name: str = ""
    single_pass: bool = False

    def __init__(self, spec: AggregationSpec) -> None:
        self.spec = spec

    @abstractmethod
    def aggregate(
        self, global_state: State, updates: Iterable[ClientUpdate], server_state: State
    ) -> tuple[State, State]:
        """The next global and the next server state."""


def collect(updates: Iterable[ClientUpdate], least: int, why: str) -> list[ClientUpdate]:
    """All updates together, as rank- and distance-based strategies need them (their deltas may be lazy)."""
    out = list(updates)
    if len(out) < least:
        raise FedtuneError(f"aggregation: {why} needs at least {least} updates, got {len(out)}")
    return out
