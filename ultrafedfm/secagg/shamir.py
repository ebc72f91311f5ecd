"""Shamir t-of-n secret sharing over a prime field (Shamir, CACM 1979).

Secrets are short byte strings (a 32-byte self-mask seed, a 32-byte X25519 private key).
They are read as one integer below the Mersenne prime p = 2^521 - 1, the constant term of a
random polynomial of degree t - 1; share i is the polynomial at x = i. Any t shares give the
secret back by Lagrange interpolation at 0; t - 1 shares give a uniformly random field element,
which in all but a 2^-265 fraction of cases is too large to be a secret of the stated length,
so :func:`combine_shares` reports it instead of returning garbage.
"""
from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass
from typing import Sequence

_logger = logging.getLogger(__name__)

__all__ = ["FIELD_PRIME", "SHARE_BYTES", "Share", "ShamirError", "combine_shares", "split_secret"]

FIELD_PRIME = (1 << 521) - 1
_ELEMENT_BYTES = 66  # ceil(521 / 8)
SHARE_BYTES = 2 + _ELEMENT_BYTES
MAX_SECRET_BYTES = 64  # well below the field size, so t - 1 shares are detectably not a secret
MAX_SHARES = 65535


class ShamirError(ValueError):
    """Shares cannot be made or combined as asked."""


@dataclass(frozen=True)
class Share:
    """One point (x, y) of the sharing polynomial; x in 1..n, y in the field."""

    x: int
    y: int

    def to_bytes(self) -> bytes:
        return self.x.to_bytes(2, "big") + self.y.to_bytes(_ELEMENT_BYTES, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> "Share":
        if len(data) != SHARE_BYTES:
            raise ShamirError(f"a share is {SHARE_BYTES} bytes, got {len(data)}")
        x = int.from_bytes(data[:2], "big")
        y = int.from_bytes(data[2:], "big")
        if not 1 <= x <= MAX_SHARES or y >= FIELD_PRIME:
            raise ShamirError(f"share out of range (x={x}, y >= p: {y >= FIELD_PRIME})")
        return cls(x, y)


def split_secret(secret: bytes, *, threshold: int, num_shares: int) -> list[Share]:
    """Split ``secret`` into ``num_shares`` shares, any ``threshold`` of which recover it.

    Share ``i`` (0-based in the returned list) has x = i + 1.
    """
    if not 1 <= len(secret) <= MAX_SECRET_BYTES:
        raise ShamirError(f"secret must be 1..{MAX_SECRET_BYTES} bytes, got {len(secret)}")
    if not 2 <= threshold <= num_shares <= MAX_SHARES:
        raise ShamirError(
            f"need 2 <= threshold <= num_shares <= {MAX_SHARES}, got threshold={threshold}, num_shares={num_shares}"
        )
    coefficients = [int.from_bytes(secret, "big")]
    coefficients += [secrets.randbelow(FIELD_PRIME) for _ in range(threshold - 1)]
    return [Share(x, _evaluate(coefficients, x)) for x in range(1, num_shares + 1)]


def combine_shares(shares: Sequence[Share], *, threshold: int, secret_bytes: int) -> bytes:
    """Recover a ``secret_bytes``-long secret from at least ``threshold`` distinct shares.

    Raises :class:`ShamirError` for too few or duplicate shares, and when the interpolated value
    cannot be a secret of that length (the sign that fewer than ``threshold`` genuine shares, or a
    randomly corrupted one, went in; a deliberately small change to a share is not always caught).
    """
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"duplicate share indices {sorted(x for x in set(xs) if xs.count(x) > 1)}")
    if len(shares) < threshold:
        raise ShamirError(f"{len(shares)} shares given, {threshold} needed to reconstruct")
    points = list(shares)[:threshold]
    value = _interpolate_at_zero(points)
    if value >> (8 * secret_bytes):
        raise ShamirError(
            f"the {len(points)} shares do not reconstruct a {secret_bytes}-byte secret "
            "(fewer than threshold genuine shares, or a corrupted share)"
        )
    return value.to_bytes(secret_bytes, "big")


def _evaluate(coefficients: list[int], x: int) -> int:
    value = 0
    for c in reversed(coefficients):  # Horner
        value = (value * x + c) % FIELD_PRIME
    return value


def _interpolate_at_zero(points: Sequence[Share]) -> int:
    # Lagrange basis at 0: prod_{j != i} x_j / (x_j - x_i); one modular inverse per point.
    total = 0
    for i, pi in enumerate(points):
        num, den = 1, 1
        for j, pj in enumerate(points):
            if i != j:
                num = num * pj.x % FIELD_PRIME
                den = den * (pj.x - pi.x) % FIELD_PRIME
        total = (total + pi.y * num * pow(den, -1, FIELD_PRIME)) % FIELD_PRIME
    return total
