"""Fixtures for the secure-aggregation tests: a test PKI shaped like FLARE provisioning.

A self-signed RSA-2048 root CA (as `nvflare provision` makes), site certificates with RSA-2048
and EC P-256 keys whose common name is the site name, and a rogue CA that is not the project's.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ultrafedfm.secagg import SecAggClient, SecAggConfig, SecAggServer, SiteIdentity

SITE_NAMES = [f"site-{i}" for i in range(1, 8)]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "ultrafedfm-test")])


def make_ca(common_name: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(_name(common_name))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def make_site(name: str, ca: tuple[x509.Certificate, rsa.RSAPrivateKey], *, kind: str = "rsa",
              valid_days: int = 365) -> SiteIdentity:
    ca_cert, ca_key = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048) if kind == "rsa" \
        else ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=2)).not_valid_after(now + dt.timedelta(days=valid_days))
            .sign(ca_key, hashes.SHA256()))
    return SiteIdentity(cert, key)


@dataclass
class Pki:
    root_ca: x509.Certificate
    ca_key: rsa.RSAPrivateKey
    sites: dict[str, SiteIdentity]
    rogue_ca: tuple[x509.Certificate, rsa.RSAPrivateKey]

    def identities(self, n: int) -> dict[str, SiteIdentity]:
        return {name: self.sites[name] for name in SITE_NAMES[:n]}


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = make_ca("ultrafedfm-test-root")
    sites = {name: make_site(name, root, kind="rsa" if i % 2 == 0 else "ec") for i, name in enumerate(SITE_NAMES)}
    return Pki(root_ca=root[0], ca_key=root[1], sites=sites, rogue_ca=make_ca("ultrafedfm-test-root"))


@pytest.fixture(scope="session")
def site_factory():
    """make_site(name, (ca_cert, ca_key), kind="rsa"|"ec", valid_days=365) -> SiteIdentity."""
    return make_site


@dataclass
class OpenRound:
    """A round driven by hand up to the masked-input phase (deliveries are ready)."""

    clients: dict[str, SecAggClient]
    server: SecAggServer
    roster: object
    shares: dict
    deliveries: dict


@pytest.fixture
def open_round(pki):
    """Factory: open_round(n, config=None, job_id=..., round_number=...) -> OpenRound."""

    def start(n: int, *, config: SecAggConfig | None = None, job_id: str = "job-A", round_number: int = 4) -> OpenRound:
        config = config or SecAggConfig()
        clients = {name: SecAggClient(identity=ident, root_ca=pki.root_ca, job_id=job_id, round_number=round_number,
                                      config=config) for name, ident in pki.identities(n).items()}
        server = SecAggServer(root_ca=pki.root_ca, job_id=job_id, round_number=round_number, config=config)
        for client in clients.values():
            server.receive_advertisement(client.advertise_keys())
        roster = server.key_roster()
        shares = {name: c.share_keys(roster) for name, c in clients.items()}
        for s in shares.values():
            server.receive_encrypted_shares(s)
        return OpenRound(clients, server, roster, shares, server.share_deliveries())

    return start
