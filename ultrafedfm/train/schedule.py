"""Learning-rate schedules, per optimizer step: linear warm-up then half-cosine decay (MAE), or constant.

A schedule is a callable ``step -> lr`` (``step`` counts from 0 within one training run).
The trainer sets the optimizer's learning rate from it before every step, so the schedule's
position is just the step number (saved in checkpoints).
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

_logger = logging.getLogger(__name__)

__all__ = ["ConstantLr", "WarmupCosineLr"]


@dataclass(frozen=True)
class WarmupCosineLr:
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then cosine decay towards ``min_lr``.

    ``lr(s) = peak * (s + 1) / warmup`` for ``s < warmup`` (the first step already learns), then
    ``min + (peak - min) * (1 + cos(pi * (s - warmup) / (total - warmup))) / 2``.
    """

    peak_lr: float
    total_steps: int
    warmup_steps: int = 0
    min_lr: float = 0.0

    def __post_init__(self) -> None:
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")
        if not 0 <= self.warmup_steps <= self.total_steps:
            raise ValueError(f"warmup_steps must lie in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
        if not 0.0 <= self.min_lr <= self.peak_lr:
            raise ValueError(f"need 0 <= min_lr <= peak_lr, got min_lr={self.min_lr}, peak_lr={self.peak_lr}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.peak_lr * (step + 1) / self.warmup_steps
        decay_steps = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass(frozen=True)
class ConstantLr:
    """The same learning rate at every step (a federated server schedules it across rounds)."""

    lr: float

    def __post_init__(self) -> None:
        if not (self.lr >= 0.0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")

    def __call__(self, step: int) -> float:
        return self.lr
