"""A site's round figures travel inside the mask: the server learns only their sums.

The masked vector of a site is ``q(w·Δ) ‖ tail`` with four tail slots (``w`` = FedAvg weight /
``max_weight`` ≤ 1):

    slot 0  q(w)                                   fixed point, like the delta
    slot 1  q(w · clip(loss, 0, max_loss) / max_loss)   fixed point, in [0, 1]
    slot 2  steps                                  exact integer (local optimiser steps)
    slot 3  num_samples                            exact integer (training images)

After unmasking, :func:`decode_figures` gives the weighted mean loss ``Σ w·loss / Σ w``, the
total steps and the total image count -- aggregates only. Training time is not sent at all.

Overflow: slots 0 and 1 are at most ``2^f + 1`` in magnitude, which the delta's bound
``n · (max(C, 1) · 2^f + 1) < 2^(b-1)`` already covers. The integer slots sum without wrapping
when each site's value is at most :func:`max_count` = ``(2^(b-1) - 1) // max_sites``
(67 108 863 for the 32-bit ring and 32 sites); a larger value is refused at the site.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np

from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.quantize import dequantize, quantize_into, ring_dtype

_logger = logging.getLogger(__name__)

__all__ = ["FIGURE_SLOTS", "AggregateFigures", "RoundFigures", "decode_figures", "encode_figures", "max_count"]

FIGURE_SLOTS = 4


def max_count(config: SecAggConfig) -> int:
    """Largest steps / image count one site may report (the sum over max_sites cannot wrap)."""
    return (2 ** (config.ring_bits - 1) - 1) // config.max_sites


@dataclass(frozen=True)
class RoundFigures:
    """What one site's round produced, besides its delta: kept in the clear only at the site."""

    loss: float
    steps: int
    num_samples: int


@dataclass(frozen=True)
class AggregateFigures:
    """The survivors' figures as the server learns them: sums and a weighted mean, nothing per site."""

    weight_sum: float  # sum of FedAvg weights, in the sites' units (e.g. images)
    loss: float  # sum(w * loss) / sum(w); nan when the weights sum to zero
    steps: int  # total local steps
    num_samples: int  # total training images


def encode_figures(*, site: str, weight: float, figures: RoundFigures, config: SecAggConfig) -> np.ndarray:
    """The four tail slots of one site (``weight`` already divided by ``max_weight``), unmasked."""
    if not (isinstance(figures.loss, (int, float)) and math.isfinite(figures.loss)):
        raise ValueError(f"site '{site}': loss {figures.loss!r} is not finite; nothing was sent (fix the local "
                         "training, e.g. a diverged loss)")
    limit = max_count(config)
    for key in ("steps", "num_samples"):
        value = getattr(figures, key)
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= limit:
            raise ValueError(f"site '{site}': {key}={value!r} must be an integer in [0, {limit}] (the ring's bound for "
                             f"max_sites={config.max_sites}); nothing was sent")
    loss = float(figures.loss)
    if not 0 <= loss <= config.max_loss:
        _logger.warning("site %s: loss %.4g outside [0, max_loss=%g] is clipped for the aggregate loss; raise secagg "
                        "max_loss if this recurs", site, loss, config.max_loss)
        loss = min(max(loss, 0.0), config.max_loss)
    tail = np.empty(FIGURE_SLOTS, dtype=ring_dtype(config.ring_bits))
    quantize_into(np.array([weight, weight * loss / config.max_loss]), tail[:2], clip=1.0, frac_bits=config.frac_bits)
    tail[2:] = [int(figures.steps), int(figures.num_samples)]
    return tail


def decode_figures(tail: np.ndarray, *, config: SecAggConfig) -> AggregateFigures:
    """Aggregate figures from the four unmasked tail slots of the ring sum."""
    if tail.shape != (FIGURE_SLOTS,):
        raise ValueError(f"expected the {FIGURE_SLOTS} figure slots, got shape {tail.shape}")
    w, wloss = dequantize(tail[:2], frac_bits=config.frac_bits) * config.max_weight
    counts = tail[2:].view(np.int32 if tail.dtype == np.uint32 else np.int64)
    loss = float(wloss * config.max_loss / w) if w > 0 else math.nan
    return AggregateFigures(weight_sum=float(w), loss=loss, steps=int(counts[0]), num_samples=int(counts[1]))
