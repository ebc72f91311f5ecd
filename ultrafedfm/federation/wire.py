"""How secure-aggregation messages travel in a task's params: as uint8 arrays beside (or instead of) weights.

The jobs exchange parameters as NumPy on both sides (FLARE's ``ExchangeFormat.NUMPY``), so the
transport passes ``params`` through untouched.
A protocol message is its canonical ``ultrafedfm.secagg.to_bytes`` serialisation viewed as a
``uint8`` array under :data:`SECAGG_KEY`; the masked ``uint32`` vector travels inside those
bytes, so it arrives bit-exact. Per-site messages from the server (the share deliveries) go to
every site in one task under ``SECAGG_KEY + "/" + site``: they are AES-GCM ciphertexts only the
addressed site can open. The round context the sites sign (model hash, lr, training settings)
travels in the key-advertisement task's meta under :data:`ROUND_CONTEXT_KEY`. No FLARE import:
the site and the server share this module.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ultrafedfm.secagg import from_bytes, to_bytes
from ultrafedfm.secagg.errors import ProtocolError
from ultrafedfm.secagg.messages import Message

_logger = logging.getLogger(__name__)

__all__ = ["ROUND_CONTEXT_KEY", "SECAGG_KEY", "message_from_params", "message_to_array", "site_key", "split_params"]

SECAGG_KEY = "__secagg__"
ROUND_CONTEXT_KEY = "round_context"


def site_key(site: str) -> str:
    """The params key of a message addressed to one site."""
    return f"{SECAGG_KEY}/{site}"


def message_to_array(message: Message) -> np.ndarray:
    """The message's canonical bytes as a uint8 array (what FLARE carries)."""
    return np.frombuffer(to_bytes(message), dtype=np.uint8)


def message_from_params(params: Mapping[str, Any] | None, key: str = SECAGG_KEY) -> Message:
    """Parse the message under ``key``; a missing or non-uint8 entry is a :class:`ProtocolError`."""
    value = (params or {}).get(key)
    if value is None:
        raise ProtocolError(f"no secure-aggregation message under '{key}' in the task data")
    array = np.asarray(value)
    if array.dtype != np.uint8 or array.ndim != 1:
        raise ProtocolError(f"secure-aggregation message under '{key}' is {array.dtype}{list(array.shape)}, "
                            "expected a 1-D uint8 array (was the job exported with a NUMPY exchange?)")
    return from_bytes(memoryview(np.ascontiguousarray(array)))


def split_params(params: Mapping[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model weights, secure-aggregation entries) of a task's params."""
    weights, secagg = {}, {}
    for name, value in (params or {}).items():
        (secagg if name.startswith(SECAGG_KEY) else weights)[name] = value
    return weights, secagg
