"""The key a site signs its round keys with: Ed25519, generated at the site, never sent anywhere.

FLARE's provisioning workspace (``state/cert.json``) holds every participant's TLS private key,
so a FLARE certificate cannot prove "this is hospital-a" to the other hospitals. Each site
therefore generates its own signing key (``ultrafedfm kit enroll``; the file lives in the
kit's ``local/`` folder and is written 0600); only its public key and fingerprint leave the
site, to be enrolled in the consortium's admin-signed member list
(:class:`~ultrafedfm.secagg.membership.Membership`). Peers verify every signature against the
key pinned there, never against a key carried in the message.

Fingerprint: SHA-256 of the raw 32-byte public key, 64 hex digits, shown in groups of four so
that two people can read it to each other over the phone.
"""
from __future__ import annotations

import hashlib
import logging

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from ultrafedfm.secagg.errors import IdentityError

_logger = logging.getLogger(__name__)

__all__ = ["PUBLIC_KEY_BYTES", "SiteSigningKey", "format_fingerprint", "key_fingerprint", "normalise_fingerprint",
           "verify_signature"]

PUBLIC_KEY_BYTES = 32


def key_fingerprint(public_key: bytes) -> str:
    """SHA-256 of a raw Ed25519 public key, lowercase hex (64 digits)."""
    if len(public_key) != PUBLIC_KEY_BYTES:
        raise IdentityError(f"an Ed25519 public key is {PUBLIC_KEY_BYTES} bytes, got {len(public_key)}")
    return hashlib.sha256(public_key).hexdigest()


def format_fingerprint(fingerprint: str) -> str:
    """``ab12 cd34 ...``: 16 groups of four hex digits, for reading aloud."""
    fp = normalise_fingerprint(fingerprint)
    return " ".join(fp[i:i + 4] for i in range(0, len(fp), 4))


def normalise_fingerprint(text: str) -> str:
    """Lowercase hex without spaces or colons; raises ``ValueError`` unless it is a full SHA-256."""
    fp = "".join(text.split()).replace(":", "").lower()
    if len(fp) != 64 or any(c not in "0123456789abcdef" for c in fp):
        raise ValueError(f"{text!r} is not a key fingerprint (64 hex digits, as `ultrafedfm kit enroll` prints)")
    return fp


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> bool:
    """True when ``signature`` is the Ed25519 signature of ``data`` under ``public_key``."""
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        return False
    return True


class SiteSigningKey:
    """A site's Ed25519 signing key and its site name (the name the member list enrols it under).

    Create with :meth:`generate` (at the site) or load with :meth:`from_pem`; the kit layer
    (``ultrafedfm.kit.site_key``) stores it 0600 in the kit's ``local/`` folder.
    """

    def __init__(self, *, site: str, private_key: Ed25519PrivateKey):
        if not isinstance(private_key, Ed25519PrivateKey):
            raise IdentityError(f"site '{site}': the signing key must be Ed25519, got {type(private_key).__name__}")
        if not site:
            raise IdentityError("a site signing key needs the site's name")
        self.site = site
        self._key = private_key
        self.public_key = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                                serialization.PublicFormat.Raw)

    @classmethod
    def generate(cls, *, site: str) -> "SiteSigningKey":
        return cls(site=site, private_key=Ed25519PrivateKey.generate())

    @classmethod
    def from_pem(cls, pem: bytes, *, site: str) -> "SiteSigningKey":
        try:
            key = serialization.load_pem_private_key(pem, password=None)
        except (ValueError, TypeError) as exc:
            raise IdentityError(f"site '{site}': the signing key file is not an unencrypted PEM private key ({exc})") \
                from exc
        return cls(site=site, private_key=key)

    def to_pem(self) -> bytes:
        """PKCS#8 PEM of the private key (for the site's own disk only)."""
        return self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption())

    @property
    def fingerprint(self) -> str:
        return key_fingerprint(self.public_key)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:  # never the private key
        return f"SiteSigningKey(site={self.site!r}, fingerprint={self.fingerprint[:16]}...)"
