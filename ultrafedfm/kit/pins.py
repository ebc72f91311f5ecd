"""Trust on first use: the keys a site has pinned, and what its own IT must accept before they change.

Whoever holds the admin's membership key (and FLARE's provisioning workspace) could sign a member
list that swaps a hospital's key for one of their own. So each site keeps, on its own disk
(``local/secagg_pins.json``), the admin key and every member key it has seen, and:

- pins the admin key and all members the first time it reads a member list;
- pins members that appear in a later (higher) version -- logged with their fingerprint, and
  shown by ``kit check`` -- unless the site asks to accept new members by hand;
- refuses a list signed by another admin key, a changed key for a pinned member, and a
  lower version than it has seen (a rollback), until the site's IT accepts the change with
  ``ultrafedfm kit members --accept-site NAME --fingerprint FP`` (or ``--accept-admin FP``)
  after comparing the fingerprint with that site (or the admin) by phone or in person.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ultrafedfm.fileio import atomic_write_json
from ultrafedfm.kit.membership import MemberList
from ultrafedfm.secagg.errors import MembershipError
from ultrafedfm.secagg.signing import format_fingerprint, normalise_fingerprint

_logger = logging.getLogger(__name__)

__all__ = ["PINS_FILE", "PinCheck", "PinStore"]

PINS_FILE = "secagg_pins.json"
_FORMAT = "ultrafedfm-pins/v1"
_HISTORY = 200  # events kept (the latest)


@dataclass
class PinCheck:
    """What checking a member list against the pins found (nothing is refused here; see :meth:`PinStore.check`)."""

    first_use: bool = False
    admin_changed: bool = False
    rollback: bool = False
    new: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)


class PinStore:
    """The pinned keys of one site (a JSON file it alone writes)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.admin: str | None = None
        self.members: dict[str, str] = {}
        self.version = 0
        self.history: list[dict[str, Any]] = []
        if self.path.exists():
            try:
                data = json.loads(self.path.read_text())
                if data.get("format") != _FORMAT:
                    raise ValueError(f"format {data.get('format')!r}")
                self.admin = data["admin"]
                self.members = {str(k): str(v) for k, v in data["members"].items()}
                self.version = int(data["version"])
                self.history = list(data.get("history", []))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise MembershipError(f"pinned keys {self.path} are unreadable ({exc}); restore the file from backup "
                                      "(deleting it re-pins whatever member list comes next)") from exc

    def compare(self, member_list: MemberList) -> PinCheck:
        """Compare without changing anything."""
        if self.admin is None:
            return PinCheck(first_use=True, new=[m.name for m in member_list.members])
        return PinCheck(
            admin_changed=member_list.admin_fingerprint != self.admin,
            rollback=member_list.version < self.version,
            new=[m.name for m in member_list.members if m.name not in self.members],
            changed=[m.name for m in member_list.members if m.name in self.members
                     and self.members[m.name] != m.fingerprint],
        )

    def check(self, member_list: MemberList, *, site: str, auto_pin_new: bool = True) -> PinCheck:
        """Refuse what the site's IT has not accepted; pin first-use and (by default) new members."""
        found = self.compare(member_list)
        if found.admin_changed:
            raise MembershipError(
                f"site '{site}': the member list is signed by admin key {format_fingerprint(member_list.admin_fingerprint)}"
                f", but this site pinned {format_fingerprint(self.admin or '0' * 64)}. Refused until this site's IT "
                "confirms the new key with the project admin by phone and runs `ultrafedfm kit members --accept-admin "
                "<fingerprint>`")
        if found.rollback:
            raise MembershipError(f"site '{site}': member list version {member_list.version} is older than version "
                                  f"{self.version} this site already used (a rollback); use the newest members.json")
        if found.changed:
            lines = "; ".join(f"{n}: pinned {format_fingerprint(self.members[n])}, now "
                              f"{format_fingerprint(member_list.entry(n).fingerprint)}" for n in found.changed)
            raise MembershipError(
                f"site '{site}': the member list changes the key of {found.changed} ({lines}). Refused until this "
                "site's IT has compared the new fingerprint with that site by phone and runs `ultrafedfm kit members "
                "--accept-site NAME --fingerprint <new fingerprint>`")
        if found.new and not found.first_use and not auto_pin_new:
            raise MembershipError(f"site '{site}': new members {found.new} need this site's IT to accept them "
                                  "(`ultrafedfm kit members --accept-site NAME --fingerprint FP`)")
        if found.first_use or found.new or member_list.version > self.version:
            for name in found.new:
                fp = member_list.entry(name).fingerprint
                self.members[name] = fp
                self._event(f"pinned {name} {fp} ({'first use' if found.first_use else 'new member'}, "
                            f"list v{member_list.version})")
                if not found.first_use:
                    _logger.warning("site %s: pinned a new member key %s of '%s' (member list v%d); compare it with "
                                    "that site out of band (`ultrafedfm kit members` lists every fingerprint)",
                                    site, format_fingerprint(fp), name, member_list.version)
            if found.first_use:
                self.admin = member_list.admin_fingerprint
                self._event(f"pinned admin key {self.admin} (first use)")
                _logger.warning("site %s: first use of the member list (v%d): pinned admin key %s and %d member keys; "
                                "`ultrafedfm kit members` lists them to compare out of band", site,
                                member_list.version, format_fingerprint(self.admin), len(found.new))
            self.version = max(self.version, member_list.version)
            self._save()
        return found

    def accept_member(self, member_list: MemberList, *, name: str, fingerprint: str) -> None:
        """IT accepts ``name``'s key in ``member_list`` after comparing ``fingerprint`` out of band."""
        entry = member_list.entry(name)
        if entry is None:
            raise MembershipError(f"'{name}' is not in the member list (version {member_list.version})")
        if normalise_fingerprint(fingerprint) != entry.fingerprint:
            raise MembershipError(f"the fingerprint you confirmed is not the key the member list gives '{name}' "
                                  f"({format_fingerprint(entry.fingerprint)}); nothing was accepted")
        self.members[name] = entry.fingerprint
        self._event(f"accepted {name} {entry.fingerprint} (by IT, list v{member_list.version})")
        self._save()

    def accept_admin(self, member_list: MemberList, *, fingerprint: str) -> None:
        if normalise_fingerprint(fingerprint) != member_list.admin_fingerprint:
            raise MembershipError(f"the fingerprint you confirmed is not the admin key of this member list "
                                  f"({format_fingerprint(member_list.admin_fingerprint)}); nothing was accepted")
        self.admin = member_list.admin_fingerprint
        self._event(f"accepted admin key {self.admin} (by IT)")
        self._save()

    def _event(self, text: str) -> None:
        self.history.append({"at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "event": text})
        self.history = self.history[-_HISTORY:]

    def _save(self) -> None:
        atomic_write_json(self.path, {"format": _FORMAT, "admin": self.admin, "members": dict(sorted(self.members.items())),
                                      "version": self.version, "history": self.history}, mode=0o600)
