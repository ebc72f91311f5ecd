"""FLARE certificate helpers: loading a kit's certificates and checking them against the root CA.

These prove TLS identity only. They are NOT what round keys are signed with any more: FLARE's
provisioning workspace (``state/cert.json``) holds every participant's private key, and the
server's and admins' certificates chain to the same root CA as the sites', so "issued by our CA
with CN = name" neither proves a site nor excludes the server. Round keys are signed with each
site's own key (:mod:`ultrafedfm.secagg.signing`) and checked against the pinned member list
(:mod:`ultrafedfm.secagg.membership`). :func:`verify_signed_by_site` is kept for adapters and for
the test that shows why it was not enough.
"""
from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from ultrafedfm.secagg.errors import IdentityError

_logger = logging.getLogger(__name__)

__all__ = ["SiteIdentity", "certificate_common_name", "load_certificate", "load_certificate_chain",
           "verify_signed_by_site"]

SigningKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


def load_certificate(pem: bytes | str | Path) -> x509.Certificate:
    """A PEM certificate from bytes or a file path (e.g. the startup kit's ``rootCA.pem``)."""
    if isinstance(pem, (str, Path)):
        path = Path(pem)
        if not path.is_file():
            raise IdentityError(f"certificate file {path} not found; it comes with the site's startup kit")
        pem = path.read_bytes()
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise IdentityError(f"not a PEM X.509 certificate ({exc})") from exc


def load_certificate_chain(pem: bytes) -> list[x509.Certificate]:
    """The leaf certificate first, then any intermediates, from one PEM blob."""
    try:
        chain = x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise IdentityError(f"not a PEM X.509 certificate chain ({exc})") from exc
    return chain


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        return bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def certificate_common_name(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if len(names) != 1:
        raise IdentityError(f"certificate subject {cert.subject.rfc4514_string()} needs exactly one common name")
    return str(names[0].value)


@dataclass(frozen=True)
class SiteIdentity:
    """A site's certificate and private key; its name is the certificate's common name."""

    certificate: x509.Certificate
    private_key: SigningKey
    intermediates: tuple[x509.Certificate, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.private_key, (rsa.RSAPrivateKey, ec.EllipticCurvePrivateKey,
                                             ed25519.Ed25519PrivateKey)):
            raise IdentityError(f"unsupported site key type {type(self.private_key).__name__}; "
                                "use RSA, EC or Ed25519")
        if not _same_public_key(self):
            raise IdentityError(f"private key does not belong to the certificate of {self.name}")

    @property
    def name(self) -> str:
        return certificate_common_name(self.certificate)

    @property
    def certificate_pem(self) -> bytes:
        """The site certificate then its intermediates (if the project CA issues through any)."""
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (self.certificate, *self.intermediates))

    @classmethod
    def from_files(cls, cert_path: str | Path, key_path: str | Path, *, password: bytes | None = None) -> "SiteIdentity":
        """Load e.g. ``startup/client.crt`` (a certificate or a chain, leaf first) and ``startup/client.key``."""
        cert_path = Path(cert_path)
        if not cert_path.is_file():
            raise IdentityError(f"certificate file {cert_path} not found; it comes with the site's startup kit")
        chain = load_certificate_chain(cert_path.read_bytes())
        key_path = Path(key_path)
        if not key_path.is_file():
            raise IdentityError(f"private key file {key_path} not found; it comes with the site's startup kit")
        return cls(chain[0], serialization.load_pem_private_key(key_path.read_bytes(), password=password),
                   tuple(chain[1:]))

    def sign(self, data: bytes) -> bytes:
        key = self.private_key
        if isinstance(key, rsa.RSAPrivateKey):
            return key.sign(data, _PSS, hashes.SHA256())
        if isinstance(key, ec.EllipticCurvePrivateKey):
            return key.sign(data, ec.ECDSA(hashes.SHA256()))
        return key.sign(data)


_PSS = padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=padding.PSS.DIGEST_LENGTH)


def _same_public_key(identity: SiteIdentity) -> bool:
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    return (identity.private_key.public_key().public_bytes(serialization.Encoding.DER, spki)
            == identity.certificate.public_key().public_bytes(serialization.Encoding.DER, spki))


def verify_signed_by_site(
    *,
    certificate_pem: bytes,
    data: bytes,
    signature: bytes,
    site_name: str,
    root_ca: x509.Certificate,
    now: dt.datetime | None = None,
) -> None:
    """Check ``signature`` over ``data`` by the certificate of ``site_name``, issued by ``root_ca``.

    Raises :class:`IdentityError` naming the site and what failed.
    """
    chain = load_certificate_chain(certificate_pem)
    cert = chain[0]
    now = now or dt.datetime.now(dt.timezone.utc)
    path = [*chain, root_ca]
    for depth, (child, parent) in enumerate(zip(path, path[1:])):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as exc:
            raise IdentityError(
                f"certificate presented for site '{site_name}' (subject {child.subject.rfc4514_string()}) is not "
                f"issued by {'the project root CA' if parent is root_ca else 'the next certificate of its chain'} "
                f"{parent.subject.rfc4514_string()}: {str(exc) or 'bad signature'}; its keys are refused") from exc
        if depth > 0 and not _is_ca(child):
            raise IdentityError(f"intermediate certificate {child.subject.rfc4514_string()} in the chain of site "
                                f"'{site_name}' is not a CA certificate; its keys are refused")
        if not child.not_valid_before_utc <= now <= child.not_valid_after_utc:
            raise IdentityError(f"certificate {child.subject.rfc4514_string()} of site '{site_name}' is not valid now "
                                f"({child.not_valid_before_utc} .. {child.not_valid_after_utc}); re-provision the site")
    common_name = certificate_common_name(cert)
    if common_name != site_name:
        raise IdentityError(f"keys claim to come from site '{site_name}' but are signed with the certificate of "
                            f"'{common_name}'; refused")
    public_key = cert.public_key()
    try:
        if isinstance(public_key, rsa.RSAPublicKey):
            public_key.verify(signature, data, _PSS, hashes.SHA256())
        elif isinstance(public_key, ec.EllipticCurvePublicKey):
            public_key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
        elif isinstance(public_key, ed25519.Ed25519PublicKey):
            public_key.verify(signature, data)
        else:
            raise IdentityError(f"site '{site_name}' has an unsupported key type {type(public_key).__name__}")
    except InvalidSignature as exc:
        raise IdentityError(f"signature of site '{site_name}' over its round keys does not verify; "
                            "the keys were altered in transit and are refused") from exc
