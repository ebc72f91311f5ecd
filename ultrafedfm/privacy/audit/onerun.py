"""An epsilon lower bound from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023).

The audit: ``m`` canaries, each put into the training set independently with probability 1/2;
after one training run an attacker scores every canary and guesses "in" for the ``k+`` highest
scores, "out" for the ``k-`` lowest, and abstains on the rest. If training is (epsilon, delta)-DP,
the number ``W`` of correct guesses among the ``r = k+ + k-`` made is (up to a delta term)
stochastically dominated by ``Binomial(r, e^eps / (1 + e^eps))`` -- the accuracy of randomized
response -- so observing ``v`` correct guesses rejects every epsilon whose tail probability is
below ``beta``::

    p(eps) = P[Binomial(r, q) >= v] + 2 m delta * max_{i=1..v} P[Binomial(r, q) >= v - i] / i,
    q = e^eps / (1 + e^eps),        lower bound = sup {eps : p(eps) <= beta}.

The delta term is written as an upper bound of the refined term of the authors' analysis (the
difference ``P[W >= v - i] - P[W >= v]`` in place of ``P[W >= v - i]``), so the bound here is never
larger than theirs: conservative. Several ``(k+, k-)`` choices are tried with a Bonferroni split of
``beta``, so picking the best one keeps the confidence honest.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from scipy.stats import binom

_logger = logging.getLogger(__name__)

__all__ = ["GuessResult", "audit_scores", "epsilon_lower_bound", "p_value"]


def p_value(*, m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """An upper bound on P[at least ``v`` of ``r`` guesses correct] for an (epsilon, delta)-DP training."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    tail = lambda k: float(binom.sf(k - 1, r, q))  # noqa: E731  P[W >= k]
    value = tail(v)
    if delta > 0 and v > 0:
        value += 2 * m * delta * max(tail(v - i) / i for i in range(1, v + 1))
    return min(1.0, value)


def epsilon_lower_bound(*, m: int, r: int, v: int, delta: float, beta: float = 0.05, upper: float = 50.0) -> float:
    """The largest epsilon that ``v`` correct of ``r`` guesses (``m`` canaries) rejects at level ``beta`` (0: none)."""
    if p_value(m=m, r=r, v=v, epsilon=0.0, delta=delta) > beta:
        return 0.0
    low, high = 0.0, upper
    if p_value(m=m, r=r, v=v, epsilon=high, delta=delta) <= beta:
        return high
    for _ in range(60):  # p grows with epsilon: bisect for the crossing
        mid = (low + high) / 2
        if p_value(m=m, r=r, v=v, epsilon=mid, delta=delta) <= beta:
            low = mid
        else:
            high = mid
    return low


@dataclass(frozen=True)
class GuessResult:
    """The best guess set of an audit: ``k`` guesses each way, ``correct`` of ``2k`` right, its bound."""

    k: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    beta_each: float


def audit_scores(scores: Sequence[float], included: Sequence[bool], *, delta: float, ks: Sequence[int],
                 beta: float = 0.05) -> GuessResult:
    """Guess "in" for the ``k`` highest scores and "out" for the ``k`` lowest, for each ``k`` in ``ks``
    (Bonferroni: each at ``beta / len(ks)``); the choice with the largest lower bound."""
    scores = np.asarray(scores, dtype=np.float64)
    included = np.asarray(included, dtype=bool)
    m = len(scores)
    if included.shape != scores.shape:
        raise ValueError("scores and included must have the same length")
    # Ties broken by index, so the same scores always give the same guesses.
    order = np.lexsort((np.arange(m), -scores))
    beta_each = beta / len(ks)
    best = None
    for k in ks:
        if not 1 <= k <= m // 2:
            raise ValueError(f"k must lie in [1, m/2] = [1, {m // 2}], got {k}")
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        bound = epsilon_lower_bound(m=m, r=2 * k, v=correct, delta=delta, beta=beta_each)
        result = GuessResult(k=k, guesses=2 * k, correct=correct, epsilon_lower_bound=bound, beta_each=beta_each)
        if best is None or bound > best.epsilon_lower_bound:
            best = result
    return best
