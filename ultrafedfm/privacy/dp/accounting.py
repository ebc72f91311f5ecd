"""Epsilon from a history of DP-SGD steps, and the noise that reaches a target epsilon (Opacus accountants).

A history is a list of :class:`Mechanism` entries, ``(noise_multiplier, sample_rate, steps)``:
``steps`` applications of the Poisson-subsampled Gaussian mechanism. Composition does not
depend on order, so entries with the same noise and rate are merged before accounting.

- ``"prv"``: privacy random variables (Gopi et al. 2021), the upper bound of Opacus'
  ``PRVAccountant`` (epsilon error 0.01). Tight; seconds for tens of thousands of steps.
- ``"rdp"``: Renyi DP (Mironov 2017) with Opacus' orders and its improved conversion. Looser
  (a few percent above PRV), milliseconds.

Opacus is imported inside the functions: reading a ledger or checking a policy needs no torch.
"""
from __future__ import annotations

import logging
import math
import warnings
from typing import Iterable, NamedTuple

from ultrafedfm.privacy.dp.config import Accountant

_logger = logging.getLogger(__name__)

__all__ = ["Mechanism", "calibrate_noise", "compute_epsilon", "merge_history"]

# PRV's accuracy: the epsilon Opacus reports is an upper bound within this of the true value.
PRV_EPS_ERROR = 0.01


class Mechanism(NamedTuple):
    """``steps`` DP-SGD steps with Gaussian noise ``noise_multiplier`` and Poisson rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int


def merge_history(history: Iterable[Mechanism]) -> list[Mechanism]:
    """One entry per (noise, rate), steps summed, in order of first appearance."""
    merged: dict[tuple[float, float], int] = {}
    for noise, rate, steps in history:
        if steps < 0 or not 0 < rate <= 1 or not noise > 0:
            raise ValueError(f"not a DP-SGD mechanism: noise {noise}, sample rate {rate}, steps {steps}")
        merged[(noise, rate)] = merged.get((noise, rate), 0) + steps
    return [Mechanism(noise, rate, steps) for (noise, rate), steps in merged.items() if steps > 0]


def compute_epsilon(history: Iterable[Mechanism], delta: float, accountant: Accountant) -> tuple[float, Accountant]:
    """The epsilon of ``history`` at ``delta``, and the accountant that produced it.

    PRV falls back to RDP (always an upper bound, so never a weaker claim) when its numerical
    composition fails, with a warning; the second value says which one answered.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must lie in (0, 1), got {delta}")
    merged = merge_history(history)
    if not merged:
        return 0.0, accountant
    if accountant == "prv":
        try:
            return _opacus_epsilon("prv", merged, delta), "prv"
        except (ArithmeticError, ValueError, RuntimeError, MemoryError) as exc:
            _logger.warning("the PRV accountant failed on %s (%s); using the RDP accountant's larger epsilon",
                            merged, exc)
    elif accountant != "rdp":
        raise ValueError(f"accountant must be 'prv' or 'rdp', got {accountant!r}")
    return _opacus_epsilon("rdp", merged, delta), "rdp"


def _opacus_epsilon(kind: str, merged: list[Mechanism], delta: float) -> float:
    from opacus.accountants import PRVAccountant, RDPAccountant

    account = PRVAccountant() if kind == "prv" else RDPAccountant()
    account.history = [tuple(m) for m in merged]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # numpy overflow inside the search is expected
        # PRV sizes its domain with an RDP bound; at the largest order that bound is loose, not unsafe.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon = account.get_epsilon(delta, eps_error=PRV_EPS_ERROR) if kind == "prv" else account.get_epsilon(delta)
    epsilon = float(epsilon)
    if not math.isfinite(epsilon) or epsilon < 0:
        raise ArithmeticError(f"{kind} accountant returned epsilon {epsilon}")
    return epsilon


def calibrate_noise(*, target_epsilon: float, delta: float, sample_rate: float, steps: int,
                    accountant: Accountant) -> float:
    """The smallest noise multiplier (to 0.01 in epsilon) whose ``steps`` steps spend at most ``target_epsilon``."""
    from opacus.accountants.utils import get_noise_multiplier

    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with warnings.catch_warnings():
        # The search tries small noises whose RDP optimum lies at the largest order: loose, not unsafe.
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        noise = float(get_noise_multiplier(target_epsilon=target_epsilon, target_delta=delta,
                                           sample_rate=sample_rate, steps=steps, accountant=accountant,
                                           epsilon_tolerance=0.01))
    spent, _ = compute_epsilon([Mechanism(noise, sample_rate, steps)], delta, accountant)
    if spent > target_epsilon:  # the search stops on the safe side; check rather than trust it
        raise ArithmeticError(f"noise {noise} spends epsilon {spent:.4f} > target {target_epsilon}")
    return noise
