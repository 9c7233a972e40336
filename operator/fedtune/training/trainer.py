"""Local training and evaluation of the adapter on one client's data."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from fedtune.training.model import device


def evaluate(model: Any, batches: Iterable[dict[str, torch.Tensor]]) -> tuple[float, int]:
    """Mean per-token loss over the batches, and the number of scored tokens."""
    model.eval()
    total, tokens = 0.0, 0
    dev = device()
    with torch.no_grad():
        for batch in batches:
            batch = {k: v.to(dev) for k, v in batch.items()}
            n = int((batch["labels"][:, 1:] != -100).sum())
            if n == 0:
                continue
            total += float(model(**batch).loss) * n
            tokens += n
    return (total / tokens if tokens else float("nan")), tokens


def train(
    model: Any,
    batches: Iterable[dict[str, torch.Tensor]],
    learning_rate: float,
    weight_decay: float = 0.0,
    max_grad_norm: float | None = None,
    proximal_mu: float = 0.0,
) -> tuple[float, int]:
    """AdamW over the trainable adapter weights; with proximal_mu > 0, FedProx's term
    mu/2·||w − w_global||² keeps the client near the global it started from.

    Returns the mean training loss and the number of steps taken.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in params] if proximal_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)
    model.train()
    dev = device()
    losses = []
    for batch in batches:
        batch = {k: v.to(dev) for k, v in batch.items()}
        loss = model(**batch).loss
        losses.append(float(loss.detach()))
        if anchors:
            loss = loss + proximal_mu / 2 * sum(torch.sum((p - a) ** 2) for p, a in zip(params, anchors, strict=True))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        opt.step()
    return (sum(losses) / len(losses) if losses else float("nan")), len(losses)
