"""SIMULATION ONLY: site signing keys and a signed member list for simulated sites in one folder.

The FLARE simulator has no kits and no hospital IT to enrol keys. :func:`make_simulation_members`
writes, per simulated site, its own signing key (0600) and a copy of a member list signed by a
throwaway admin key that is never written, so nothing else can ever be enrolled under it.
Sites then load their material exactly as in a deployment (``open_site(SiteFiles...)``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from ultrafedfm.kit.enroll import SiteFiles
from ultrafedfm.kit.membership import MEMBERS_FILE, EnrollmentRequest, add_member, new_member_list, write_member_list
from ultrafedfm.kit.site_key import ensure_site_key

_logger = logging.getLogger(__name__)

__all__ = ["make_simulation_members"]


def make_simulation_members(out_dir: str | Path, site_names: list[str], *, consortium: str = "simulation",
                            server: str = "server") -> tuple[dict[str, SiteFiles], Path]:
    """Per-site files under ``out_dir/<site>/`` and the server's member list ``out_dir/members.json``."""
    out_dir = Path(out_dir)
    admin = Ed25519PrivateKey.generate()  # discarded: no later list can be signed under it
    member_list = new_member_list(consortium=consortium, server=server, admin_key=admin)
    files = {}
    for name in site_names:
        files[name] = SiteFiles.in_folder(out_dir / name, site=name)
        key, _ = ensure_site_key(files[name].signing_key, site=name)
        request = EnrollmentRequest.create(consortium=consortium, key=key)
        member_list = add_member(member_list, request, confirmed_fingerprint=key.fingerprint, admin_key=admin)
    server_members = write_member_list(out_dir / MEMBERS_FILE, member_list)
    for name in site_names:
        shutil.copyfile(server_members, files[name].members)
    _logger.info("simulation-only member list v%d with %d sites written to %s", member_list.version, len(site_names),
                 out_dir)
    return files, server_members
