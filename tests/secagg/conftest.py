"""Fixtures for the secure-aggregation tests: a consortium of sites with their own signing keys.

Each site has a site-generated Ed25519 key; ``consortium.members(n)`` is the verified member
list of the first ``n`` sites (what ``ultrafedfm.kit.membership`` hands the protocol after
checking the admin's signature and the site's pins). A test PKI shaped like FLARE provisioning
(RSA root CA, site certificates) is kept for the certificate-helper tests.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from secagg_helpers import CONTEXT, SITE_NAMES, Consortium, figures, make_clients
from ultrafedfm.secagg import (
    ContributionLedger, Membership, RoundContext, SecAggClient, SecAggConfig, SecAggServer, SiteIdentity, SiteSigningKey,
)


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


@pytest.fixture(scope="session")
def pki() -> Pki:
    root = make_ca("ultrafedfm-test-root")
    sites = {name: make_site(name, root, kind="rsa" if i % 2 == 0 else "ec") for i, name in enumerate(SITE_NAMES[:2])}
    return Pki(root_ca=root[0], ca_key=root[1], sites=sites)


@pytest.fixture(scope="session")
def consortium() -> Consortium:
    return Consortium({name: SiteSigningKey.generate(site=name) for name in SITE_NAMES})


@dataclass
class OpenRound:
    """A round driven by hand up to the masked-input phase (deliveries are ready)."""

    clients: dict[str, SecAggClient]
    server: SecAggServer
    roster: object
    shares: dict
    deliveries: dict
    members: Membership
    ledgers: dict[str, ContributionLedger] = field(default_factory=dict)

    def mask(self, name: str, delta, *, weight: float = 1.0, loss: float = 0.5, steps: int = 3, num_samples: int = 10,
             context: RoundContext = CONTEXT):
        return self.clients[name].mask_input(self.deliveries[name], delta=np.asarray(delta, np.float32), weight=weight,
                                             figures=figures(loss, steps, num_samples), trained_with=context)


@pytest.fixture
def open_round(consortium):
    """Factory: open_round(n, config=None, job_id=..., round_number=..., ledgers=...) -> OpenRound."""

    def start(n: int, *, config: SecAggConfig | None = None, job_id: str = "job-A", round_number: int = 4,
              context: RoundContext = CONTEXT, ledgers: dict[str, ContributionLedger] | None = None) -> OpenRound:
        config = config or SecAggConfig()
        members = consortium.members(n)
        ledgers = ledgers if ledgers is not None else {}
        clients = make_clients(consortium, n, config=config, job_id=job_id, round_number=round_number,
                               context=context, members=members, ledgers=ledgers)
        server = SecAggServer(members=members, job_id=job_id, round_number=round_number, config=config,
                              context=context)
        for client in clients.values():
            server.receive_advertisement(client.advertise_keys())
        roster = server.key_roster()
        shares = {name: c.share_keys(roster) for name, c in clients.items()}
        for s in shares.values():
            server.receive_encrypted_shares(s)
        return OpenRound(clients, server, roster, shares, server.share_deliveries(), members, ledgers)

    return start
