"""Fixed-point encoding of weighted deltas into the ring Z_{2^b}, and the overflow bound.

A real x (one coordinate of w * delta, or the weight w itself, both after dividing the weight
by ``max_weight`` so that w <= 1) is clipped to [-C, C], scaled by 2^f and rounded
stochastically (up with probability equal to the fractional part), so the rounding is
unbiased and off by less than 2^-f (up to a 2^-32 bias from the 32-bit uniform draws). The integer is stored modulo 2^b (two's complement).

Overflow bound. Each encoded coordinate has |q| <= max(C, 1) * 2^f + 1 (the 1 covers the
weight slot, which holds w <= 1), so the sum over n sites decodes correctly as long as

    n * (max(C, 1) * 2^f + 1) < 2^(b - 1).

For the 64-bit ring the right side is 2^53 instead of 2^63: encoding and decoding go through
float64, which holds every integer up to 2^53 exactly, so the decoded sum stays exact.
:func:`check_overflow_bound` enforces it for the largest number of sites a job admits; the
decoded sum is then within n * 2^-f of the sum of the clipped values.
"""
from __future__ import annotations

import logging
import os
from typing import Literal

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_logger = logging.getLogger(__name__)

__all__ = [
    "RingOverflowError",
    "StochasticEncoder",
    "check_overflow_bound",
    "dequantize",
    "max_safe_frac_bits",
    "quantize_into",
    "ring_dtype",
]

RingBits = Literal[32, 64]


class RingOverflowError(ValueError):
    """The configured sites, clip and precision could overflow the ring."""


def ring_dtype(ring_bits: int) -> type[np.unsignedinteger]:
    """numpy dtype whose wraparound arithmetic is the ring Z_{2^ring_bits}."""
    if ring_bits == 32:
        return np.uint32
    if ring_bits == 64:
        return np.uint64
    raise ValueError(f"ring_bits must be 32 or 64, got {ring_bits}")


def _largest_coordinate(clip: float, frac_bits: int) -> float:
    return max(clip, 1.0) * 2.0**frac_bits + 1


def _limit(ring_bits: int) -> float:
    return 2.0 ** min(ring_bits - 1, 53)


def check_overflow_bound(*, num_sites: int, clip: float, frac_bits: int, ring_bits: int) -> None:
    """Raise :class:`RingOverflowError` unless ``num_sites`` encoded vectors sum without overflow."""
    if num_sites * _largest_coordinate(clip, frac_bits) >= _limit(ring_bits):
        safe = max_safe_frac_bits(num_sites=num_sites, clip=clip, ring_bits=ring_bits)
        raise RingOverflowError(
            f"{num_sites} sites at clip={clip} with frac_bits={frac_bits} could overflow the {ring_bits}-bit ring: "
            f"the bound n * (max(clip, 1) * 2^frac_bits + 1) < 2^{min(ring_bits - 1, 53)} fails "
            f"({num_sites * _largest_coordinate(clip, frac_bits):.4g} >= {_limit(ring_bits):.4g}); "
            f"use frac_bits <= {safe}, a smaller clip or max_sites, or ring_bits: 64"
        )


def max_safe_frac_bits(*, num_sites: int, clip: float, ring_bits: int) -> int:
    """The largest f for which ``num_sites`` sites cannot overflow (may be negative if none is safe)."""
    f = ring_bits
    while f > -64 and num_sites * _largest_coordinate(clip, f) >= _limit(ring_bits):
        f -= 1
    return f


class StochasticEncoder:
    """Encodes float chunks into the ring with clipping and stochastic rounding, without temporaries.

    Rounding uses floor(x * 2^f + u) with u uniform in [0, 1) (up with probability equal to the
    fraction). u comes from an AES-256-CTR keystream under a fresh random key: ~4x faster here
    than numpy's generator, and unpredictable to anyone else. Reuse one encoder per vector.
    """

    def __init__(self, *, clip: float, frac_bits: int, chunk_elements: int, seed: bytes | None = None):
        self.clip = clip
        self.frac_bits = frac_bits
        self._scaled = np.empty(chunk_elements, dtype=np.float64)
        self._uniform = np.empty(chunk_elements, dtype=np.float64)
        self._integers = np.empty(chunk_elements, dtype=np.int64)
        self._zeros = bytes(chunk_elements * 4)
        self._bits = bytearray(chunk_elements * 4 + 32)
        key = seed if seed is not None else os.urandom(32)
        self._random = Cipher(algorithms.AES(key), modes.CTR(bytes(16))).encryptor()

    def encode_into(self, values: np.ndarray, out: np.ndarray, *, multiplier: float = 1.0) -> int:
        """out = q(clip(multiplier * values)); returns how many coordinates were clipped.

        Raises ``ValueError`` for non-finite values (nothing must be encoded from a diverged update).
        """
        m = values.shape[0]
        if m > self._scaled.shape[0]:
            raise ValueError(f"chunk of {m} values exceeds the encoder's {self._scaled.shape[0]}")
        x = self._scaled[:m]
        np.multiply(values, float(multiplier) * 2.0**self.frac_bits, out=x, dtype=np.float64)
        bound = self.clip * 2.0**self.frac_bits
        clipped = 0
        if m:
            low, high = x.min(), x.max()
            if not (np.isfinite(low) and np.isfinite(high)):
                raise ValueError("non-finite value (NaN or inf) in the vector to encode")
            if low < -bound or high > bound:
                clipped = int(np.count_nonzero(x > bound) + np.count_nonzero(x < -bound))
                np.clip(x, -bound, bound, out=x)
        self._random.update_into(memoryview(self._zeros)[: 4 * m], self._bits)
        u = self._uniform[:m]
        np.multiply(np.frombuffer(self._bits, dtype=np.uint32, count=m), 2.0**-32, out=u)
        np.add(x, u, out=x)
        np.floor(x, out=x)
        ints = self._integers[:m]
        np.copyto(ints, x, casting="unsafe")  # exact: x is integral and |x| < 2^53
        out[:] = ints  # int64 -> uint32/uint64 wraps modulo 2^b: two's complement in the ring
        return clipped


def quantize_into(values: np.ndarray, out: np.ndarray, *, clip: float, frac_bits: int, multiplier: float = 1.0) -> int:
    """Encode one vector (``values`` flattened) into ``out``; returns the number of clipped coordinates."""
    values = np.asarray(values).reshape(-1)
    encoder = StochasticEncoder(clip=clip, frac_bits=frac_bits, chunk_elements=max(values.shape[0], 1))
    return encoder.encode_into(values, out, multiplier=multiplier)


def dequantize(ring_values: np.ndarray, *, frac_bits: int) -> np.ndarray:
    """Decode ring elements (a sum of encodings) back to float64 via their signed representative."""
    signed = ring_values.view(np.int32 if ring_values.dtype == np.uint32 else np.int64)
    return signed.astype(np.float64) / float(2**frac_bits)
