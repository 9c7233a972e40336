"""Local training and evaluation of the adapter on one client's data.

A step's loss is the sum of its tokens' losses over the number of scored tokens in the step's whole
batch: all micro-batches, on all ranks. So k micro-batches of b examples make the same step as one
batch of k·b, and N ranks make the same step as one process.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from fedtune.errors import FedtuneError
from fedtune.training import moments
from fedtune.training.distributed import Group, unwrap
from fedtune.training.model import device

log = logging.getLogger("fedtune.client")

Batch = dict[str, torch.Tensor]
IGNORE = -100


@dataclass(frozen=True)
class Options:
    """How one round of local training steps: `rate(i)` is the learning rate of local step i."""

    rate: Callable[[int], float]
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    proximal_mu: float = 0.0  # FedProx: mu/2·||w − w_global||² keeps the client near the global
    autocast: torch.dtype | None = None  # the half-precision base's dtype on CUDA
    group: Group = field(default_factory=Group)


@dataclass(frozen=True)
class Trained:
    loss: float
    steps: int
    moments: moments.State  # AdamW's state after the last step, keyed by weight name
    tokens: int  # input tokens (not padding) the steps' forward passes read, all ranks together
    step_seconds: tuple[float, ...]  # wall time of each optimizer step


def autocast_dtype(base: torch.dtype) -> torch.dtype | None:
    """Mixed precision for a bfloat16/float16 base on CUDA; a CPU runs in the weights' own dtype."""
    return base if torch.cuda.is_available() and base in (torch.bfloat16, torch.float16) else None


def enable_checkpointing(model: Any) -> None:
    """Recompute activations in the backward pass; the frozen embeddings' output must then carry grad."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()


def _precision(dtype: torch.dtype | None) -> AbstractContextManager[Any]:
    return torch.autocast(device_type="cuda", dtype=dtype) if dtype is not None else nullcontext()


def scored(batch: Batch) -> int:
    """Tokens that carry a loss: labels are shifted by one, so the first position never does."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def token_loss(model: Any, batch: Batch, dtype: torch.dtype | None) -> torch.Tensor:
    """The sum of next-token losses over the batch's scored tokens, in float32."""
    dev = device()
    with _precision(dtype):
        logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
    # Prompt tuning puts its virtual tokens' logits first: score only the input's positions.
    logits = logits[:, -batch["input_ids"].shape[1] :]
    labels = batch["labels"].to(dev)[:, 1:]
    flat = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    return F.cross_entropy(flat, labels.reshape(-1), ignore_index=IGNORE, reduction="sum")


def evaluate(
    model: Any, batches: Iterable[Batch], dtype: torch.dtype | None = None, group: Group | None = None
) -> tuple[float, int]:
    """Mean per-token loss over the batches, and the number of scored tokens.

    With several ranks each scores every world-th batch and the sums are combined.
    """
    group = group or Group()
    model = unwrap(model)
    model.eval()
    total, tokens = 0.0, 0
    with torch.no_grad():
        for i, batch in enumerate(batches):
            n = scored(batch)
            if i % group.world != group.rank or n == 0:
                continue
            total += float(token_loss(model, batch, dtype))
            tokens += n
    total, summed = group.all_sum([total, float(tokens)])
    return (total / summed if summed else float("nan")), int(summed)


def train(
    model: Any,
    steps: Iterable[list[Batch]],
    options: Options,
    kept: moments.State | None = None,
) -> Trained:
    """AdamW over the trainable adapter weights, one optimizer step per list of micro-batches.

    `kept` is AdamW's state from this client's previous round (restored as is); `model` may be
    wrapped for several ranks, each passing its share of every micro-batch.
    """
    o, group = options, options.group
    named = [(n, p) for n, p in unwrap(model).named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    anchors = [p.detach().clone() for p in params] if o.proximal_mu > 0 else []
    opt = torch.optim.AdamW(params, lr=o.rate(0), weight_decay=o.weight_decay)
    if kept:
        try:
            moments.restore(opt, named, kept)
        except FedtuneError as e:
            log.warning("the kept optimizer state does not fit, AdamW starts afresh: %s", e)
    # A float16 forward's small gradients underflow: scale the loss up, and the gradients back before use.
    scaler = torch.amp.GradScaler("cuda", enabled=o.autocast == torch.float16)
    model.train()
    if torch.cuda.is_available():  # the peak the client reports is this round's training, not its loading
        torch.cuda.reset_peak_memory_stats()
    losses, seconds, seen = [], [], 0
    started = time.perf_counter()
    for i, micro in enumerate(steps):
        seen += sum(int(b["attention_mask"].sum()) for b in micro)
        (tokens,) = group.all_sum([float(sum(scored(b) for b in micro))])
        # DDP averages gradients over ranks; scaling by the world size makes that average the global sum.
        scale = group.world / max(tokens, 1.0)
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for j, batch in enumerate(micro):
            with group.accumulating(model, last=j == len(micro) - 1):
                loss = token_loss(model, batch, o.autocast)
                scaler.scale(loss * scale).backward()  # type: ignore[no-untyped-call]
            total += float(loss.detach())
        (total,) = group.all_sum([total])
        losses.append(total / max(tokens, 1.0))
        scaler.unscale_(opt)
        if anchors:  # FedProx's gradient mu·(w − w_global), once per step whatever the ranks
            for p, a in zip(params, anchors, strict=True):
                p.grad = torch.zeros_like(p) if p.grad is None else p.grad
                p.grad.add_(p.detach() - a, alpha=o.proximal_mu)
        if o.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(params, o.max_grad_norm)
        for g in opt.param_groups:
            g["lr"] = o.rate(i)
        scaler.step(opt)
        scaler.update()
        # Reading a loss waits for the work queued before it (the backward pass too): summed over the steps,
        # these times cover the GPU's work, not just the launches.
        seconds.append(time.perf_counter() - started)
        started = time.perf_counter()
    (read,) = group.all_sum([float(seen)])
    mean = sum(losses) / len(losses) if losses else float("nan")
    return Trained(mean, len(losses), moments.export(opt, named), int(read), tuple(seconds))
