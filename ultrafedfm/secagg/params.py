"""Job-level parameters of secure aggregation (:class:`SecAggConfig`), validated on load.

The same configuration goes to the server and to every site of a job; the ring overflow
bound (see :mod:`ultrafedfm.secagg.quantize`) is checked here, at configuration time, for the
largest federation the job admits (``max_sites``).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from ultrafedfm.config import ConfigError, check
from ultrafedfm.secagg.quantize import RingOverflowError, check_overflow_bound, max_safe_frac_bits

_logger = logging.getLogger(__name__)

__all__ = ["SecAggConfig", "majority_threshold"]

MIN_USEFUL_FRAC_BITS = 8


def majority_threshold(num_sites: int) -> int:
    """Strict majority floor(n/2) + 1, never below 2."""
    return max(num_sites // 2 + 1, 2)


@dataclass(frozen=True)
class SecAggConfig:
    """Secure-aggregation settings of a job.

    Args:
        min_sites: a round aggregates only with at least this many masked inputs (>= 2; 3 default).
        threshold: Shamir threshold t; ``None`` = strict majority of the round's sites. It can only
            raise the threshold: a value below the majority is refused when the round starts.
        max_sites: the largest number of sites a round may have; the overflow bound is checked for it.
        ring_bits: 32 (wire size of float32) or 64 (more precision, twice the bytes).
        clip: every coordinate of (weight / max_weight) * delta is clipped to [-clip, clip]. A
            per-site delta whose L2 norm is bounded by S (e.g. DP clipping) never clips with clip = S.
        frac_bits: fixed-point fraction bits f; ``None`` = the largest that cannot overflow.
        max_weight: FedAvg weights (e.g. image counts) are divided by this; a site with a larger
            weight is refused. Set it near the largest site's weight: the precision of the mean is
            about max_sites * 2^-f * max_weight / (sum of weights).
        prg: keystream cipher expanding mask seeds; AES-256-CTR is ~2x ChaCha20 with AES-NI.
        consistency_check: the survivors sign the survivor list before anyone unmasks (Bonawitz et
            al.'s round 3; one more round trip). Off, an actively malicious server could show sites
            different lists and unmask the sum of a small group of sites (never one site alone).
        max_loss: a site's training loss travels inside the mask as w * loss / max_loss; losses
            outside [0, max_loss] are clipped for the aggregate loss (never for training).
    """

    min_sites: int = 3
    threshold: int | None = None
    max_sites: int = 32
    ring_bits: Literal[32, 64] = 32
    clip: float = 1.0
    frac_bits: int | None = None
    max_weight: float = 1.0
    prg: Literal["aes-256-ctr", "chacha20"] = "aes-256-ctr"
    consistency_check: bool = True
    max_loss: float = 16.0

    def __post_init__(self) -> None:
        check(self.min_sites >= 2, "min_sites", "must be at least 2 (with 1 site the sum is that site's update)")
        if self.min_sites == 2:
            _logger.warning("secagg min_sites=2: each of two sites can subtract its own update from the sum "
                            "and learn the other's; use 3 or more")
        check(self.max_sites >= self.min_sites, "max_sites", f"must be >= min_sites ({self.min_sites})")
        if self.threshold is not None:
            check(2 <= self.threshold <= self.max_sites, "threshold", f"must be in 2..max_sites ({self.max_sites})")
        check(self.ring_bits in (32, 64), "ring_bits", "must be 32 or 64")
        if not self.consistency_check:
            _logger.warning("secagg consistency_check is off: a malicious server could unmask the sum of a small "
                            "group of sites by showing sites different survivor lists")
        check(self.clip > 0, "clip", "must be positive")
        check(self.max_weight > 0, "max_weight", "must be positive")
        check(self.max_loss > 0, "max_loss", "must be positive")
        safe = max_safe_frac_bits(num_sites=self.max_sites, clip=self.clip, ring_bits=self.ring_bits)
        if self.frac_bits is None:
            check(safe >= MIN_USEFUL_FRAC_BITS, "clip",
                  f"leaves only {safe} fraction bits for {self.max_sites} sites in a {self.ring_bits}-bit ring; "
                  "lower clip or max_sites, or use ring_bits: 64")
            object.__setattr__(self, "frac_bits", safe)
        else:
            check(self.frac_bits >= 1, "frac_bits", "must be at least 1")
            try:
                check_overflow_bound(num_sites=self.max_sites, clip=self.clip, frac_bits=self.frac_bits,
                                     ring_bits=self.ring_bits)
            except RingOverflowError as exc:
                raise ConfigError(str(exc), key="frac_bits") from None

    def threshold_for(self, num_sites: int) -> int:
        """Shamir threshold for a consortium of ``num_sites`` member sites (checks the configured one is allowed).

        The protocol calls it with the consortium's size, never with a roster the server chose.
        """
        majority = majority_threshold(num_sites)
        if self.threshold is not None and self.threshold < majority:
            raise ConfigError(
                f"{self.threshold} is below the strict majority {majority} of {num_sites} sites; a lower threshold "
                "would let the server unmask one site; remove it or raise it", key="threshold")
        t = max(majority, self.threshold or 0)
        if t > num_sites:
            raise ConfigError(f"{t} exceeds the {num_sites} sites of the consortium", key="threshold")
        return t

    @property
    def quantization_error_bound(self) -> float:
        """Bound on |decoded sum - sum of clipped values| per coordinate, in weight units, for max_sites."""
        return self.max_sites * 2.0 ** -self.frac_bits * self.max_weight
