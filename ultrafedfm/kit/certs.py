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
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

_logger = logging.getLogger(__name__)

__all__ = ["CertificateInfo", "ca_fingerprint", "expiring_certificates", "find_certificates",
           "is_signed_by", "load_certificate", "read_certificate"]

EXPIRY_WARNING_DAYS = 30


@dataclass(frozen=True)
class CertificateInfo:
    path: Path
    subject_cn: str
    issuer_cn: str
    not_after: dt.datetime
    fingerprint: str  # SHA-256 of the DER certificate, hex

    def days_left(self, *, now: dt.datetime | None = None) -> int:
        now = now or dt.datetime.now(dt.timezone.utc)
        return (self.not_after - now).days


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
    )


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
    """Every certificate file (*.crt, *.pem) below ``root``."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix in (".crt", ".pem") and p.is_file())


def expiring_certificates(
    paths: list[Path], *, within_days: int = EXPIRY_WARNING_DAYS, now: dt.datetime | None = None
) -> list[CertificateInfo]:
    """The certificates among ``paths`` that expire within ``within_days`` (or already have)."""
    infos = [read_certificate(p) for p in paths]
    return [i for i in infos if i.days_left(now=now) < within_days]

