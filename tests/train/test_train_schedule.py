"""Learning-rate schedules against hand-computed values."""
from __future__ import annotations

import math

import pytest

from ultrafedfm.train.schedule import ConstantLr, WarmupCosineLr


def test_warmup_then_cosine_hand_computed():
    s = WarmupCosineLr(peak_lr=1.0, total_steps=10, warmup_steps=4, min_lr=0.1)
    # Warm-up: 1/4, 2/4, 3/4, 4/4 of the peak.
    assert [s(i) for i in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    # Cosine over the 6 remaining steps: 0.1 + 0.9 * (1 + cos(pi * k / 6)) / 2.
    expected = [1.0, 0.1 + 0.45 * (1 + math.sqrt(3) / 2), 0.775, 0.55, 0.325, 0.1 + 0.45 * (1 - math.sqrt(3) / 2)]
    assert [s(i) for i in range(4, 10)] == pytest.approx(expected)
    assert s(10) == pytest.approx(0.1)  # past the end: the floor


def test_no_warmup_starts_at_peak():
    s = WarmupCosineLr(peak_lr=2.0, total_steps=4)
    # 2 * (1 + cos(pi * k / 4)) / 2 for k = 0..3
    assert [s(i) for i in range(4)] == pytest.approx([2.0, 1 + math.sqrt(2) / 2, 1.0, 1 - math.sqrt(2) / 2])


def test_constant():
    assert ConstantLr(3e-4)(0) == ConstantLr(3e-4)(10_000) == 3e-4


@pytest.mark.parametrize("kwargs", [
    {"peak_lr": 1.0, "total_steps": 0}, {"peak_lr": 1.0, "total_steps": 5, "warmup_steps": 6},
    {"peak_lr": 1.0, "total_steps": 5, "min_lr": 2.0},
])
def test_invalid_schedules_raise(kwargs):
    with pytest.raises(ValueError):
        WarmupCosineLr(**kwargs)
