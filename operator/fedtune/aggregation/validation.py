"""Checks every update passes before it may touch the global adapter.

Each check returns the reason for rejection (one line, for the round summary) or None, so the
aggregator records a rejection and carries on without the update.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from fedtune.aggregation.base import State
from fedtune.tensors import single_threaded


def _norm(t: torch.Tensor) -> float:
    """A tensor's L2 norm, accumulated in float64: no overflow for any float32 input, and NaN or inf
    exactly when some value is not finite, so one pass serves both checks."""
    return float(torch.linalg.vector_norm(t, dtype=torch.float64))


@single_threaded()
def update_norm(delta: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm of the whole update, all tensors flattened together."""
    return math.sqrt(sum(_norm(v) ** 2 for v in delta.values()))


@single_threaded()
def all_finite(state: State) -> bool:
    """Whether every value is finite (a global must be, before it is committed)."""
    return all(math.isfinite(_norm(v)) for v in state.values())


def validate_update(
    delta: Mapping[str, torch.Tensor], trainable: State, max_norm: float | None, reveal: bool = True
) -> str | None:
    """Why the update must be rejected, or None if it is sound (see `validate`)."""
    return validate(delta, trainable, max_norm, reveal)[0]


@single_threaded()
def validate(
    delta: Mapping[str, torch.Tensor], trainable: State, max_norm: float | None, reveal: bool = True
) -> tuple[str | None, float]:
    """Why the update must be rejected (None if it is sound), and its L2 norm: one pass over its values
    serves the finite check, the bound and the norm a round records.

    `trainable` holds the global's tensors for the keys an update must carry, in their shapes. An
    update's tensors are floating point; decoding yields float32, so besides the global's own dtype
    float32 is accepted. `reveal: False` (under DP) keeps the update's own norm out of the reason.
    """
    missing = sorted(set(trainable) - set(delta))
    if missing:
        return f"missing key {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""), math.nan
    extra = sorted(set(delta) - set(trainable))
    if extra:
        return f"unexpected key {extra[0]}", math.nan
    sumsq = 0.0
    for k, v in delta.items():
        want = trainable[k]
        if tuple(v.shape) != tuple(want.shape):
            return f"{k}: shape {tuple(v.shape)}, expected {tuple(want.shape)}", math.nan
        if not v.is_floating_point() or v.dtype not in (want.dtype, torch.float32):
            return f"{k}: dtype {v.dtype}, expected {want.dtype}", math.nan
        n = _norm(v)
        if not math.isfinite(n):
            return f"{k}: non-finite values", math.nan
        sumsq += n**2
    norm = math.sqrt(sumsq)
    if max_norm is not None and not norm <= max_norm:
        return f"L2 norm {f'{norm:.4g} ' if reveal else ''}exceeds the bound {max_norm:.4g}", norm
    return None, norm
