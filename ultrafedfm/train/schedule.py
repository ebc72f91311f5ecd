"""Learning-rate schedules (MAE, He et al. 2022): linear warm-up then half-cosine decay, or constant.

The rate is ``base_lr * batch_size / 256`` (:func:`effective_lr`). Centrally the trainer follows
it per optimizer step (:class:`WarmupCosineLr`, a callable ``step -> lr``; the step number is
the schedule's position, saved in checkpoints); federated, the server follows it across rounds
(:func:`round_learning_rate`) and each site trains its round at that constant rate
(:class:`ConstantLr`). Both decay along the same :func:`half_cosine`.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

_logger = logging.getLogger(__name__)

__all__ = ["ConstantLr", "WarmupCosineLr", "effective_lr", "half_cosine", "round_learning_rate"]


def effective_lr(base_lr: float, batch_size: int) -> float:
    """MAE's linear scaling rule: the peak rate for ``batch_size`` images is ``base_lr * batch_size / 256``."""
    return base_lr * batch_size / 256.0


def half_cosine(progress: float, *, peak_lr: float, min_lr: float = 0.0) -> float:
    """``min + (peak - min) * (1 + cos(pi * progress)) / 2`` for ``progress`` clamped to [0, 1]."""
    progress = min(1.0, max(0.0, progress))
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def round_learning_rate(
    round_index: int,
    *,
    base_lr: float,
    batch_size: int,
    warmup_rounds: int,
    total_rounds: int,
    min_lr: float = 0.0,
) -> float:
    """Learning rate for federated round ``round_index`` (0-based), constant within the round.

    The reference schedules per iteration with a fractional epoch; with one constant rate per
    round we take the schedule at the round's midpoint (``round_index + 0.5``), so round 0
    trains (a start-of-round value would be exactly 0) and the mean rate over the run matches.
    """
    if not 0 <= round_index < total_rounds:
        raise ValueError(f"round_index {round_index} outside 0..{total_rounds - 1}")
    peak = effective_lr(base_lr, batch_size)
    t = round_index + 0.5
    if t < warmup_rounds:
        return peak * t / warmup_rounds
    return half_cosine((t - warmup_rounds) / max(total_rounds - warmup_rounds, 1), peak_lr=peak, min_lr=min_lr)


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
        return half_cosine((step - self.warmup_steps) / decay_steps, peak_lr=self.peak_lr, min_lr=self.min_lr)


@dataclass(frozen=True)
class ConstantLr:
    """The same learning rate at every step (a federated server schedules it across rounds)."""

    lr: float

    def __post_init__(self) -> None:
        if not (self.lr >= 0.0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a finite number >= 0, got {self.lr}")

    def __call__(self, step: int) -> float:
        return self.lr
