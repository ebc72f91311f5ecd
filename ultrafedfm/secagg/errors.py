"""Errors raised by the secure-aggregation protocol.

Every error says which site, phase or key was at fault and what to do, so that the FLARE
adapter can log it and abort the round without ever falling back to plaintext.
"""
from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

__all__ = [
    "AuthenticationError",
    "ContributionRefused",
    "IdentityError",
    "MembershipError",
    "ProtocolError",
    "RoundAborted",
    "SecAggError",
    "ShareRequestRefused",
]


class SecAggError(Exception):
    """Base class: the secure-aggregation round cannot go on as asked."""


class ProtocolError(SecAggError):
    """A message is out of place: wrong job, round or phase, a replay, or malformed."""


class IdentityError(SecAggError):
    """A key or signature does not check out: not a consortium member, not the member's pinned key."""


class MembershipError(IdentityError):
    """The consortium's member list is missing, unsigned, rolled back, or differs from the site's pins."""


class ContributionRefused(SecAggError):
    """The site will not contribute: it would let the server difference two sums, or the server
    announced one model / round setting and sent another. Its ledger names what it contributed to."""


class AuthenticationError(SecAggError):
    """An encrypted share failed AES-GCM authentication (tampered or misaddressed).

    ``sender`` names the site whose ciphertext failed.
    """

    def __init__(self, message: str, *, sender: str):
        super().__init__(message)
        self.sender = sender


class ShareRequestRefused(SecAggError):
    """The server asked for a share that would reveal a site's update (both shares of one peer).

    ``peer`` names the site whose secrets the request would have exposed.
    """

    def __init__(self, message: str, *, peer: str):
        super().__init__(message)
        self.peer = peer


class RoundAborted(SecAggError):
    """Too few sites are left to aggregate or unmask; nothing about any one site was revealed."""
