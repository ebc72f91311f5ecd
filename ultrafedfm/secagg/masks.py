"""Mask seeds and their expansion into ring elements (Bonawitz et al., CCS 2017, section 4).

Seeds: X25519 shared secrets (pairwise masks, share encryption) and the self-mask seed b go
through HKDF-SHA256 whose ``info`` binds a purpose label, the job id, the round and the sorted
pair of site names, so no key serves two purposes, jobs, rounds or pairs.

Expansion: the 32-byte key drives AES-256-CTR or ChaCha20 (OpenSSL through ``cryptography``)
with a zero nonce (each key is used for one stream only); the keystream bytes are read as
little-endian uint32/uint64 ring elements and added with numpy's wraparound arithmetic, one
cache-sized chunk at a time for every stream, so a 112M-coordinate vector never has a second
full-size copy and there is no Python loop over elements.
"""
from __future__ import annotations

import logging
from typing import Callable, Literal, Sequence

import numpy as np
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tqdm.auto import tqdm

_logger = logging.getLogger(__name__)

__all__ = [
    "CHUNK_ELEMENTS",
    "MaskStream",
    "agree",
    "derive_key",
    "keystream_bytes",
    "apply_streams",
    "pair_sign",
    "scratch_buffers",
]

Prg = Literal["aes-256-ctr", "chacha20"]
CHUNK_ELEMENTS = 1 << 17  # 512 KiB of uint32: chunk, keystream and zeros stay in L2 while every stream is added
_PROGRESS_MIN_WORK = 1 << 28  # element-stream additions (~1 s here) before a progress bar is worth showing
_PROTOCOL_LABEL = b"ultrafedfm-secagg/v2"


def length_prefixed(*fields: bytes) -> bytes:
    """Unambiguous concatenation (4-byte big-endian length before each field) for KDF info and signatures."""
    return b"".join(len(f).to_bytes(4, "big") + f for f in fields)


def derive_key(secret: bytes, *, purpose: str, job_id: str, round_number: int, sites: Sequence[str]) -> bytes:
    """32-byte key from ``secret`` bound to purpose, job, round and the (sorted) site names."""
    info = length_prefixed(
        _PROTOCOL_LABEL, purpose.encode(), job_id.encode(), round_number.to_bytes(8, "big"),
        *(s.encode() for s in sorted(sites)),
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def agree(private_key: X25519PrivateKey, peer_public: bytes) -> bytes:
    """X25519 shared secret with the peer's raw 32-byte public key."""
    return private_key.exchange(X25519PublicKey.from_public_bytes(peer_public))


def pair_sign(site: str, peer: str) -> int:
    """+1 if ``site`` sorts before ``peer`` else -1: the pair's masks cancel in the sum."""
    return 1 if site < peer else -1


def _cipher(key: bytes, prg: Prg) -> Cipher:
    if prg == "aes-256-ctr":
        return Cipher(algorithms.AES(key), modes.CTR(bytes(16)))
    if prg == "chacha20":
        return Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None)
    raise ValueError(f"prg must be 'aes-256-ctr' or 'chacha20', got {prg!r}")


class MaskStream:
    """One key's keystream, added (sign +1) or subtracted (-1) chunk by chunk into a ring vector.

    Chunks must be fed in order: the stream position advances with every call.
    """

    def __init__(self, key: bytes, *, sign: int, prg: Prg):
        if sign not in (1, -1):
            raise ValueError(f"sign must be +1 or -1, got {sign}")
        self._encryptor = _cipher(key, prg).encryptor()
        self.sign = sign

    def apply(self, chunk: np.ndarray, *, zeros: memoryview, scratch: bytearray) -> None:
        """chunk +=/-= the next ``chunk.nbytes`` keystream bytes (``zeros``/``scratch`` reused buffers)."""
        nbytes = chunk.nbytes
        self._encryptor.update_into(zeros[:nbytes], scratch)
        stream = np.frombuffer(scratch, dtype=chunk.dtype, count=chunk.shape[0])
        if self.sign > 0:
            np.add(chunk, stream, out=chunk)
        else:
            np.subtract(chunk, stream, out=chunk)


def scratch_buffers(chunk_elements: int, itemsize: int) -> tuple[memoryview, bytearray]:
    """Zero plaintext and output buffer for :meth:`MaskStream.apply` (+ a block of update_into slack)."""
    return memoryview(bytes(chunk_elements * itemsize)), bytearray(chunk_elements * itemsize + 32)


def apply_streams(
    vector: np.ndarray,
    streams: Sequence[MaskStream],
    *,
    before_chunk: Callable[[int, int], None] | None = None,
    description: str = "masking",
) -> None:
    """Add every stream into ``vector`` (1-D ring array) in place, chunk by chunk.

    ``before_chunk(start, stop)`` runs first on each chunk (the client quantises into it there).
    """
    zeros, scratch = scratch_buffers(CHUNK_ELEMENTS, vector.itemsize)
    size = vector.shape[0]
    starts = range(0, size, CHUNK_ELEMENTS)
    show = size * max(len(streams), 1) >= _PROGRESS_MIN_WORK
    # disable=None: shown on a terminal only, never written into log files
    for start in tqdm(starts, desc=description, unit="chunk", disable=None if show else True, leave=False):
        stop = min(start + CHUNK_ELEMENTS, size)
        if before_chunk is not None:
            before_chunk(start, stop)
        chunk = vector[start:stop]
        for stream in streams:
            stream.apply(chunk, zeros=zeros, scratch=scratch)


def keystream_bytes(key: bytes, num_bytes: int, *, prg: Prg) -> None:
    """Produce ``num_bytes`` of keystream and discard it: the cipher-only time bound for benchmarks."""
    encryptor = _cipher(key, prg).encryptor()
    zeros, scratch = scratch_buffers(CHUNK_ELEMENTS, 4)
    step = CHUNK_ELEMENTS * 4
    for start in range(0, num_bytes, step):
        encryptor.update_into(zeros[: min(step, num_bytes - start)], scratch)
