"""Aggregation strategies behind one interface, and the registry that picks one by name."""

from __future__ import annotations

from fedtune.aggregation.base import ClientUpdate, State, Strategy
from fedtune.aggregation.fedavg import FedAvg
from fedtune.api.spec import AggregationSpec
from fedtune.errors import FedtuneError

STRATEGIES: dict[str, type[Strategy]] = {s.name: s for s in (FedAvg,)}


def make_strategy(spec: AggregationSpec) -> Strategy:
    """The strategy spec.aggregation.strategy names."""
    try:
        return STRATEGIES[str(spec.strategy)](spec)
    except KeyError:
        raise FedtuneError(
            f"spec.aggregation.strategy: {spec.strategy!r} is not available (have: {', '.join(STRATEGIES)})"
        ) from None


__all__ = ["STRATEGIES", "ClientUpdate", "State", "Strategy", "make_strategy"]
