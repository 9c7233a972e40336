"""The learning rate at each optimizer step of the whole run, so a schedule continues across rounds.

Rounds count from 0: local step i of round r is global step r × localSteps + i, of rounds × localSteps.
Round r is counted in rounds that trained: a failed round (global kept, round retried) does not advance it.
"""

from __future__ import annotations

import math

from fedtune.api.spec import LrSchedule, TrainingSpec


def lr_factor(step: int, total: int, warmup: int, schedule: LrSchedule) -> float:
    """Multiplier of the peak rate at global `step`: linear warm-up to 1 over `warmup` steps, then
    constant, or cosine down to 0 at step `total`."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == LrSchedule.CONSTANT:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def learning_rate(training: TrainingSpec, rounds: int, r: int, i: int) -> float:
    """The rate of round r's local step i."""
    total = rounds * training.local_steps
    step = r * training.local_steps + i
    return training.learning_rate * lr_factor(step, total, training.warmup_steps, training.lr_schedule)
