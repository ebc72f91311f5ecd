"""A site's secure-aggregation signing key on the site's own disk: created once, 0600, never sent.

``ultrafedfm kit enroll`` (or ``kit check``) creates ``local/secagg_site_key.pem`` in the site's
kit the first time; afterwards it is only ever loaded. The file is refused if anyone but its
owner can read it. Only the public key and its fingerprint leave the site (the enrollment
request); the project admin never sees the private key, and FLARE's provisioning workspace
does not contain it, so holding that workspace is not enough to sign as the site.
"""
from __future__ import annotations

import logging
import stat
from pathlib import Path

from ultrafedfm.fileio import atomic_write_bytes
from ultrafedfm.secagg.errors import IdentityError
from ultrafedfm.secagg.signing import SiteSigningKey

_logger = logging.getLogger(__name__)

__all__ = ["SITE_KEY_FILE", "ensure_site_key", "load_site_key"]

SITE_KEY_FILE = "secagg_site_key.pem"


def load_site_key(path: str | Path, *, site: str) -> SiteSigningKey:
    """Load the site's signing key; :class:`IdentityError` naming the file and what to do."""
    path = Path(path)
    if not path.is_file():
        raise IdentityError(f"site '{site}': no secure-aggregation signing key at {path}; run `ultrafedfm kit enroll "
                            "--kit <this kit>` once and send the printed fingerprint to the project admin")
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise IdentityError(f"site '{site}': {path} is readable by others (mode {mode:o}); a copied key lets anyone sign "
                            f"as this site. Run `chmod 600 {path}`; if it may have been copied, ask the project admin "
                            "to enrol a new key")
    return SiteSigningKey.from_pem(path.read_bytes(), site=site)


def ensure_site_key(path: str | Path, *, site: str) -> tuple[SiteSigningKey, bool]:
    """The site's key at ``path``, generated (0600) if there is none yet; returns (key, created)."""
    path = Path(path)
    if path.exists():
        return load_site_key(path, site=site), False
    key = SiteSigningKey.generate(site=site)
    atomic_write_bytes(path, key.to_pem(), mode=0o600)
    _logger.info("site %s: new secure-aggregation signing key %s... written to %s (0600)", site,
                 key.fingerprint[:16], path)
    return key, True
