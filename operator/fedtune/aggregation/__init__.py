"""Aggregation strategies behind one interface, and the registry that picks one by name."""

from __future__ import annotations

from fedtune.aggregation.base import ClientUpdate, State, Strategy
from fedtune.aggregation.bulyan import Bulyan
from fedtune.aggregation.fedadagrad import FedAdagrad
from fedtune.aggregation.fedadam import FedAdam
from fedtune.aggregation.fedavg import FedAvg
from fedtune.aggregation.fedavgm import FedAvgM
from fedtune.aggregation.fedmedian import FedMedian
from fedtune.aggregation.fedprox import FedProx
from fedtune.aggregation.fedyogi import FedYogi
from fedtune.aggregation.krum import Krum
from fedtune.aggregation.multikrum import MultiKrum
from fedtune.aggregation.trimmedmean import TrimmedMean
from fedtune.api.spec import AggregationSpec
from fedtune.errors import FedtuneError

STRATEGIES: dict[str, type[Strategy]] = {
    s.name: s
    for s in (
        FedAvg,
        FedAvgM,
        FedProx,
        FedAdam,
        FedYogi,
        FedAdagrad,
        FedMedian,
        TrimmedMean,
        Krum,
        MultiKrum,
        Bulyan,
    )
}


def make_strategy(spec: AggregationSpec) -> Strategy:
    """The strategy spec.aggregation.strategy names."""
    try:
        return STRATEGIES[str(spec.strategy)](spec)
    except KeyError:
        raise FedtuneError(
            f"spec.aggregation.strategy: {spec.strategy!r} is not available (have: {', '.join(STRATEGIES)})"
        ) from None


__all__ = ["STRATEGIES", "ClientUpdate", "State", "Strategy", "make_strategy"]
