"""X.509 facts a site or the project admin needs: who a certificate names, who signed it, days left.

FLARE's provisioning writes a self-signed root CA and one certificate per participant. A kit
whose certificate is not signed by the consortium's root CA retries its TLS handshake forever
without a word in the server's log, so we check signatures and expiry up front.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key
from cryptography.x509.oid import NameOID

_logger = logging.getLogger(__name__)

__all__ = ["CertificateInfo", "Validity", "ca_fingerprint", "expiring_certificates", "find_certificates",
           "is_signed_by", "key_matches_certificate", "load_certificate", "read_certificate", "validity"]

EXPIRY_WARNING_DAYS = 30
_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class CertificateInfo:
    path: Path
    subject_cn: str
    issuer_cn: str
    not_after: dt.datetime
    fingerprint: str  # SHA-256 of the DER certificate, hex
    not_before: dt.datetime | None = None

    def days_left(self, *, now: dt.datetime | None = None) -> int:
        """Whole days until expiry, rounded towards zero (negative: whole days since expiry)."""
        now = now or dt.datetime.now(dt.timezone.utc)
        left = self.not_after - now
        return int(left / _DAY) if left >= dt.timedelta(0) else -int(-left / _DAY)


@dataclass(frozen=True)
class Validity:
    """Where ``now`` falls in a certificate's validity window, in words a site can act on.

    ``state`` is ``not_yet_valid``, ``expired``, ``expiring`` (within the warning window) or ``ok``;
    ``text`` says it with the date, e.g. ``expired on 2026-11-22 (3 days ago)``.
    """

    state: str
    days: int
    text: str


def validity(info: CertificateInfo, *, now: dt.datetime | None = None,
             warn_days: int = EXPIRY_WARNING_DAYS) -> Validity:
    """Classify ``info``'s validity window at ``now`` (default: the current time)."""
    now = now or dt.datetime.now(dt.timezone.utc)
    if info.not_before is not None and now < info.not_before:
        return Validity("not_yet_valid", -info.days_left(now=now),
                        f"is not valid before {info.not_before:%Y-%m-%d %H:%M} UTC")
    days = info.days_left(now=now)
    date = f"{info.not_after:%Y-%m-%d}"
    if now >= info.not_after:
        return Validity("expired", days, f"expired on {date} ({_days(-days)} ago)")
    state = "expiring" if info.not_after - now < warn_days * _DAY else "ok"
    return Validity(state, days, f"expires on {date}, in {_days(days)}")


def _days(n: int) -> str:
    return "less than a day" if n == 0 else f"{n} day{'s' if n != 1 else ''}"


def load_certificate(path: str | Path) -> x509.Certificate:
    path = Path(path)
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: certificate not found; is this an unpacked startup kit?") from None
    except ValueError as exc:
        raise ValueError(f"{path}: not a PEM certificate ({exc}); re-copy it from the kit you were sent") from exc


def _common_name(name: x509.Name) -> str:
    attrs = name.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""


def read_certificate(path: str | Path) -> CertificateInfo:
    cert = load_certificate(path)
    return CertificateInfo(
        path=Path(path),
        subject_cn=_common_name(cert.subject),
        issuer_cn=_common_name(cert.issuer),
        not_after=cert.not_valid_after_utc,
        fingerprint=cert.fingerprint(hashes.SHA256()).hex(),
        not_before=cert.not_valid_before_utc,
    )


def key_matches_certificate(cert: x509.Certificate, key_path: str | Path) -> bool:
    """True when the PEM private key at ``key_path`` is the key of ``cert`` (raises if unreadable)."""
    key_path = Path(key_path)
    try:
        key = load_pem_private_key(key_path.read_bytes(), password=None)
    except FileNotFoundError:
        raise FileNotFoundError(f"{key_path}: private key not found; is this an unpacked startup kit?") from None
    except (ValueError, TypeError) as exc:
        raise ValueError(f"{key_path}: not an unencrypted PEM private key ({exc}); re-copy it from the kit "
                         "you were sent") from exc
    spki = (Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return key.public_key().public_bytes(*spki) == cert.public_key().public_bytes(*spki)


def ca_fingerprint(path: str | Path) -> str:
    """SHA-256 fingerprint of a root CA certificate (what `kit check` compares)."""
    return hashlib.sha256(load_certificate(path).public_bytes(Encoding.DER)).hexdigest()


def is_signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    """True when ``issuer``'s public key verifies ``cert``'s signature (RSA PKCS#1 v1.5/PSS or ECDSA)."""
    key = issuer.public_key()
    try:
        if isinstance(key, rsa.RSAPublicKey):
            pad = cert.signature_algorithm_parameters
            if not isinstance(pad, (padding.PSS, padding.PKCS1v15)):
                pad = padding.PKCS1v15()
            key.verify(cert.signature, cert.tbs_certificate_bytes, pad, cert.signature_hash_algorithm)
        elif isinstance(key, ec.EllipticCurvePublicKey):
            key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        else:
            return False
    except InvalidSignature:
        return False
    return cert.issuer == issuer.subject


def find_certificates(root: str | Path) -> list[Path]:
    """Every certificate file (*.crt, *.pem holding a certificate) below ``root``.

    PEM files that hold a key (a site's ``secagg_site_key.pem``, the admin's membership key) are skipped.
    """
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix in (".crt", ".pem") and p.is_file()
                  and b"-----BEGIN CERTIFICATE-----" in p.read_bytes())


def expiring_certificates(
    paths: list[Path], *, within_days: int = EXPIRY_WARNING_DAYS, now: dt.datetime | None = None
) -> list[CertificateInfo]:
    """The certificates among ``paths`` that expire within ``within_days`` (or already have)."""
    infos = [read_certificate(p) for p in paths]
    return [i for i in infos if validity(i, now=now, warn_days=within_days).state != "ok"]

