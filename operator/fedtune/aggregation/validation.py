"""Checks every update passes before it may touch the global adapter."""

from __future__ import annotations

import math

import torch

from fedtune.aggregation.base import State


def update_norm(delta: State) -> float:
    """The L2 norm of the whole update, all tensors flattened together."""
    return math.sqrt(sum(float(torch.sum(v.to(torch.float64) ** 2)) for v in delta.values()))


def validate_update(delta: State, trainable: State, max_norm: float | None) -> str | None:
    """Why the update must be rejected, or None if it is sound.

    `trainable` holds the global's tensors for the keys an update must carry, in their shapes.
    """
    missing = sorted(set(trainable) - set(delta))
    if missing:
        return f"missing key {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
    extra = sorted(set(delta) - set(trainable))
    if extra:
        return f"unexpected key {extra[0]}"
    for k, v in delta.items():
        if tuple(v.shape) != tuple(trainable[k].shape):
            return f"{k}: shape {tuple(v.shape)}, expected {tuple(trainable[k].shape)}"
        if not v.is_floating_point():
            return f"{k}: dtype {v.dtype} is not floating point"
        if not bool(torch.isfinite(v).all()):
            return f"{k}: non-finite values"
    if max_norm is not None:
        norm = update_norm(delta)
        if norm > max_norm:
            return f"L2 norm {norm:.4g} exceeds maxUpdateNorm {max_norm:g}"
    return None
