"""End to end on loopback: provisioned server, three sites and an admin with mutual TLS.

What a consortium relies on and FLARE alone does not give: a site whose kit comes from another
CA never joins and `kit check` at that site names the CA mismatch; a certificate from our own
CA for a name outside the consortium is refused at registration; everything stops with no
process left behind.
"""
from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from ultrafedfm.kit.preflight import check_site_kit

from .deployment import Deployment, copy_kit_as

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]


def mint_site_certificate(state_file: Path, name: str, org: str) -> tuple[bytes, bytes]:
    """A client certificate for ``name`` signed by the consortium's own root CA key (a mistake or a leak)."""
    state = json.loads(state_file.read_text())
    root_cert = x509.load_pem_x509_certificate(state["root_cert"].encode())
    root_key = serialization.load_pem_private_key(state["root_pri_key"].encode(), password=None)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name),
                                 x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)]))
        .issuer_name(root_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .sign(root_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def rename_kit(kit: Path, old: str, name: str, cert_pem: bytes, key_pem: bytes) -> None:
    startup = kit / "startup"
    for script in startup.glob("*.sh"):
        script.write_text(script.read_text().replace(f"uid={old}", f"uid={name}"))
    (startup / "client.crt").write_bytes(cert_pem)
    (startup / "client.key").write_bytes(key_pem)
    fed_client = json.loads((startup / "fed_client.json").read_text())
    fed_client["client"]["fqsn"] = name
    (startup / "fed_client.json").write_text(json.dumps(fed_client, indent=2))
    (startup / "signature.json").unlink(missing_ok=True)  # the kit was altered after provisioning


def registered_sites(deployment: Deployment) -> set[str]:
    """The server's list of registered sites, as the admin sees it."""
    status = deployment.nvflare("system", "status")
    return {c["client_name"] for c in status["data"]["clients"]}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    dep = Deployment.provision(root, SITES)
    dep.start(SERVER := dep.config.server.host)
    try:
        dep.wait_for_log(SERVER, "Server started", timeout=90)
        for site in SITES:
            dep.start(site)
        for site in SITES:
            dep.wait_for_log(site, "Successfully registered client", timeout=90)
        yield dep
    finally:
        dep.stop()  # idempotent: the last test stops it first and checks for leftovers


def test_three_sites_join_over_mutual_tls(deployment):
    assert registered_sites(deployment) == set(SITES)
    fed_client = json.loads((deployment.kit("site-1") / "startup" / "fed_client.json").read_text())
    assert fed_client["client"]["connection_security"] == "mtls"
    results = {r.name: r for r in check_site_kit(deployment.kit("site-1"), check_data=False)}
    assert results["server"].ok and results["root CA"].ok and results["certificate"].ok, results


def test_site_from_another_ca_never_joins_and_kit_check_names_it(deployment, tmp_path):
    other = Deployment.provision(tmp_path / "other", ["site-4"], name="other-consortium")
    kit = other.kit("site-4")
    # Point the foreign kit at our server (same host, same port), as a mis-distributed kit would be.
    fed_client = json.loads((kit / "startup" / "fed_client.json").read_text())
    fed_client["servers"][0]["service"]["target"] = f"localhost:{deployment.config.server.fed_learn_port}"
    (kit / "startup" / "fed_client.json").write_text(json.dumps(fed_client, indent=2))
    deployment.start("site-4", kit)
    time.sleep(15)
    assert "Successfully registered client" not in deployment.log("site-4").read_text(errors="replace")
    assert "site-4" not in registered_sites(deployment)
    # What FLARE's server does not say, the site's own pre-flight check does.
    results = {r.name: r for r in check_site_kit(kit, check_data=False,
                                                  expected_ca_sha256=deployment.provisioned.root_ca_sha256)}
    assert not results["root CA"].ok and "CA mismatch" in results["root CA"].message
    assert not results["server"].ok and "CA mismatch" in results["server"].message
    deployment.processes.pop("site-4").kill()


def test_certificate_from_our_ca_outside_the_consortium_is_refused(deployment, tmp_path):
    state = deployment.root / "prov" / deployment.config.name / "state" / "cert.json"
    kit = copy_kit_as(deployment.kit("site-1"), tmp_path / "rogue-site")
    rename_kit(kit, "site-1", "rogue-site", *mint_site_certificate(state, "rogue-site", "rogue"))
    deployment.start("rogue-site", kit)
    deployment.wait_for_log(deployment.config.server.host, "'rogue-site' is not in the consortium allow-list",
                            timeout=60)
    assert "Successfully registered client" not in deployment.log("rogue-site").read_text(errors="replace")
    assert registered_sites(deployment) == set(SITES)


def test_zz_everything_stops_with_no_process_left(deployment):
    leftovers = deployment.stop()
    assert leftovers == [], leftovers
    assert all(p.poll() is not None for p in deployment.processes.values())
