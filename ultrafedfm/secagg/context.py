"""What a round trains from, bound into every site's signature: model hash, lr, training settings.

The server announces the round's :class:`RoundContext` with the key-advertisement task; each
site signs its digest together with its round keys (and the secure-aggregation settings and
member list it runs with), and checks that every peer signed the same digest. The site later
hashes the weights that actually arrive with the training task and refuses to send its input if
they are not the announced model. So a server cannot send different sites different models
(or learning rates, or settings) without every site noticing.

``model_digest`` hashes named arrays in sorted-name order (name, dtype, shape, little-endian
bytes), the same layout as :func:`~ultrafedfm.secagg.vectors.flatten_arrays`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from ultrafedfm.secagg.errors import ProtocolError
from ultrafedfm.secagg.masks import length_prefixed

_logger = logging.getLogger(__name__)

__all__ = ["RoundContext", "model_digest"]


def model_digest(arrays: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of a model's named arrays: names, dtypes, shapes and values, in sorted-name order."""
    digest = hashlib.sha256(b"ultrafedfm-secagg/v2/model")
    for name in sorted(arrays):
        array = np.asarray(arrays[name])
        little = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<"))
        header = json.dumps([name, little.dtype.str, list(array.shape)], separators=(",", ":")).encode()
        digest.update(len(header).to_bytes(4, "big") + header)
        digest.update(memoryview(little.reshape(-1)).cast("B"))
    return digest.hexdigest()


def _numbers_as_floats(value: Any) -> Any:
    # 2 and 2.0 mean the same setting; a serialiser that turns one into the other must not split sites.
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, Mapping):
        return {str(k): _numbers_as_floats(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_numbers_as_floats(v) for v in value]
    return value


def _canonical(value: Any, *, what: str) -> bytes:
    try:
        return json.dumps(_numbers_as_floats(value), sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise ProtocolError(f"{what} must be plain JSON (numbers, strings, lists, mappings) to be signed: {exc}") \
            from exc


@dataclass(frozen=True)
class RoundContext:
    """The global model (its :func:`model_digest`), learning rate and training settings of one round.

    Args:
        model_sha256: hex digest of the global weights the round trains from.
        lr: the round's learning rate.
        training: the job's training settings sent with the task (plain JSON values).
    """

    model_sha256: str
    lr: float
    training: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.model_sha256) != 64 or any(c not in "0123456789abcdef" for c in self.model_sha256):
            raise ProtocolError(f"round context: model_sha256 must be 64 lowercase hex digits, got "
                                f"{self.model_sha256!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not math.isfinite(self.lr):
            raise ProtocolError(f"round context: lr must be a finite number, got {self.lr!r}")
        object.__setattr__(self, "lr", float(self.lr))
        _canonical(dict(self.training), what="round context: training")

    def to_mapping(self) -> dict[str, Any]:
        """What the server puts in each secure-aggregation task (JSON-able)."""
        return {"model_sha256": self.model_sha256, "lr": self.lr, "training": dict(self.training)}

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "RoundContext":
        if not isinstance(data, Mapping) or set(data) != {"model_sha256", "lr", "training"}:
            raise ProtocolError("round context must be a mapping with exactly model_sha256, lr and training, got "
                                f"{sorted(data) if isinstance(data, Mapping) else type(data).__name__}")
        return cls(model_sha256=data["model_sha256"], lr=data["lr"], training=dict(data["training"]))

    def digest(self, *, config: Any, membership_digest: bytes) -> bytes:
        """32 bytes binding this context, the ``SecAggConfig`` and the member list a party runs with."""
        settings = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
        return hashlib.sha256(length_prefixed(
            b"ultrafedfm-secagg/v2/round-context", self.model_sha256.encode(), repr(self.lr).encode(),
            _canonical(dict(self.training), what="training"), _canonical(settings, what="secagg settings"),
            membership_digest)).digest()

    def describe(self) -> str:
        return f"model {self.model_sha256[:16]}..., lr {self.lr!r}"
