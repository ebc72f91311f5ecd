"""Secure aggregation (Bonawitz et al., CCS 2017): the server learns only the sum of the sites' updates.

Framework-free: pure message-in/message-out state machines (:class:`SecAggClient` per site,
:class:`SecAggServer`), messages that serialise to bytes or dicts of numpy arrays, no
networking and no FLARE imports. See docs/secure-aggregation.md for the protocol, the threat
model, the ring-size bound and the parameters; :func:`simulate_round` drives a whole round in
one process.
"""
import logging

from ultrafedfm.secagg.client import SecAggClient
from ultrafedfm.secagg.errors import (
    AuthenticationError, IdentityError, ProtocolError, RoundAborted, SecAggError, ShareRequestRefused,
)
from ultrafedfm.secagg.identity import SiteIdentity, load_certificate
from ultrafedfm.secagg.messages import (
    AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, Phase, ShareDelivery, SurvivorList, SurvivorSignature,
    UnmaskRequest, UnmaskResponse, from_bytes, from_dict, to_bytes, to_dict,
)
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.server import AggregateResult, SecAggServer
from ultrafedfm.secagg.simulation import RoundReport, simulate_round
from ultrafedfm.secagg.vectors import ArrayLayout, flatten_arrays, unflatten_arrays

_logger = logging.getLogger(__name__)

__all__ = [
    "AdvertiseKeys", "AggregateResult", "ArrayLayout", "AuthenticationError", "EncryptedShares", "IdentityError", "KeyRoster",
    "MaskedInput", "Phase", "ProtocolError", "RoundAborted", "RoundReport", "SecAggClient", "SecAggConfig",
    "SecAggError", "SecAggServer", "ShareDelivery", "ShareRequestRefused", "SiteIdentity", "SurvivorList", "SurvivorSignature", "UnmaskRequest",
    "UnmaskResponse", "flatten_arrays", "from_bytes", "from_dict", "load_certificate", "simulate_round", "to_bytes",
    "to_dict", "unflatten_arrays",
]
