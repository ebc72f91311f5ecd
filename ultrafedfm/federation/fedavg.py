"""Federated averaging of weight deltas and the round-level learning-rate schedule (no FLARE).

FedAvg as in McMahan et al. 2017 and the UltraFedFM reference: each site trains from the
global weights and returns ``delta = w_local - w_global`` with its number of training images;
the server adds the sample-weighted mean of the deltas to the global weights. (The learning
rate across rounds is ``ultrafedfm.train.schedule.round_learning_rate``.)

Everything here works on ``dict[str, numpy.ndarray]`` so that the server side (and the
secure-aggregation sum that will replace the plain sum) needs no torch.
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import numpy as np

_logger = logging.getLogger(__name__)

__all__ = ["apply_delta", "weighted_mean_delta"]


def weighted_mean_delta(
    deltas: Sequence[Mapping[str, np.ndarray]], *, weights: Sequence[float]
) -> dict[str, np.ndarray]:
    """Sample-weighted mean of per-site deltas: ``sum_k w_k * delta_k / sum_k w_k``.

    Args:
        deltas: one mapping ``name -> array`` per site, all with the same keys and shapes.
        weights: one positive weight per site (its number of training samples).

    Sums are accumulated in float64 so the result does not depend on the order of sites
    beyond float32 rounding of the final value.
    """
    if len(deltas) != len(weights) or not deltas:
        raise ValueError(f"need one weight per delta and at least one delta, got {len(deltas)} and {len(weights)}")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights (sample counts) must be positive, got {list(weights)}")
    keys = set(deltas[0])
    for i, delta in enumerate(deltas[1:], start=1):
        if set(delta) != keys:
            missing = sorted(keys ^ set(delta))[:3]
            raise ValueError(f"delta {i} has different parameter names than delta 0 (e.g. {missing})")
    total = float(sum(weights))
    mean = {}
    for name in deltas[0]:
        acc = np.zeros(np.shape(deltas[0][name]), dtype=np.float64)
        for delta, weight in zip(deltas, weights):
            acc += np.asarray(delta[name], dtype=np.float64) * (float(weight) / total)
        mean[name] = acc.astype(np.asarray(deltas[0][name]).dtype, copy=False)
    return mean


def apply_delta(params: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``params + delta`` for every entry of ``params`` (entries missing from ``delta`` are kept)."""
    unknown = sorted(set(delta) - set(params))
    if unknown:
        raise ValueError(f"delta has parameters the global model lacks: {unknown[:3]}")
    out = {}
    for name, value in params.items():
        value = np.asarray(value)
        if name in delta:
            out[name] = (value + np.asarray(delta[name], dtype=value.dtype)).astype(value.dtype, copy=False)
        else:
            out[name] = value.copy()
    return out
