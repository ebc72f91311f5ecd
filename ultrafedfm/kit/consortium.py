"""The consortium file: server, sites and admin users, validated, and turned into FLARE's project.yml.

A consortium's list of sites is its allow-list: provisioning issues certificates only to these
names, jobs deploy only to them and the server aggregates only their updates.

Example ``consortium.yaml``::

    name: ultrafedfm-consortium
    server: {host: fl.consortium.example.org, fed_learn_port: 8002, admin_port: 8003, org: consortium}
    sites:
      - {name: hospital-a, org: hospital-a}
      - {name: hospital-b, org: hospital-b}
    admins:
      - {email: admin@consortium.example.org, org: consortium, role: project_admin}
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ultrafedfm.config import ConfigError, check, from_mapping, load_yaml

_logger = logging.getLogger(__name__)

__all__ = ["AdminSpec", "ConsortiumConfig", "ServerSpec", "SiteSpec", "load_consortium", "project_dict"]

# FLARE uses participant names as certificate common names and folder names.
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_HOST = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
_ORG = re.compile(r"^[A-Za-z0-9_]{1,63}$")  # FLARE's rule for organisation names
_EMAIL = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s]+$")
AdminRole = Literal["project_admin", "org_admin", "lead", "member"]


@dataclass
class ServerSpec:
    """The aggregation server: its host name is the name in its TLS certificate."""

    host: str
    fed_learn_port: int = 8002
    admin_port: int = 8003
    org: str = "consortium"
    # Absolute path on the server machine for FLARE's job and snapshot stores and the run state
    # (FLARE's default, /tmp/nvflare, is shared by every deployment and wiped on reboot).
    store_dir: str = "/var/lib/ultrafedfm"

    def __post_init__(self) -> None:
        check(bool(_HOST.match(self.host)), "host", f"{self.host!r} is not a valid host name")
        for key in ("fed_learn_port", "admin_port"):
            port = getattr(self, key)
            check(1 <= port <= 65535, key, f"{port} is not a TCP port (1-65535)")
        _check_org(self.org)
        check(self.store_dir.startswith("/"), "store_dir", f"{self.store_dir!r} must be an absolute path")


@dataclass
class SiteSpec:
    """One hospital: ``name`` is the certificate's common name and the site's identity in FLARE."""

    name: str
    org: str

    def __post_init__(self) -> None:
        check(bool(_NAME.match(self.name)), "name", f"{self.name!r}: use letters, digits, '.', '_' or '-' (max 63)")
        _check_org(self.org)


@dataclass
class AdminSpec:
    """A person who uses the admin console or submits jobs."""

    email: str
    org: str
    role: AdminRole = "lead"

    def __post_init__(self) -> None:
        check(bool(_EMAIL.match(self.email)), "email", f"{self.email!r} is not an e-mail address")
        _check_org(self.org)


def _check_org(org: str) -> None:
    check(bool(_ORG.match(org)), "org", f"{org!r}: use letters, digits and '_' only (FLARE's rule)")


@dataclass
class ConsortiumConfig:
    name: str
    server: ServerSpec
    sites: list[SiteSpec] = field(default_factory=list)
    admins: list[AdminSpec] = field(default_factory=list)
    description: str = "UltraFedFM consortium"
    cert_valid_days: int = 360

    def __post_init__(self) -> None:
        check(bool(_NAME.match(self.name)), "name", f"{self.name!r}: use letters, digits, '.', '_' or '-'")
        check(len(self.sites) >= 1, "sites", "list at least one site")
        check(len(self.admins) >= 1, "admins", "list at least one admin (someone must submit jobs)")
        check(self.cert_valid_days >= 31, "cert_valid_days", "must be at least 31 days")
        names = [s.name for s in self.sites]
        for i, name in enumerate(names):
            check(names.index(name) == i, f"sites[{i}].name", f"{name!r} appears twice")
            check(name != self.server.host, f"sites[{i}].name", "a site cannot share the server's name")
        emails = [a.email for a in self.admins]
        for i, email in enumerate(emails):
            check(emails.index(email) == i, f"admins[{i}].email", f"{email!r} appears twice")
        check(
            any(a.role == "project_admin" for a in self.admins),
            "admins",
            "at least one admin needs role project_admin",
        )

    @property
    def site_names(self) -> list[str]:
        return [s.name for s in self.sites]


def load_consortium(path: str | Path) -> ConsortiumConfig:
    """Read and validate ``consortium.yaml``; errors name the file and the key."""
    return from_mapping(ConsortiumConfig, load_yaml(path), source=path)


def project_dict(config: ConsortiumConfig, *, builders: list[dict[str, Any]]) -> dict[str, Any]:
    """FLARE's project.yml (api_version 3) for this consortium, with the given builder list."""
    participants: list[dict[str, Any]] = [
        {
            "name": config.server.host,
            "type": "server",
            "org": config.server.org,
            "fed_learn_port": config.server.fed_learn_port,
            "admin_port": config.server.admin_port,
        }
    ]
    participants += [{"name": s.name, "type": "client", "org": s.org} for s in config.sites]
    participants += [{"name": a.email, "type": "admin", "org": a.org, "role": a.role} for a in config.admins]
    return {
        "api_version": 3,
        "name": config.name,
        "description": config.description,
        "participants": participants,
        "builders": builders,
    }


def add_site(config: ConsortiumConfig, site: SiteSpec) -> ConsortiumConfig:
    """A copy of ``config`` with ``site`` appended (validated like the file)."""
    if site.name in config.site_names:
        raise ConfigError(f"site {site.name!r} is already in the consortium", key="sites")
    return ConsortiumConfig(
        name=config.name,
        server=config.server,
        sites=[*config.sites, site],
        admins=list(config.admins),
        description=config.description,
        cert_valid_days=config.cert_valid_days,
    )
