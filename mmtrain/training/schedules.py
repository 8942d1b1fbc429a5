"""Learning-rate schedules as ``LambdaLR`` factories (config: ``_partial_: true``; the recipe passes the optimizer).

``warmup_cosine``: the multiplier rises linearly, (s+1)/(warmup+1) at step s, to 1 over ``num_warmup_steps``, then
follows half a cosine from 1 down to ``min_lr_ratio`` at ``num_training_steps`` (and stays there).
"""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from mmtrain.errors import ConfigError


class WarmupCosine:
    """The multiplier ``f(step)`` of :func:`warmup_cosine` (a class, so it is picklable and printable)."""

    def __init__(self, num_warmup_steps: int, num_training_steps: int, min_lr_ratio: float = 0.0) -> None:
        self.num_warmup_steps = num_warmup_steps
        self.num_training_steps = num_training_steps
        self.min_lr_ratio = min_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.num_warmup_steps:
            return (step + 1) / (self.num_warmup_steps + 1)
        decay_steps = max(1, self.num_training_steps - self.num_warmup_steps)
        progress = min(1.0, (step - self.num_warmup_steps) / decay_steps)
        cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1.0 - self.min_lr_ratio) * cosine


def warmup_cosine(optimizer: torch.optim.Optimizer, num_training_steps: int, num_warmup_steps: int = 0,
                  warmup_ratio: float | None = None, min_lr_ratio: float = 0.0, last_epoch: int = -1) -> LambdaLR:
    """Linear warmup then cosine decay.

    Args:
        optimizer: the optimizer whose learning rates are scaled.
        num_training_steps: total optimizer steps (the recipe passes ``max_steps``).
        num_warmup_steps: warmup length in steps; ``warmup_ratio`` (fraction of the run) overrides it if set.
        min_lr_ratio: final learning rate as a fraction of the peak.
    """
    if num_training_steps < 1:
        raise ConfigError(f"lr_scheduler.num_training_steps: must be >= 1, got {num_training_steps}")
    if warmup_ratio is not None:
        if not 0.0 <= warmup_ratio < 1.0:
            raise ConfigError(f"lr_scheduler.warmup_ratio: must be in [0, 1), got {warmup_ratio}")
        num_warmup_steps = int(round(warmup_ratio * num_training_steps))
    if num_warmup_steps < 0:
        raise ConfigError(f"lr_scheduler.num_warmup_steps: must be >= 0, got {num_warmup_steps}")
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ConfigError(f"lr_scheduler.min_lr_ratio: must be in [0, 1], got {min_lr_ratio}")
    return LambdaLR(optimizer, WarmupCosine(num_warmup_steps, num_training_steps, min_lr_ratio), last_epoch)
