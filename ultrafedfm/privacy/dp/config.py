"""A job's DP-SGD settings (``DPConfig``) and the site's default delta.

A job carries a :class:`DPConfig` inside its training contract (``to_mapping`` on the server,
``from_mapping`` at the site). It says *how* the job wants to train privately; the site's own
policy (:class:`~ultrafedfm.privacy.policy.PrivacyPolicy`) says what the site accepts, and the
site alone resolves what needs its own data: the noise for a target epsilon and the default
delta both depend on how many images it holds.

Example::

    dp = DPConfig(enabled=True, target_epsilon=4.0, max_grad_norm=1.0)
    from_mapping(DPConfig, to_mapping(dp)) == dp
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

from ultrafedfm.config import check

_logger = logging.getLogger(__name__)

__all__ = ["Accountant", "Clipping", "DPConfig", "default_delta"]

Accountant = Literal["prv", "rdp"]
Clipping = Literal["ghost", "hooks"]


@dataclass(frozen=True)
class DPConfig:
    """DP-SGD settings of a job (YAML section ``dp``), validated on construction.

    Sampling is always Poisson (each image joins each step's batch independently with rate
    ``1 / steps_per_epoch``): the accounting assumes it, so there is no switch to turn it off.

    Args:
        enabled: train with DP-SGD at every site.
        noise_multiplier: Gaussian noise std / ``max_grad_norm``; give this or ``target_epsilon``.
        target_epsilon: the epsilon the whole job (all rounds x local epochs) may spend at a site;
            each site computes the noise that reaches it with its own image count.
        max_grad_norm: per-image gradient clipping norm (L2, over all parameters).
        delta: the delta of the guarantee; ``None`` lets each site use ``1 / (10 N)`` for its N
            images (or its policy's ``max_delta`` when smaller).
        accountant: ``"prv"`` (privacy random variables, Gopi et al. 2021; tight) or ``"rdp"``
            (Renyi DP, Mironov 2017; looser, fast).
        clipping: ``"ghost"`` (Opacus ghost clipping: per-image norms without per-image
            gradients) or ``"hooks"`` (per-image gradients). A site falls back from ghost to hooks
            only when Opacus refuses ghost clipping on the model, and says so in its log and ledger.
    """

    enabled: bool = False
    noise_multiplier: float | None = None
    target_epsilon: float | None = None
    max_grad_norm: float = 1.0
    delta: float | None = None
    accountant: Accountant = "prv"
    clipping: Clipping = "ghost"

    def __post_init__(self) -> None:
        if self.noise_multiplier is not None:
            check(math.isfinite(self.noise_multiplier) and self.noise_multiplier > 0, "noise_multiplier",
                  f"must be a positive number (0 adds no noise and protects nothing), got {self.noise_multiplier}")
        if self.target_epsilon is not None:
            check(math.isfinite(self.target_epsilon) and self.target_epsilon > 0, "target_epsilon",
                  f"must be a positive number, got {self.target_epsilon}")
        check(math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0, "max_grad_norm",
              f"must be a positive number, got {self.max_grad_norm}")
        check(self.delta is None or 0 < self.delta < 1, "delta", f"must lie in (0, 1), or null for the site's "
              f"default 1/(10 N), got {self.delta}")
        check(self.accountant in ("prv", "rdp"), "accountant", f"must be 'prv' or 'rdp', got {self.accountant!r}")
        check(self.clipping in ("ghost", "hooks"), "clipping", f"must be 'ghost' or 'hooks', got {self.clipping!r}")
        if self.enabled:
            check((self.noise_multiplier is None) != (self.target_epsilon is None), "noise_multiplier",
                  "with DP enabled give exactly one of noise_multiplier and target_epsilon "
                  f"(got noise_multiplier={self.noise_multiplier}, target_epsilon={self.target_epsilon})")


def default_delta(num_images: int, *, max_delta: float | None = None) -> float:
    """The site's delta when a job sets none: ``1 / (10 N)``, or the policy's ``max_delta`` when smaller."""
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    delta = 1.0 / (10 * num_images)
    return delta if max_delta is None else min(delta, max_delta)
