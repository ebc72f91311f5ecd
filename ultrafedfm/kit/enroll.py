"""A site's secure-aggregation material: enrolling its key, and loading key, member list and ledger.

Hospital IT, once per site::

    ultrafedfm kit enroll --kit KIT     # creates local/secagg_site_key.pem (0600) if absent, writes
                                        # local/secagg_enrollment.json and prints the fingerprint

IT sends the enrollment file to the project admin (e-mail is fine: it holds only the public key)
and reads the fingerprint to the admin by phone; the admin enrols it
(``ultrafedfm kit membership add``) and sends every site the new ``members.json`` for ``local/``.

At run time a site loads everything with :func:`open_site` (its signing key, the member list
verified against its pins, its contribution ledger); the server loads the member list with
:func:`load_server_membership`. ``kit check`` prints :func:`membership_check`'s lines, so that
hospitals can compare every member's fingerprint out of band.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ultrafedfm.fileio import atomic_write_json
from ultrafedfm.kit.membership import MEMBERS_FILE, EnrollmentRequest, MemberList, read_member_list
from ultrafedfm.kit.pins import PINS_FILE, PinStore
from ultrafedfm.kit.site_key import SITE_KEY_FILE, ensure_site_key, load_site_key
from ultrafedfm.secagg.contribution import ContributionLedger
from ultrafedfm.secagg.errors import IdentityError, MembershipError, SecAggError
from ultrafedfm.secagg.membership import Membership
from ultrafedfm.secagg.params import majority_threshold
from ultrafedfm.secagg.signing import SiteSigningKey, format_fingerprint

_logger = logging.getLogger(__name__)

__all__ = ["ENROLLMENT_FILE", "LEDGER_FILE", "Enrollment", "SiteFiles", "SiteMaterial", "enroll_site",
           "kit_consortium", "kit_site_name", "load_server_membership", "load_site_membership", "membership_check",
           "open_site"]

ENROLLMENT_FILE = "secagg_enrollment.json"
LEDGER_FILE = "secagg_ledger.json"


def kit_site_name(kit: Path) -> str:
    """The site's name from its FLARE kit (``startup/fed_client.json``)."""
    path = Path(kit) / "startup" / "fed_client.json"
    try:
        return str(json.loads(path.read_text())["client"]["fqsn"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MembershipError(f"{path} unreadable ({exc}); is {kit} an unpacked site kit?") from exc


def kit_consortium(kit: Path) -> tuple[str | None, str | None]:
    """(consortium name, server host) from the kit's ``local/consortium.json``, or (None, None)."""
    path = Path(kit) / "local" / "consortium.json"
    if not path.is_file():
        return None, None
    data = json.loads(path.read_text())
    return data.get("consortium"), (data.get("server") or {}).get("host")


@dataclass(frozen=True)
class SiteFiles:
    """Where a site keeps its secure-aggregation files (its kit's ``local/`` folder)."""

    site: str
    signing_key: Path
    members: Path
    pins: Path
    ledger: Path

    @classmethod
    def in_folder(cls, folder: str | Path, *, site: str) -> "SiteFiles":
        folder = Path(folder)
        return cls(site=site, signing_key=folder / SITE_KEY_FILE, members=folder / MEMBERS_FILE,
                   pins=folder / PINS_FILE, ledger=folder / LEDGER_FILE)

    @classmethod
    def in_kit(cls, kit: str | Path) -> "SiteFiles":
        return cls.in_folder(Path(kit) / "local", site=kit_site_name(Path(kit)))


@dataclass(frozen=True)
class SiteMaterial:
    """What a site's secure-aggregation client needs, loaded and checked (one per site process)."""

    signer: SiteSigningKey
    members: Membership
    ledger: ContributionLedger


def load_site_membership(files: SiteFiles, *, consortium: str | None = None, server: str | None = None,
                         auto_pin_new: bool = True) -> Membership:
    """The member list in ``files.members``, verified (admin signature, entries) and checked against the pins.

    First use pins the admin key and every member; later, new members are pinned (logged) unless
    ``auto_pin_new`` is off; a changed admin key, a changed member key or a rollback raise
    :class:`MembershipError` until the site's IT accepts them.
    """
    member_list = read_member_list(files.members)
    _check_identity(member_list, files, consortium=consortium, server=server)
    PinStore(files.pins).check(member_list, site=files.site, auto_pin_new=auto_pin_new)
    return member_list.to_membership()


def _check_identity(member_list: MemberList, files: SiteFiles, *, consortium: str | None, server: str | None) -> None:
    if consortium is not None and member_list.consortium != consortium:
        raise MembershipError(f"{files.members} is the member list of '{member_list.consortium}', this kit belongs to "
                              f"'{consortium}'")
    if server and member_list.entry(server) is not None:
        raise MembershipError(f"{files.members} lists the aggregation server '{server}' as a member; refused")
    if member_list.entry(files.site) is None:
        raise MembershipError(f"site '{files.site}' is not in the member list {files.members} (version "
                              f"{member_list.version}); run `ultrafedfm kit enroll` and have the project admin enrol "
                              "this site, then install the new members.json")


def open_site(files: SiteFiles, *, consortium: str | None = None, server: str | None = None,
              auto_pin_new: bool = True) -> SiteMaterial:
    """Load the site's signing key, verified member list and ledger; any problem raises naming the file."""
    signer = load_site_key(files.signing_key, site=files.site)
    members = load_site_membership(files, consortium=consortium, server=server, auto_pin_new=auto_pin_new)
    if members.key_of(files.site) != signer.public_key:
        raise IdentityError(f"site '{files.site}': the member list enrols key "
                            f"{format_fingerprint(members.members[members.names.index(files.site)].fingerprint)}, "
                            f"but {files.signing_key} holds {format_fingerprint(signer.fingerprint)}; run `ultrafedfm "
                            "kit enroll` and have the admin enrol this site's current key")
    return SiteMaterial(signer=signer, members=members, ledger=ContributionLedger.open(files.ledger))


def load_server_membership(path: str | Path, *, consortium: str | None = None) -> Membership:
    """The member list for the server (``local/members.json`` of its kit): signature and entries checked.

    The server pins nothing: each site enforces membership on its own; the server uses the list
    to drop non-members early and to size rounds like the sites do.
    """
    member_list = read_member_list(path)
    if consortium is not None and member_list.consortium != consortium:
        raise MembershipError(f"{path} is the member list of '{member_list.consortium}', not '{consortium}'")
    return member_list.to_membership()


@dataclass(frozen=True)
class Enrollment:
    site: str
    fingerprint: str
    created_key: bool
    request: Path
    lines: tuple[str, ...]


def enroll_site(kit: str | Path) -> Enrollment:
    """Create the site's key if needed and write its enrollment request; the lines say what IT does next."""
    kit = Path(kit)
    files = SiteFiles.in_kit(kit)
    consortium, _ = kit_consortium(kit)
    key, created = ensure_site_key(files.signing_key, site=files.site)
    request = EnrollmentRequest.create(consortium=consortium or "", key=key)
    path = atomic_write_json(files.signing_key.parent / ENROLLMENT_FILE, request.to_json(), mode=0o644)
    lines = (
        f"site:        {files.site} (consortium {consortium or '?'})",
        f"signing key: {files.signing_key} ({'created now' if created else 'already there, unchanged'}; never send it)",
        f"fingerprint: {format_fingerprint(key.fingerprint)}",
        "",
        "Next steps for IT:",
        f"  1. send {path} to the project admin (it holds only the public key);",
        "  2. read the fingerprint above to the project admin by phone or in person;",
        f"  3. put the members.json the admin sends back into {files.members.parent}/ and run `ultrafedfm kit check`.",
    )
    return Enrollment(site=files.site, fingerprint=key.fingerprint, created_key=created, request=path, lines=lines)


def membership_check(kit: str | Path) -> tuple[bool, list[str]]:
    """For ``kit check``: (ok, lines) -- this site's key, the member list and every member's fingerprint.

    Reads only: nothing is pinned or written here (the site pins at its first round).
    """
    kit = Path(kit)
    try:
        files = SiteFiles.in_kit(kit)
    except SecAggError as exc:
        return False, [str(exc)]
    lines: list[str] = []
    ok = True
    try:
        key = load_site_key(files.signing_key, site=files.site)
        lines.append(f"this site's signing key: {format_fingerprint(key.fingerprint)} ({files.signing_key})")
    except SecAggError as exc:
        key, ok = None, False
        lines.append(str(exc))
    consortium, server = kit_consortium(kit)
    try:
        member_list = read_member_list(files.members)
        _check_identity(member_list, files, consortium=consortium, server=server)
    except SecAggError as exc:
        return False, [*lines, str(exc)]
    try:
        pins = PinStore(files.pins)
    except SecAggError as exc:
        return False, [*lines, str(exc)]
    found = pins.compare(member_list)
    n = len(member_list.members)
    lines.append(f"member list v{member_list.version} of '{member_list.consortium}', {n} member sites (threshold "
                 f"t = {majority_threshold(n)}), signed by admin key {format_fingerprint(member_list.admin_fingerprint)}"
                 + ("  CHANGED: not the pinned admin key" if found.admin_changed else ""))
    for m in member_list.members:
        notes = []
        if m.name == files.site:
            notes.append("this site")
            if key is not None and key.public_key != m.public_key:
                notes.append("NOT this site's key: enrol again")
                ok = False
        if m.name in found.changed:
            notes.append("CHANGED since pinned: accept only after a phone check")
        elif m.name in found.new:
            notes.append("not pinned yet: pinned at this site's next round")
        lines.append(f"  {m.name:24s} {format_fingerprint(m.fingerprint)}" + (f"  ({'; '.join(notes)})" if notes else ""))
    if found.admin_changed or found.changed or found.rollback:
        ok = False
        if found.rollback:
            lines.append(f"member list version {member_list.version} is older than the pinned version {pins.version}")
    lines.append("Compare these fingerprints with each hospital and the project admin by phone or in person.")
    return ok, lines
