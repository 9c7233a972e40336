"""AdamW's per-weight state as a flat tensor dict keyed by parameter name, to keep it between rounds.

Names, not positions, key the state, so a kept state can only land on the weight it was computed for;
anything that does not fit the live weights exactly is refused as a whole.
"""

from __future__ import annotations

from typing import Any

import torch

from fedtune.errors import FedtuneError

State = dict[str, torch.Tensor]
FIELDS = ("exp_avg", "exp_avg_sq", "step")


def export(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]]) -> State:
    """The optimizer's state of each named weight, on the CPU ({} before its first step)."""
    out: State = {}
    for name, param in named:
        state = optimizer.state.get(param)
        if state:
            out.update({f"{name}.{f}": torch.as_tensor(state[f]).detach().float().cpu() for f in FIELDS})
    return out


def restore(optimizer: torch.optim.Optimizer, named: list[tuple[str, torch.nn.Parameter]], kept: State) -> None:
    """Put a kept state back; FedtuneError (nothing changed) if it does not match the weights exactly."""
    expected = {f"{n}.{f}" for n, _ in named for f in FIELDS}
    if set(kept) != expected:
        extra = sorted(set(kept) ^ expected)
        raise FedtuneError(f"kept optimizer state does not match the adapter's weights ({extra[0]})")
    states: dict[Any, dict[str, torch.Tensor]] = {}
    for name, param in named:
        avg, sq, step = (kept[f"{name}.{f}"] for f in FIELDS)
        if avg.shape != param.shape or sq.shape != param.shape or step.numel() != 1:
            raise FedtuneError(f"kept optimizer state of {name} has the wrong shape")
        if not (torch.isfinite(avg).all() and torch.isfinite(sq).all() and bool((sq >= 0).all())):
            raise FedtuneError(f"kept optimizer state of {name} is not finite and non-negative")
        if not float(step) >= 1:
            raise FedtuneError(f"kept optimizer state of {name} has step {float(step)}")
        states[param] = {
            "step": step.reshape(()).float().clone(),
            "exp_avg": avg.to(param.device, param.dtype).clone(),
            "exp_avg_sq": sq.to(param.device, param.dtype).clone(),
        }
    optimizer.state.update(states)
