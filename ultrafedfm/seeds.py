"""One way to derive a seed from several parts (a base seed, a round, a site name, an epoch).

Hashing the parts (SHA-256 of their canonical text) gives seeds that differ for any two
different tuples, unlike ad-hoc arithmetic such as ``seed * 1_000_003 + epoch``.
"""
from __future__ import annotations

import hashlib
import logging

_logger = logging.getLogger(__name__)

__all__ = ["mix_seed"]


def mix_seed(*parts: int | str | bytes, bits: int = 63) -> int:
    """A seed in ``[0, 2**bits)`` determined by ``parts`` (ints, strings or bytes, in order)."""
    if not 1 <= bits <= 64:
        raise ValueError(f"bits must lie in 1..64, got {bits}")
    digest = hashlib.sha256()
    for part in parts:
        if isinstance(part, bool) or not isinstance(part, (int, str, bytes)):
            raise TypeError(f"seed parts must be int, str or bytes, got {type(part).__name__}")
        data = part if isinstance(part, bytes) else str(part).encode("utf-8")
        tag = {int: b"i", str: b"s", bytes: b"b"}[type(part)]
        digest.update(tag + len(data).to_bytes(4, "big") + data)
    return int.from_bytes(digest.digest()[:8], "big") >> (64 - bits)
