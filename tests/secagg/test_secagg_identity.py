"""Site identities: startup-kit files, certificate chains through intermediates, and what is refused."""
from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ultrafedfm.secagg import IdentityError, SiteIdentity, load_certificate
from ultrafedfm.secagg.identity import verify_signed_by_site


def _cert(subject: str, issuer: x509.Certificate | None, issuer_key, public_key, *, ca: bool) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(issuer.subject if issuer else name)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=30)))
    if ca:
        builder = builder.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    return builder.sign(issuer_key, hashes.SHA256())


def test_startup_kit_files_rsa_traditional_key(pki, tmp_path):
    """FLARE writes client.crt and an RSA key in 'BEGIN RSA PRIVATE KEY' form; both load and sign."""
    site = pki.sites["site-1"]
    (tmp_path / "client.crt").write_bytes(site.certificate_pem)
    (tmp_path / "client.key").write_bytes(site.private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()))
    (tmp_path / "rootCA.pem").write_bytes(pki.root_ca.public_bytes(serialization.Encoding.PEM))
    loaded = SiteIdentity.from_files(tmp_path / "client.crt", tmp_path / "client.key")
    assert loaded.name == "site-1" and b"BEGIN RSA PRIVATE KEY" in (tmp_path / "client.key").read_bytes()
    verify_signed_by_site(certificate_pem=loaded.certificate_pem, data=b"keys", signature=loaded.sign(b"keys"),
                          site_name="site-1", root_ca=load_certificate(tmp_path / "rootCA.pem"))
    with pytest.raises(IdentityError, match="not found; it comes with the site's startup kit"):
        SiteIdentity.from_files(tmp_path / "missing.crt", tmp_path / "client.key")
    with pytest.raises(IdentityError, match="does not belong to the certificate"):
        SiteIdentity(loaded.certificate, pki.sites["site-2"].private_key)


def test_chain_through_intermediate_ca(pki, tmp_path):
    inter_key = ec.generate_private_key(ec.SECP256R1())
    intermediate = _cert("ultrafedfm-intermediate", pki.root_ca, pki.ca_key, inter_key.public_key(), ca=True)
    site_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    leaf = _cert("site-9", intermediate, inter_key, site_key.public_key(), ca=False)
    (tmp_path / "client.crt").write_bytes(b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, intermediate)))
    (tmp_path / "client.key").write_bytes(site_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    site = SiteIdentity.from_files(tmp_path / "client.crt", tmp_path / "client.key")
    assert site.intermediates == (intermediate,)
    verify_signed_by_site(certificate_pem=site.certificate_pem, data=b"k", signature=site.sign(b"k"),
                          site_name="site-9", root_ca=pki.root_ca)
    # Without its intermediate the leaf does not chain to the root.
    with pytest.raises(IdentityError, match="site 'site-9'.*not issued by the project root CA"):
        verify_signed_by_site(certificate_pem=leaf.public_bytes(serialization.Encoding.PEM), data=b"k",
                              signature=site.sign(b"k"), site_name="site-9", root_ca=pki.root_ca)
    # A non-CA certificate cannot act as an intermediate.
    fake_inter = _cert("ultrafedfm-intermediate", pki.root_ca, pki.ca_key, inter_key.public_key(), ca=False)
    chain = b"".join(c.public_bytes(serialization.Encoding.PEM) for c in (leaf, fake_inter))
    with pytest.raises(IdentityError, match="is not a CA certificate"):
        verify_signed_by_site(certificate_pem=chain, data=b"k", signature=site.sign(b"k"), site_name="site-9",
                              root_ca=pki.root_ca)
