"""Secure aggregation (Bonawitz et al., CCS 2017): the server learns only the sum of the sites' updates.

Framework-free: pure message-in/message-out state machines (:class:`SecAggClient` per site,
:class:`SecAggServer`), messages that serialise to bytes or dicts of numpy arrays, no
networking and no FLARE imports. Who may take part is the consortium's pinned member list
(:class:`Membership`, verified by ``ultrafedfm.kit.membership``); each site signs with its own
:class:`SiteSigningKey`, binds the round's :class:`RoundContext` into its signature and keeps a
:class:`ContributionLedger`. See docs/secure-aggregation.md for the protocol, the trust model,
the ring-size bound and the parameters; :func:`simulate_round` drives a whole round in one process.
"""
import logging

from ultrafedfm.secagg.client import SecAggClient
from ultrafedfm.secagg.context import RoundContext, model_digest
from ultrafedfm.secagg.contribution import ContributionLedger, fresh_training_seed
from ultrafedfm.secagg.errors import (
    AuthenticationError, ContributionRefused, IdentityError, MembershipError, ProtocolError, RoundAborted, SecAggError,
    ShareRequestRefused,
)
from ultrafedfm.secagg.figures import AggregateFigures, RoundFigures
from ultrafedfm.secagg.identity import SiteIdentity, load_certificate
from ultrafedfm.secagg.membership import Member, Membership
from ultrafedfm.secagg.messages import (
    AdvertiseKeys, EncryptedShares, KeyRoster, MaskedInput, Phase, ShareDelivery, SurvivorList, SurvivorSignature,
    UnmaskRequest, UnmaskResponse, from_bytes, from_dict, to_bytes, to_dict,
)
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.server import AggregateResult, SecAggServer
from ultrafedfm.secagg.signing import SiteSigningKey, format_fingerprint, key_fingerprint
from ultrafedfm.secagg.simulation import RoundReport, simulate_round
from ultrafedfm.secagg.vectors import ArrayLayout, flatten_arrays, unflatten_arrays

_logger = logging.getLogger(__name__)

__all__ = [
    "AdvertiseKeys", "AggregateFigures", "AggregateResult", "ArrayLayout", "AuthenticationError", "ContributionLedger",
    "ContributionRefused", "EncryptedShares", "IdentityError", "KeyRoster", "MaskedInput", "Member", "Membership",
    "MembershipError", "Phase", "ProtocolError", "RoundAborted", "RoundContext", "RoundFigures", "RoundReport",
    "SecAggClient", "SecAggConfig", "SecAggError", "SecAggServer", "ShareDelivery", "ShareRequestRefused",
    "SiteIdentity", "SiteSigningKey", "SurvivorList", "SurvivorSignature", "UnmaskRequest", "UnmaskResponse",
    "flatten_arrays", "format_fingerprint", "fresh_training_seed", "from_bytes", "from_dict", "key_fingerprint",
    "load_certificate", "model_digest", "simulate_round", "to_bytes", "to_dict", "unflatten_arrays",
]
