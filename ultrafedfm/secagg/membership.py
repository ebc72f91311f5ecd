"""The consortium's member sites and their pinned signing keys: who may be in a roster, and how many.

A :class:`Membership` is what a site (or the server) has verified from its own kit: the
admin-signed member list, checked against the keys the site pinned on first use
(``ultrafedfm.kit.membership`` reads, verifies and pins the file). The protocol then:

- accepts a key advertisement only from a member, signed with that member's pinned key
  (a FLARE certificate, however validly issued, proves nothing here);
- takes the Shamir threshold ``t`` as a strict majority of the *consortium* (never of the
  roster the server assembled), and refuses rosters and survivor sets smaller than
  ``max(t, config.min_sites, the site's own floor)``;
- binds :attr:`Membership.digest` into what every site signs, so all sites of a round use the
  same member list (and therefore the same ``t``).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from typing import Iterable

from ultrafedfm.secagg.errors import IdentityError, MembershipError
from ultrafedfm.secagg.masks import length_prefixed
from ultrafedfm.secagg.params import SecAggConfig
from ultrafedfm.secagg.signing import PUBLIC_KEY_BYTES, key_fingerprint, verify_signature

_logger = logging.getLogger(__name__)

__all__ = ["Member", "Membership"]

MEMBER_ROLE = "site"


@dataclass(frozen=True)
class Member:
    """One member site: its name (as in FLARE) and its site-generated Ed25519 public key."""

    name: str
    public_key: bytes

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)


@dataclass(frozen=True)
class Membership:
    """The verified member list of a consortium (sites only; the server and admins are never members)."""

    consortium: str
    version: int
    members: tuple[Member, ...]
    digest: bytes = field(init=False, repr=False)

    def __post_init__(self) -> None:
        members = tuple(sorted(self.members, key=lambda m: m.name))
        if not members:
            raise MembershipError(f"the member list of consortium '{self.consortium}' (version {self.version}) "
                                  "has no member sites; enrol the sites first (`ultrafedfm kit membership add`)")
        names = [m.name for m in members]
        keys = [m.public_key for m in members]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise MembershipError(f"member list of '{self.consortium}' names {dup} twice")
        if any(len(k) != PUBLIC_KEY_BYTES for k in keys):
            raise MembershipError(f"member list of '{self.consortium}' holds a key that is not a raw Ed25519 key")
        if len(set(keys)) != len(keys):
            shared = sorted(m.name for m in members if keys.count(m.public_key) > 1)
            raise MembershipError(f"member list of '{self.consortium}': sites {shared} share one signing key; "
                                  "each site must enrol its own key")
        object.__setattr__(self, "members", members)
        body = length_prefixed(b"ultrafedfm-secagg/v2/members", self.consortium.encode(),
                               self.version.to_bytes(8, "big"),
                               *(length_prefixed(m.name.encode(), m.public_key) for m in members))
        object.__setattr__(self, "digest", hashlib.sha256(body).digest())

    @classmethod
    def of(cls, consortium: str, version: int, keys: dict[str, bytes]) -> "Membership":
        """Build from ``{site name: raw public key}`` (the kit layer, tests, simulation)."""
        return cls(consortium, version, tuple(Member(n, k) for n, k in keys.items()))

    @property
    def size(self) -> int:
        return len(self.members)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.members)

    def key_of(self, site: str) -> bytes:
        """The pinned key of ``site``; :class:`IdentityError` for anyone who is not a member site."""
        for m in self.members:
            if m.name == site:
                return m.public_key
        raise IdentityError(f"'{site}' is not a member site of consortium '{self.consortium}' (member list version "
                            f"{self.version}: {', '.join(self.names)}); its keys are refused. The server, admins and "
                            "any certificate outside the member list can never take part as a site")

    def verify(self, site: str, data: bytes, signature: bytes, *, what: str) -> None:
        """Check ``signature`` over ``data`` by ``site``'s pinned key, naming ``what`` was signed."""
        if not verify_signature(self.key_of(site), data, signature):
            raise IdentityError(f"the signature of site '{site}' over {what} does not verify with the key the member "
                                f"list pins for it ({key_fingerprint(self.key_of(site))[:16]}...): the message was "
                                "altered, or signed with another key (e.g. a FLARE certificate key); refused")

    def threshold(self, config: SecAggConfig) -> int:
        """Shamir threshold t: a strict majority of the consortium (or the job's higher threshold)."""
        return config.threshold_for(self.size)

    def minimum_sites(self, config: SecAggConfig, site_floor: int = 0) -> int:
        """Fewest sites a roster, a key-sharing set and a survivor set may have."""
        return max(self.threshold(config), config.min_sites, site_floor)

    def check_names(self, names: Iterable[str]) -> None:
        for name in names:
            self.key_of(name)
