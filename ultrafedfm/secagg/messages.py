"""Typed protocol messages and their canonical serialisation.

Every message names its ``sender`` (a site name, or ``"server"``), ``job_id``, ``round`` and
``phase``. A message becomes a plain dict of str/int/bytes/numpy arrays (``to_dict``, what a
FLARE ``Shareable`` carries) or one byte string (``to_bytes``: a magic, a canonical JSON
header with sorted keys and base64 bytes, then raw little-endian arrays), and comes back with
``from_dict`` / ``from_bytes``, which check every field's type.

Phases and who sends what (n sites, server S)::

    advertise_keys  site -> S: AdvertiseKeys      S -> sites: KeyRoster (the signed set)
    share_keys      site -> S: EncryptedShares    S -> site:  ShareDelivery (ciphertexts for it)
    masked_input    site -> S: MaskedInput
    consistency     S -> sites: SurvivorList      site -> S:  SurvivorSignature   (on by default)
    unmask          S -> sites: UnmaskRequest     site -> S:  UnmaskResponse
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, ClassVar, Union

import numpy as np

from ultrafedfm.secagg.errors import ProtocolError
from ultrafedfm.secagg.masks import length_prefixed

_logger = logging.getLogger(__name__)

__all__ = [
    "SERVER",
    "AdvertiseKeys",
    "EncryptedShares",
    "KeyRoster",
    "MaskedInput",
    "Message",
    "Phase",
    "ShareDelivery",
    "SurvivorList",
    "SurvivorSignature",
    "UnmaskRequest",
    "UnmaskResponse",
    "check_envelope",
    "from_bytes",
    "from_dict",
    "roster_payload",
    "signed_key_payload",
    "survivors_payload",
    "to_bytes",
    "to_dict",
]

SERVER = "server"
_MAGIC = b"UFSA2\n"


class Phase(str, Enum):
    ADVERTISE_KEYS = "advertise_keys"
    SHARE_KEYS = "share_keys"
    MASKED_INPUT = "masked_input"
    CONSISTENCY_CHECK = "consistency_check"
    UNMASK = "unmask"


def signed_key_payload(*, site: str, job_id: str, round_number: int, c_public: bytes, s_public: bytes,
                       context: bytes) -> bytes:
    """The exact bytes a site signs for its round keys (length-prefixed, domain-separated).

    ``context`` is the round context digest (model hash, lr, training and secure-aggregation
    settings, member list; :meth:`~ultrafedfm.secagg.context.RoundContext.digest`).
    """
    fields = [b"ultrafedfm-secagg/v2/advertise-keys", site.encode(), job_id.encode(),
              round_number.to_bytes(8, "big"), c_public, s_public, context]
    return length_prefixed(*fields)


def roster_payload(*, site: str, job_id: str, round_number: int, advertisements: "tuple[AdvertiseKeys, ...]") -> bytes:
    """The bytes a site signs to attest the key roster it saw: a SHA-256 digest over every entry."""
    digest = hashlib.sha256()
    for advert in sorted(advertisements, key=lambda a: a.sender):
        for part in (advert.sender.encode(), advert.c_public, advert.s_public, advert.context):
            digest.update(len(part).to_bytes(4, "big") + part)
    fields = [b"ultrafedfm-secagg/v2/roster", site.encode(), job_id.encode(), round_number.to_bytes(8, "big"),
              digest.digest()]
    return length_prefixed(*fields)


@dataclass(frozen=True)
class AdvertiseKeys:
    """A site's per-round X25519 public keys (c: share encryption, s: masks) and the digest of the round
    context it trains in, signed with the site's own signing key (verified against the member list's pin)."""

    phase: ClassVar[Phase] = Phase.ADVERTISE_KEYS
    sender: str
    job_id: str
    round: int
    c_public: bytes
    s_public: bytes
    context: bytes
    signature: bytes

    def signed_payload(self) -> bytes:
        return signed_key_payload(site=self.sender, job_id=self.job_id, round_number=self.round,
                                  c_public=self.c_public, s_public=self.s_public, context=self.context)


@dataclass(frozen=True)
class KeyRoster:
    """Server -> every site: all advertisements received, relayed unchanged."""

    phase: ClassVar[Phase] = Phase.ADVERTISE_KEYS
    sender: str
    job_id: str
    round: int
    advertisements: tuple[AdvertiseKeys, ...]


@dataclass(frozen=True)
class EncryptedShares:
    """Site -> server: AES-GCM ciphertexts of (b-share, s_sk-share), one per receiving site, and the
    site's signature over the roster it saw (so the server cannot show sites different rosters)."""

    phase: ClassVar[Phase] = Phase.SHARE_KEYS
    sender: str
    job_id: str
    round: int
    ciphertexts: dict[str, bytes]
    roster_signature: bytes


@dataclass(frozen=True)
class ShareDelivery:
    """Server -> one site: the ciphertexts addressed to it and their senders' roster signatures,
    keyed by sender (the senders are U2)."""

    phase: ClassVar[Phase] = Phase.SHARE_KEYS
    sender: str
    job_id: str
    round: int
    recipient: str
    ciphertexts: dict[str, bytes]
    roster_signatures: dict[str, bytes]


@dataclass(frozen=True)
class MaskedInput:
    """Site -> server: y = q(w * delta) || q(w) || q(w * loss) || steps || images, plus masks (uint32 or
    uint64 ring vector; see :mod:`ultrafedfm.secagg.figures`)."""

    phase: ClassVar[Phase] = Phase.MASKED_INPUT
    sender: str
    job_id: str
    round: int
    masked: np.ndarray = field(repr=False)


def survivors_payload(*, site: str, job_id: str, round_number: int, survivors: tuple[str, ...],
                      dropped: tuple[str, ...]) -> bytes:
    """The bytes a site signs to attest the survivor list it was shown (consistency check)."""
    def names(items: tuple[str, ...]) -> bytes:
        return length_prefixed(*(n.encode() for n in sorted(items)))

    fields = [b"ultrafedfm-secagg/v2/survivors", site.encode(), job_id.encode(), round_number.to_bytes(8, "big"),
              names(survivors), names(dropped)]
    return length_prefixed(*fields)


@dataclass(frozen=True)
class SurvivorList:
    """Server -> survivors (consistency check): U3 (inputs received) and D (shared keys, no input)."""

    phase: ClassVar[Phase] = Phase.CONSISTENCY_CHECK
    sender: str
    job_id: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]


@dataclass(frozen=True)
class SurvivorSignature:
    """Site -> server: the site's signature over the survivor list it was shown."""

    phase: ClassVar[Phase] = Phase.CONSISTENCY_CHECK
    sender: str
    job_id: str
    round: int
    signature: bytes


@dataclass(frozen=True)
class UnmaskRequest:
    """Server -> sites: survivors and dropped sites, with the survivors' signatures over that list
    (``attestations``; empty when the job turned the consistency check off)."""

    phase: ClassVar[Phase] = Phase.UNMASK
    sender: str
    job_id: str
    round: int
    survivors: tuple[str, ...]
    dropped: tuple[str, ...]
    attestations: dict[str, bytes]


@dataclass(frozen=True)
class UnmaskResponse:
    """Site -> server: b-shares of survivors and s_sk-shares of dropped sites, never both for one site."""

    phase: ClassVar[Phase] = Phase.UNMASK
    sender: str
    job_id: str
    round: int
    self_mask_shares: dict[str, bytes]
    mask_key_shares: dict[str, bytes]


Message = Union[AdvertiseKeys, KeyRoster, EncryptedShares, ShareDelivery, MaskedInput, SurvivorList,
                SurvivorSignature, UnmaskRequest, UnmaskResponse]
_TYPES: dict[str, type] = {cls.__name__: cls for cls in
                           (AdvertiseKeys, KeyRoster, EncryptedShares, ShareDelivery, MaskedInput, SurvivorList,
                            SurvivorSignature, UnmaskRequest, UnmaskResponse)}


def check_envelope(message: Any, *, expected: type, job_id: str, round_number: int, sender: str | None = None) -> None:
    """Refuse a message of the wrong type, job, round or sender with a :class:`ProtocolError`."""
    if not isinstance(message, expected):
        raise ProtocolError(f"expected {expected.__name__} in phase '{expected.phase.value}', "
                            f"got {type(message).__name__}")
    if message.job_id != job_id:
        raise ProtocolError(f"{expected.__name__} from '{message.sender}' is for job '{message.job_id}', "
                            f"this is job '{job_id}'; refused")
    if message.round != round_number:
        raise ProtocolError(f"{expected.__name__} from '{message.sender}' is for round {message.round}, this is "
                            f"round {round_number}; refused (stale or replayed)")
    if sender is not None and message.sender != sender:
        raise ProtocolError(f"{expected.__name__} claims sender '{message.sender}', expected '{sender}'; refused")


def to_dict(message: Message) -> dict[str, Any]:
    """Plain dict (str, int, bytes, numpy arrays, lists, dicts) with ``type`` and ``phase``."""
    out: dict[str, Any] = {"type": type(message).__name__, "phase": message.phase.value}
    for f in dataclasses.fields(message):
        value = getattr(message, f.name)
        if f.name == "advertisements":
            value = [to_dict(a) for a in value]
        elif isinstance(value, tuple):
            value = list(value)
        elif isinstance(value, dict):
            value = dict(sorted(value.items()))
        out[f.name] = value
    return out


def from_dict(data: dict[str, Any]) -> Message:
    """Inverse of :func:`to_dict`; raises :class:`ProtocolError` on any malformed field."""
    if not isinstance(data, dict) or data.get("type") not in _TYPES:
        raise ProtocolError(f"not a secure-aggregation message (type {data.get('type') if isinstance(data, dict) else data!r})")
    cls = _TYPES[data["type"]]
    if data.get("phase") != cls.phase.value:
        raise ProtocolError(f"{cls.__name__} must carry phase '{cls.phase.value}', got {data.get('phase')!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    if set(data) - {"type", "phase"} != names:
        raise ProtocolError(f"{cls.__name__} fields {sorted(set(data) - {'type', 'phase'})} != {sorted(names)}")
    kwargs = {name: _check_field(cls, name, data[name]) for name in names}
    return cls(**kwargs)


def _check_field(cls: type, name: str, value: Any) -> Any:
    def bad(expected: str) -> ProtocolError:
        return ProtocolError(f"{cls.__name__}.{name} must be {expected}, got {type(value).__name__}")

    if name in ("sender", "job_id", "recipient"):
        if not isinstance(value, str) or not value:
            raise bad("a non-empty string")
        return value
    if name == "round":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise bad("a non-negative integer")
        return value
    if name in ("c_public", "s_public", "context", "signature", "roster_signature"):
        if not isinstance(value, (bytes, bytearray)):
            raise bad("bytes")
        return bytes(value)
    if name in ("ciphertexts", "roster_signatures", "attestations", "self_mask_shares", "mask_key_shares"):
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, (bytes, bytearray))
                                                  for k, v in value.items()):
            raise bad("a mapping of site name to bytes")
        return {k: bytes(v) for k, v in value.items()}
    if name in ("survivors", "dropped"):
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
            raise bad("a list of site names")
        return tuple(value)
    if name == "advertisements":
        if not isinstance(value, (list, tuple)):
            raise bad("a list of AdvertiseKeys")
        items = tuple(from_dict(v) for v in value)
        if not all(isinstance(a, AdvertiseKeys) for a in items):
            raise bad("a list of AdvertiseKeys")
        return items
    if name == "masked":
        if not isinstance(value, np.ndarray) or value.ndim != 1 or value.dtype not in (np.uint32, np.uint64):
            raise bad("a 1-D uint32 or uint64 numpy array")
        return value
    raise ProtocolError(f"{cls.__name__} has no field {name!r}")


def to_bytes(message: Message) -> bytes:
    """Canonical byte string: equal messages give equal bytes."""
    arrays: list[np.ndarray] = []

    def encode(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray)):
            return {"b64": base64.b64encode(value).decode("ascii")}
        if isinstance(value, np.ndarray):
            arrays.append(np.ascontiguousarray(value, dtype=value.dtype.newbyteorder("<")))
            return {"array": len(arrays) - 1, "dtype": value.dtype.newbyteorder("<").str, "length": int(value.size)}
        if isinstance(value, dict):
            return {k: encode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [encode(v) for v in value]
        return value

    header = json.dumps(encode(to_dict(message)), sort_keys=True, separators=(",", ":")).encode()
    parts = [_MAGIC, len(header).to_bytes(4, "big"), header]
    parts += [a.tobytes() for a in arrays]
    return b"".join(parts)


def from_bytes(data: bytes | memoryview) -> Message:
    """Inverse of :func:`to_bytes`; arrays are zero-copy views of ``data``."""
    data = memoryview(data)
    if bytes(data[: len(_MAGIC)]) != _MAGIC:
        raise ProtocolError("not a secure-aggregation message (bad magic)")
    start = len(_MAGIC) + 4
    header_len = int.from_bytes(data[len(_MAGIC):start], "big")
    try:
        header = json.loads(bytes(data[start:start + header_len]))
    except ValueError as exc:
        raise ProtocolError(f"malformed message header ({exc})") from exc
    offset = start + header_len

    def decode(value: Any) -> Any:
        nonlocal offset
        if isinstance(value, dict) and set(value) == {"b64"}:
            return base64.b64decode(value["b64"], validate=True)
        if isinstance(value, dict) and set(value) == {"array", "dtype", "length"}:
            dtype = np.dtype(value["dtype"])
            if dtype not in (np.dtype("<u4"), np.dtype("<u8")):
                raise ProtocolError(f"array dtype {dtype} not allowed")
            nbytes = dtype.itemsize * int(value["length"])
            if offset + nbytes > len(data):
                raise ProtocolError("message truncated: array runs past the end")
            array = np.frombuffer(data, dtype=dtype, count=int(value["length"]), offset=offset)
            offset += nbytes
            return array
        if isinstance(value, dict):
            return {k: decode(v) for k, v in value.items()}
        if isinstance(value, list):
            return [decode(v) for v in value]
        return value

    message = from_dict(decode(header))
    if offset != len(data):
        raise ProtocolError(f"{len(data) - offset} trailing bytes after the message")
    return message
