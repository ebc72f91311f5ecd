"""The consortium's member list: which sites may take part in secure aggregation, with which keys.

``members.json`` is written and signed by the project admin's *membership key* (Ed25519,
``ultrafedfm kit membership init``), a key of its own: not a FLARE key, not in FLARE's
provisioning state. It lists each member site by name with role ``site`` and the public half of
the key the site generated itself (``ultrafedfm kit enroll``); the server and admins are never
members. Every change (a site added, a key replaced, a site removed) is a new, higher version,
signed again. The same file goes into every site's and the server's ``local/`` folder.

Sites do not simply trust whoever signs the file: they pin the admin's key and every member's key
on first use and refuse changes until their own IT accepts them (:mod:`ultrafedfm.kit.pins`).

File format (JSON; ``signature`` is over the canonical JSON of every other field)::

    {"format": "ultrafedfm-members/v1", "consortium": "...", "server": "fl.example.org", "version": 3,
     "issued": "2025-01-31T12:00:00+00:00", "admin_key": "<base64 raw Ed25519>",
     "members": [{"name": "hospital-a", "role": "site", "public_key": "<base64>", "fingerprint": "<hex>"}],
     "signature": "<base64>"}
"""
from __future__ import annotations

import base64
import datetime as dt
import json
import logging
import re
import stat
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ultrafedfm.fileio import atomic_write_bytes, atomic_write_json
from ultrafedfm.secagg.errors import MembershipError
from ultrafedfm.secagg.membership import Member, Membership
from ultrafedfm.secagg.signing import (
    PUBLIC_KEY_BYTES, SiteSigningKey, format_fingerprint, key_fingerprint, normalise_fingerprint, verify_signature,
)

_logger = logging.getLogger(__name__)

__all__ = ["ADMIN_KEY_FILE", "MEMBERS_FILE", "EnrollmentRequest", "MemberEntry", "MemberList", "add_member",
           "generate_admin_key", "init_membership", "load_admin_key", "new_member_list", "read_member_list", "remove_member",
           "write_member_list"]

MEMBERS_FILE = "members.json"
ADMIN_KEY_FILE = "membership_admin_key.pem"
_FORMAT = "ultrafedfm-members/v1"
_REQUEST_FORMAT = "ultrafedfm-enrollment/v1"
_SITE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")  # the consortium file's rule: no '@', no spaces


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, *, what: str) -> bytes:
    try:
        return base64.b64decode(str(text), validate=True)
    except ValueError as exc:
        raise MembershipError(f"{what} is not base64 ({exc})") from exc


def _canonical(data: dict[str, Any]) -> bytes:
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


# -- the admin's membership key --------------------------------------------------------------------

def generate_admin_key(path: str | Path) -> Ed25519PrivateKey:
    """Create the project admin's membership key (0600); refuses to overwrite an existing one."""
    path = Path(path)
    if path.exists():
        raise MembershipError(f"{path} already exists; the membership key is created once (sites have pinned it)")
    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()), mode=0o600)
    return key


def load_admin_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    if not path.is_file():
        raise MembershipError(f"no membership key at {path}; `ultrafedfm kit membership init` creates it once")
    if stat.S_IMODE(path.stat().st_mode) & 0o077:
        raise MembershipError(f"{path} is readable by others; run `chmod 600 {path}` (whoever copies it can add "
                              "members)")
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise MembershipError(f"{path} is not an Ed25519 membership key")
    return key


def _public(key: Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


# -- the member list ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class MemberEntry:
    name: str
    public_key: bytes
    role: str = "site"

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)


@dataclass(frozen=True)
class MemberList:
    """A signed member list (what ``members.json`` holds)."""

    consortium: str
    server: str
    version: int
    issued: str
    admin_key: bytes
    members: tuple[MemberEntry, ...]
    signature: bytes = b""

    @property
    def admin_fingerprint(self) -> str:
        return key_fingerprint(self.admin_key)

    def body(self) -> dict[str, Any]:
        return {
            "format": _FORMAT, "consortium": self.consortium, "server": self.server, "version": self.version,
            "issued": self.issued, "admin_key": _b64(self.admin_key),
            "members": [{"name": m.name, "role": m.role, "public_key": _b64(m.public_key),
                         "fingerprint": m.fingerprint} for m in sorted(self.members, key=lambda m: m.name)],
        }

    def signed(self, admin_key: Ed25519PrivateKey) -> "MemberList":
        unsigned = replace(self, admin_key=_public(admin_key), signature=b"")
        return replace(unsigned, signature=admin_key.sign(_canonical(unsigned.body())))

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "signature": _b64(self.signature)}

    def entry(self, name: str) -> MemberEntry | None:
        return next((m for m in self.members if m.name == name), None)

    def to_membership(self) -> Membership:
        """What the protocol checks rosters against (call only after :func:`read_member_list` verified it)."""
        return Membership(self.consortium, self.version, tuple(Member(m.name, m.public_key) for m in self.members))


def _validate(members: tuple[MemberEntry, ...], *, server: str, source: str) -> None:
    names: set[str] = set()
    keys: dict[bytes, str] = {}
    for m in members:
        if m.role != "site":
            raise MembershipError(f"{source}: entry '{m.name}' has role '{m.role}'; only sites can be members (the "
                                  "server and admins never take part in secure aggregation)")
        if not _SITE_NAME.match(m.name):
            raise MembershipError(f"{source}: '{m.name}' is not a site name (letters, digits, '.', '_', '-'); admin "
                                  "accounts and other participants cannot be members")
        if server and m.name == server:
            raise MembershipError(f"{source}: '{m.name}' is the aggregation server's name; the server cannot be a member")
        if m.name in names:
            raise MembershipError(f"{source}: site '{m.name}' is listed twice")
        if len(m.public_key) != PUBLIC_KEY_BYTES:
            raise MembershipError(f"{source}: the key of '{m.name}' is not a raw Ed25519 public key")
        if m.public_key in keys:
            raise MembershipError(f"{source}: '{m.name}' and '{keys[m.public_key]}' have the same key; each site "
                                  "enrols its own")
        names.add(m.name)
        keys[m.public_key] = m.name


def new_member_list(*, consortium: str, server: str, admin_key: Ed25519PrivateKey) -> MemberList:
    """Version 1: no member yet (sites are added as they enrol)."""
    return MemberList(consortium=consortium, server=server, version=1, issued=_now(), admin_key=_public(admin_key),
                      members=()).signed(admin_key)


def write_member_list(path: str | Path, member_list: MemberList) -> Path:
    return atomic_write_json(path, member_list.to_json(), mode=0o644)


def read_member_list(path: str | Path) -> MemberList:
    """Read ``members.json`` and check its format, entries and the admin's signature.

    Whether the admin key and member keys are the ones this site trusts is the pins' job.
    """
    path = Path(path)
    if not path.is_file():
        raise MembershipError(f"no member list at {path}; the project admin sends members.json for the kit's local/ "
                              "folder (`ultrafedfm kit membership add` writes it)")
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise MembershipError(f"{path}: format {data.get('format')!r}, expected {_FORMAT!r}")
        members = tuple(MemberEntry(name=str(m["name"]), role=str(m["role"]),
                                    public_key=_unb64(m["public_key"], what=f"{path}: key of {m.get('name')!r}"))
                        for m in data["members"])
        ml = MemberList(consortium=str(data["consortium"]), server=str(data["server"]), version=int(data["version"]),
                        issued=str(data["issued"]), admin_key=_unb64(data["admin_key"], what=f"{path}: admin_key"),
                        members=members, signature=_unb64(data["signature"], what=f"{path}: signature"))
        stated = {str(m["name"]): str(m["fingerprint"]) for m in data["members"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        if isinstance(exc, MembershipError):
            raise
        raise MembershipError(f"{path} is not a member list ({exc}); ask the project admin for the file again") from exc
    if len(ml.admin_key) != PUBLIC_KEY_BYTES or not verify_signature(ml.admin_key, _canonical(ml.body()), ml.signature):
        raise MembershipError(f"{path}: the admin's signature does not verify; the file was altered or is not from the "
                              "project admin. Do not use it; ask the admin for the file again")
    _validate(ml.members, server=ml.server, source=str(path))
    for m in ml.members:
        if stated[m.name] != m.fingerprint:
            raise MembershipError(f"{path}: the fingerprint shown for '{m.name}' is not its key's")
    if ml.version < 1:
        raise MembershipError(f"{path}: version {ml.version} must be at least 1")
    return ml


# -- enrollment (site -> admin) and the admin's changes -------------------------------------------

@dataclass(frozen=True)
class EnrollmentRequest:
    """What a site sends the admin: its name and public key, signed with that key (proof of possession)."""

    consortium: str
    site: str
    public_key: bytes
    created: str
    signature: bytes = b""

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    def _payload(self) -> bytes:
        return _canonical({"format": _REQUEST_FORMAT, "consortium": self.consortium, "site": self.site,
                           "public_key": _b64(self.public_key), "created": self.created})

    @classmethod
    def create(cls, *, consortium: str, key: SiteSigningKey) -> "EnrollmentRequest":
        request = cls(consortium=consortium, site=key.site, public_key=key.public_key, created=_now())
        return replace(request, signature=key.sign(request._payload()))

    def to_json(self) -> dict[str, Any]:
        return {"format": _REQUEST_FORMAT, "consortium": self.consortium, "site": self.site,
                "public_key": _b64(self.public_key), "fingerprint": self.fingerprint, "created": self.created,
                "signature": _b64(self.signature)}

    @classmethod
    def read(cls, path: str | Path) -> "EnrollmentRequest":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
            if data.get("format") != _REQUEST_FORMAT:
                raise ValueError(f"format {data.get('format')!r}")
            request = cls(consortium=str(data["consortium"]), site=str(data["site"]),
                          public_key=_unb64(data["public_key"], what=f"{path}: public_key"), created=str(data["created"]),
                          signature=_unb64(data["signature"], what=f"{path}: signature"))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise MembershipError(f"{path} is not an enrollment request ({exc}); ask the site to run "
                                  "`ultrafedfm kit enroll` and send the file it writes") from exc
        if len(request.public_key) != PUBLIC_KEY_BYTES or not verify_signature(
                request.public_key, request._payload(), request.signature):
            raise MembershipError(f"{path}: not signed by the key it carries; ask the site to run `kit enroll` again")
        return request


def add_member(current: MemberList, request: EnrollmentRequest, *, confirmed_fingerprint: str,
               admin_key: Ed25519PrivateKey, replace_key: bool = False) -> MemberList:
    """A new version of ``current`` with the requesting site enrolled.

    ``confirmed_fingerprint`` is the fingerprint the site's IT read to the admin out of band (by
    phone, in person); it must match the request, which travelled by e-mail or file transfer.
    """
    try:
        confirmed = normalise_fingerprint(confirmed_fingerprint)
    except ValueError as exc:
        raise MembershipError(str(exc)) from None
    if confirmed != request.fingerprint:
        raise MembershipError(
            f"the fingerprint confirmed by the site ({format_fingerprint(confirmed)}) is not the one in the enrollment "
            f"file for '{request.site}' ({format_fingerprint(request.fingerprint)}): the file may have been swapped "
            "in transit. Do not enrol it; call the site's IT back")
    if request.consortium != current.consortium:
        raise MembershipError(f"the request is for consortium '{request.consortium}', this list is "
                              f"'{current.consortium}'")
    existing = current.entry(request.site)
    if existing is not None and not replace_key:
        raise MembershipError(f"'{request.site}' is already a member with key {format_fingerprint(existing.fingerprint)}"
                              "; to replace it (a site that lost or regenerated its key) use --replace: every other "
                              "site's IT must then accept the new key")
    others = tuple(m for m in current.members if m.name != request.site)
    members = (*others, MemberEntry(name=request.site, public_key=request.public_key))
    _validate(members, server=current.server, source="the new member list")
    return replace(current, version=current.version + 1, issued=_now(), members=members).signed(admin_key)


def remove_member(current: MemberList, name: str, *, admin_key: Ed25519PrivateKey) -> MemberList:
    if current.entry(name) is None:
        raise MembershipError(f"'{name}' is not a member of '{current.consortium}'")
    members = tuple(m for m in current.members if m.name != name)
    return replace(current, version=current.version + 1, issued=_now(), members=members).signed(admin_key)


def init_membership(folder: str | Path, *, consortium: str, server: str,
                    key_path: str | Path | None = None) -> tuple[Path, Path]:
    """Create the admin's membership key and version 1 of ``members.json`` (no members yet) in ``folder``.

    Returns (key path, members path). ``key_path`` may point elsewhere (e.g. removable media): whoever
    holds the key can add members.
    """
    folder = Path(folder)
    key_path = Path(key_path) if key_path is not None else folder / ADMIN_KEY_FILE
    members_path = folder / MEMBERS_FILE
    if members_path.exists():
        raise MembershipError(f"{members_path} already exists; the member list is created once, then changed with "
                              "`ultrafedfm kit membership add/remove`")
    key = generate_admin_key(key_path)
    write_member_list(members_path, new_member_list(consortium=consortium, server=server, admin_key=key))
    return key_path, members_path
