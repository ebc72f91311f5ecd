"""Where a site's and the server's secure-aggregation material lives, in a kit or in a simulation.

A site signs its round keys with the Ed25519 key it generated itself (``ultrafedfm kit enroll``)
and checks every peer against the consortium's member list, signed by the project admin and
pinned at the site (``ultrafedfm.kit.enroll``). Both live in the site kit's ``local/`` folder
(:func:`site_files`); the server reads the same ``members.json`` from its own kit's ``local/``
(:func:`load_server_members`). No FLARE certificate or key takes part: a job cannot pick the
member list, and FLARE's provisioning workspace holds none of these keys.

The FLARE simulator has no kits: ``ultrafedfm.flare.deploy.simulation.prepare_workspace`` writes
keys and a member list for the simulated sites (``ultrafedfm.kit.simulation_members``) and names
each site's folder as ``secagg_dir`` in its ``site.yaml`` entry. No FLARE import: sites, the server
and the kit tools use this module.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ultrafedfm.kit.enroll import SiteFiles, SiteMaterial, kit_consortium, load_server_membership, open_site
from ultrafedfm.kit.membership import MEMBERS_FILE
from ultrafedfm.secagg.errors import MembershipError
from ultrafedfm.secagg.membership import Membership
from ultrafedfm.site_config import SiteConfig

_logger = logging.getLogger(__name__)

__all__ = ["LOCAL", "load_server_members", "open_site_material", "server_members_path", "site_files"]

LOCAL = "local"


def site_files(site_config: SiteConfig, *, kit_root: Path, site_name: str) -> SiteFiles:
    """The site's secure-aggregation files: ``secagg_dir`` of its ``site.yaml``, else the kit's ``local/``."""
    folder = site_config.secagg_dir if site_config.secagg_dir is not None else Path(kit_root) / LOCAL
    return SiteFiles.in_folder(folder, site=site_name)


def open_site_material(site_config: SiteConfig, *, kit_root: Path, site_name: str) -> SiteMaterial:
    """The site's signing key, its member list (verified and checked against its pins) and its ledger.

    The consortium and server names come from the kit's ``local/consortium.json`` when it has one
    (a simulation has none). Any problem raises a ``SecAggError`` naming the file and what IT does.
    """
    consortium, server = kit_consortium(Path(kit_root))
    files = site_files(site_config, kit_root=kit_root, site_name=site_name)
    # The site's own policy decides whether a member the admin adds counts before local IT accepts it.
    material = open_site(files, consortium=consortium, server=server,
                         auto_pin_new=not site_config.privacy.confirm_new_members)
    _logger.info("site %s: secure aggregation with member list v%d of '%s' (%d member sites), ledger %s", site_name,
                 material.members.version, material.members.consortium, material.members.size, files.ledger)
    return material


def server_members_path(local_dir: Path) -> Path:
    """The member list of the server: ``members.json`` in its kit's ``local/`` folder."""
    return Path(local_dir) / MEMBERS_FILE


def load_server_members(local_dir: Path) -> Membership:
    """The server's member list (signature and entries checked), read from its kit's ``local/`` folder.

    Raises :class:`MembershipError` naming the file; it is re-read every round, so installing a
    new ``members.json`` needs no restart.
    """
    path = server_members_path(local_dir)
    if not path.is_file():
        raise MembershipError(f"secure aggregation needs the consortium's member list at {path} (the project admin "
                              "sends members.json for the server kit's local/ folder; `ultrafedfm kit init` puts the "
                              "first one there); in the simulator, prepare the workspace with "
                              "ultrafedfm.flare.deploy.simulation.prepare_workspace")
    consortium, _ = kit_consortium(Path(local_dir).parent)
    return load_server_membership(path, consortium=consortium)
