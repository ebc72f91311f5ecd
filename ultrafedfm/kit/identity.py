"""Who signs the secure-aggregation keys: kit certificates in a deployment, a throwaway CA in simulation.

In a provisioned deployment a site signs its round keys with its startup kit's
``startup/client.key`` (certificate ``startup/client.crt``) and checks its peers against
``startup/rootCA.pem``; the server checks every site against its own kit's
``startup/rootCA.pem``. Nothing here is configured by the job: a job cannot pick the CA.

The FLARE simulator has no kits. :func:`make_simulation_identities` creates a simulation-only
root CA and one certificate per simulated site (``cryptography``, EC P-256); the CA's private key
is never written, so nothing else can be signed under it. ``ultrafedfm.flare.deploy.simulation.prepare_workspace`` puts
the CA certificate into the simulator's ``startup/`` folder (the simulator copies it into the
server's and every site's ``startup/``, as a kit would) and names each site's files in the
``identity:`` entry of its ``site.yaml``. No FLARE import: sites, the server and the kit tools use it.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ultrafedfm.secagg import IdentityError, SiteIdentity, load_certificate
from ultrafedfm.site_config import SiteConfig

_logger = logging.getLogger(__name__)

__all__ = ["ROOT_CA_FILE", "load_server_root_ca", "load_site_identity", "make_simulation_identities"]

STARTUP = "startup"
ROOT_CA_FILE = "rootCA.pem"
CLIENT_CERT_FILE = "client.crt"
CLIENT_KEY_FILE = "client.key"


def load_site_identity(site_config: SiteConfig, *, kit_root: Path, site_name: str) -> tuple[SiteIdentity, x509.Certificate]:
    """The site's signing identity and the project root CA, from ``site.yaml``'s ``identity:`` or the kit.

    Raises :class:`IdentityError` naming the missing file, or a certificate issued to another name.
    """
    files = site_config.identity
    startup = Path(kit_root) / STARTUP
    cert = (files and files.certificate) or startup / CLIENT_CERT_FILE
    key = (files and files.private_key) or startup / CLIENT_KEY_FILE
    root = (files and files.root_ca) or startup / ROOT_CA_FILE
    for what, path, yaml_key in (("certificate", cert, "certificate"), ("private key", key, "private_key"),
                                 ("root CA certificate", root, "root_ca")):
        if not Path(path).is_file():
            raise IdentityError(
                f"site '{site_name}': secure aggregation needs the site's {what}, but {path} does not exist; it comes "
                f"with the site's startup kit (startup/{CLIENT_CERT_FILE}, {CLIENT_KEY_FILE}, {ROOT_CA_FILE}); "
                f"or name it as identity.{yaml_key} in site.yaml")
    identity = SiteIdentity.from_files(cert, key)
    if identity.name != site_name:
        raise IdentityError(f"site '{site_name}': the certificate {cert} is issued to '{identity.name}'; the site would "
                            "be refused by its peers. Use this site's own kit")
    return identity, load_certificate(root)


def load_server_root_ca(workspace_root: Path) -> x509.Certificate:
    """The project root CA the server checks the sites' keys against: ``<server workspace>/startup/rootCA.pem``."""
    path = Path(workspace_root) / STARTUP / ROOT_CA_FILE
    if not path.is_file():
        raise IdentityError(f"secure aggregation needs the project root CA at {path} (the server's startup kit); "
                            "in the simulator, prepare the workspace with ultrafedfm.flare.deploy.simulation.prepare_workspace")
    return load_certificate(path)


def make_simulation_identities(out_dir: Path, site_names: list[str], *, days: int = 7) -> dict[str, dict[str, str]]:
    """SIMULATION ONLY: a throwaway root CA and a certificate + key per site under ``out_dir``.

    Returns, per site, the ``identity:`` mapping for its ``site.yaml`` (certificate, private_key,
    root_ca). The CA's private key is discarded.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "ultrafedfm simulation CA (not for deployment)")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    root_path = out_dir / ROOT_CA_FILE
    root_path.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    entries = {}
    for name in site_names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])).issuer_name(ca_name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(ca_key, hashes.SHA256())
        )
        site_dir = out_dir / name
        site_dir.mkdir(exist_ok=True)
        (site_dir / CLIENT_CERT_FILE).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        key_path = site_dir / CLIENT_KEY_FILE
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        key_path.chmod(0o600)
        entries[name] = {"certificate": str(site_dir / CLIENT_CERT_FILE), "private_key": str(key_path),
                         "root_ca": str(root_path)}
    _logger.info("simulation-only CA and %d site certificates written to %s", len(site_names), out_dir)
    return entries
