"""`ultrafedfm kit check` and `kit expiry` on real faults: every certificate here is a real X.509
certificate (re-signed with the provisioned root CA's key, or from another CA made with
`cryptography`), the unreachable server is a closed loopback port, the TLS peer is a real TLS
server on loopback, and the data and resource faults are real folders and real limits of this
machine. Each test checks the message the site's IT reads: what is wrong and what to do.
"""
from __future__ import annotations

import datetime as dt
import json
import shutil
import socket
import ssl
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from pydicom.data import get_testdata_file

from ultrafedfm.cli import main
from ultrafedfm.kit.certs import read_certificate, validity
from ultrafedfm.kit.enroll import enroll_site
from ultrafedfm.kit.preflight import check_site_kit

CONSORTIUM = {
    "name": "ufm-check",
    "server": {"host": "localhost", "fed_learn_port": 18612, "admin_port": 18613},
    "sites": [{"name": "site-1", "org": "h1"}, {"name": "site-2", "org": "h2"}],
    "admins": [{"email": "admin@ufm.org", "org": "ufm", "role": "project_admin"}],
}
NOW = dt.datetime.now(dt.timezone.utc)


@dataclass(frozen=True)
class Provisioned:
    kits: Path  # prod_00
    root_cert: x509.Certificate
    root_key: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def provisioned(tmp_path_factory) -> Provisioned:
    """One consortium provisioned with `ultrafedfm kit init` (FLARE's provisioning, our kit builder)."""
    tmp = tmp_path_factory.mktemp("consortium")
    (tmp / "consortium.yaml").write_text(yaml.safe_dump(CONSORTIUM))
    assert main(["kit", "init", "--consortium", str(tmp / "consortium.yaml"), "--workspace", str(tmp / "ws")]) == 0
    kits = tmp / "ws" / "ufm-check" / "prod_00"
    # Secure-aggregation enrolment, as the kits' IT and the admin do it: a healthy kit is enrolled.
    for site in ("site-1", "site-2"):
        fingerprint = enroll_site(kits / site).fingerprint
        assert main(["kit", "membership", "add", "--workspace", str(tmp / "ws"), "--fingerprint", fingerprint,
                     "--request", str(kits / site / "local" / "secagg_enrollment.json")]) == 0
    for participant in ("site-1", "site-2", "localhost"):
        shutil.copyfile(tmp / "ws" / "membership" / "members.json", kits / participant / "local" / "members.json")
    state = json.loads((tmp / "ws" / "ufm-check" / "state" / "cert.json").read_text())
    return Provisioned(
        kits=tmp / "ws" / "ufm-check" / "prod_00",
        root_cert=x509.load_pem_x509_certificate(state["root_cert"].encode()),
        root_key=serialization.load_pem_private_key(state["root_pri_key"].encode(), password=None),
    )


@pytest.fixture
def kit(provisioned, tmp_path) -> Path:
    """site-1's kit, its site.yaml filled in as hospital IT would: one ultrasound file, a fresh cache."""
    kit = shutil.copytree(provisioned.kits / "site-1", tmp_path / "site-1")
    dicom = tmp_path / "dicom"
    dicom.mkdir()
    shutil.copy(get_testdata_file("examples_palette.dcm"), dicom / "IM0001")
    write_site_yaml(kit, dicom=str(dicom), cache=str(tmp_path / "cache"),
                    resources={"gpus": 0, "min_memory_gb": 1, "min_free_disk_gb": 0})
    return kit


def write_site_yaml(kit: Path, *, ingest: dict | None = None, **values) -> None:
    path = kit / "local" / "site.yaml"
    config = yaml.safe_load(path.read_text())
    config.update(values)
    config["ingest"] = {**config["ingest"], "image_size": 32, **(ingest or {})}
    path.write_text(yaml.safe_dump(config, sort_keys=False))


def name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def new_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def new_ca(cn: str) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A self-signed root CA made with `cryptography` (another consortium's, or an impostor's)."""
    key = new_key()
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert, key


def issue(cn: str, issuer: x509.Certificate, issuer_key, *, valid_from: dt.timedelta, valid_until: dt.timedelta,
          key: rsa.RSAPrivateKey | None = None) -> tuple[x509.Certificate, rsa.RSAPrivateKey]:
    """A certificate for ``cn`` (SAN DNS:cn) valid from NOW + valid_from to NOW + valid_until."""
    key = key or new_key()
    cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(issuer.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(NOW + valid_from).not_valid_after(NOW + valid_until)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
            .sign(issuer_key, hashes.SHA256()))
    return cert, key


def install(folder: Path, cert: x509.Certificate, key, *, stem: str = "client") -> None:
    (folder / f"{stem}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{stem}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.TraditionalOpenSSL,
                                                           serialization.NoEncryption()))


def site_key(kit: Path):
    return serialization.load_pem_private_key((kit / "startup" / "client.key").read_bytes(), password=None)


def resign_site_certificate(kit: Path, provisioned: Provisioned, *, valid_from: dt.timedelta,
                            valid_until: dt.timedelta) -> None:
    """Replace the kit's client.crt by one for the same name and key, signed by the consortium's root CA,
    with the given validity window."""
    cert, key = issue("site-1", provisioned.root_cert, provisioned.root_key, valid_from=valid_from,
                      valid_until=valid_until, key=site_key(kit))
    install(kit / "startup", cert, key)


def point_at(kit: Path, port: int, host: str = "127.0.0.1") -> None:
    path = kit / "startup" / "fed_client.json"
    fed_client = json.loads(path.read_text())
    fed_client["servers"][0]["service"]["target"] = f"{host}:{port}"
    path.write_text(json.dumps(fed_client))


def closed_port() -> int:
    """A loopback port nothing listens on: bound by the OS, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check(kit: Path, capsys, *args: str) -> tuple[int, dict[str, str]]:
    """Run `ultrafedfm kit check` and return (exit code, {check name: its printed line})."""
    code = main(["kit", "check", "--kit", str(kit), "--timeout", "3", *args])
    lines = {}
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("["):
            status, rest = line.split("] ", 1)
            check_name, message = rest.split(": ", 1)
            lines[check_name] = f"{status[1:]}: {message}"
    return code, lines


@contextmanager
def tls_server(cert: Path, key: Path, root_ca: Path, *, silent: bool = False):
    """A real TLS server on loopback that requires a client certificate from ``root_ca`` (as FLARE's
    gRPC server does) and, like it, waits for the client to speak before answering. A rejected
    client gets OpenSSL's alert; ``silent`` instead accepts any client certificate and then closes
    without a word, which is what FLARE 2.9's server did to an expired site certificate.
    Yields (port, outcomes)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    context.load_verify_locations(str(root_ca))
    context.verify_mode = ssl.CERT_NONE if silent else ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.1)
    stop, outcomes = threading.Event(), []

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            conn.settimeout(5)
            try:
                with context.wrap_socket(conn, server_side=True) as tls:
                    if silent:
                        outcomes.append("closed")
                        continue
                    tls.recv(64)
                    tls.sendall(b"\0")
                    outcomes.append("accepted")
            except (ssl.SSLError, OSError) as exc:
                outcomes.append(f"refused: {exc}")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1], outcomes
    finally:
        stop.set()
        thread.join(5)
        listener.close()


@pytest.fixture
def server_files(provisioned) -> dict[str, Path]:
    startup = provisioned.kits / "localhost" / "startup"
    return {"cert": startup / "server.crt", "key": startup / "server.key", "root_ca": startup / "rootCA.pem"}


# --- certificate ------------------------------------------------------------------------------------


def test_healthy_kit_passes_every_check_but_the_absent_server(kit, capsys):
    point_at(kit, closed_port())
    code, lines = check(kit, capsys)
    assert code == 1
    for name_ in ("certificate", "root CA", "membership", "site.yaml", "data", "resources"):
        assert lines[name_].startswith("ok: "), lines
    assert "client.crt for site-1, signed by the kit's CA, expires on" in lines["certificate"]
    assert "IM0001 ingests (1 image(s))" in lines["data"]


def test_expired_certificate_fails_and_says_when_and_to_renew(kit, provisioned, capsys):
    resign_site_certificate(kit, provisioned, valid_from=-dt.timedelta(days=90), valid_until=-dt.timedelta(days=3, hours=1))
    code, lines = check(kit, capsys, "--no-data")
    assert code == 1
    expired_on = f"{NOW - dt.timedelta(days=3, hours=1):%Y-%m-%d}"
    assert lines["certificate"] == (
        f"FAIL: client.crt expired on {expired_on} (3 days ago): the server will refuse this site; ask the consortium "
        "admin to renew this site's kit (`ultrafedfm kit expiry <kit>` lists every certificate)")
    # `kit expiry` flags it EXPIRED (and exits 1); the root CA next to it is fine.
    assert main(["kit", "expiry", str(kit)]) == 1
    out = capsys.readouterr().out
    (line,) = [l for l in out.splitlines() if "client.crt" in l]
    assert line.startswith("EXPIRED     -3 days  site-1") and f"expired on {expired_on} (3 days ago)" in line
    (root_line,) = [l for l in out.splitlines() if "rootCA.pem" in l]
    assert root_line.startswith("ok ")
    assert "1 certificate(s) expired, not yet valid or expiring within 30 days" in out


@pytest.mark.parametrize(("days", "fails"), [(10, True), (29, True), (31, False)])
def test_certificate_expiring_within_30_days_fails_and_asks_for_renewal_now(kit, provisioned, capsys, days, fails):
    resign_site_certificate(kit, provisioned, valid_from=-dt.timedelta(days=300),
                            valid_until=dt.timedelta(days=days, hours=1))
    code, lines = check(kit, capsys, "--no-data")
    expires_on = f"{NOW + dt.timedelta(days=days, hours=1):%Y-%m-%d}"
    if fails:
        assert lines["certificate"] == (
            f"FAIL: client.crt expires on {expires_on}, in {days} days (less than 30 days): the site drops out on that "
            "day; ask the consortium admin to renew this site's kit (`ultrafedfm kit expiry <kit>` lists every "
            "certificate) now")
        assert main(["kit", "expiry", str(kit)]) == 1
        assert f"RENEW       {days} days  site-1" in capsys.readouterr().out
    else:
        assert lines["certificate"].startswith(f"ok: client.crt for site-1, signed by the kit's CA, expires on "
                                                f"{expires_on}, in {days} days")
        assert main(["kit", "expiry", str(kit)]) == 0


def test_certificate_not_yet_valid_points_at_the_clock(kit, provisioned, capsys):
    resign_site_certificate(kit, provisioned, valid_from=dt.timedelta(days=2), valid_until=dt.timedelta(days=300))
    _, lines = check(kit, capsys, "--no-data")
    assert lines["certificate"].startswith("FAIL: client.crt is not valid before ")
    assert "this machine's clock is probably wrong" in lines["certificate"]


def test_certificate_of_another_site_is_named(kit, provisioned, capsys):
    # The startup folder got site-2's certificate and key (a mix-up of two kits).
    for name_ in ("client.crt", "client.key"):
        shutil.copy(provisioned.kits / "site-2" / "startup" / name_, kit / "startup" / name_)
    _, lines = check(kit, capsys, "--no-data")
    assert lines["certificate"] == (
        "FAIL: client.crt is issued to 'site-2' but this kit is for 'site-1' (fed_client.json): the startup folder "
        "was mixed with another site's; unpack your own kit again")


def test_certificate_signed_by_another_ca_of_the_same_name_is_caught_by_its_signature(kit, capsys):
    # An impostor CA that even copies the consortium CA's name: only the signature tells them apart.
    other_ca, other_key = new_ca("ufm-check")
    install(kit / "startup", *issue("site-1", other_ca, other_key, valid_from=-dt.timedelta(days=1),
                                    valid_until=dt.timedelta(days=300)))
    _, lines = check(kit, capsys, "--no-data")
    assert lines["certificate"] == (
        "FAIL: client.crt is not signed by the kit's rootCA.pem (it names issuer 'ufm-check', the kit's CA is "
        "'ufm-check'): the kit was assembled from two provisionings; ask the consortium admin for a fresh kit")


def test_key_of_another_kit_is_caught(kit, provisioned, capsys):
    shutil.copy(provisioned.kits / "site-2" / "startup" / "client.key", kit / "startup" / "client.key")
    _, lines = check(kit, capsys, "--no-data")
    assert lines["certificate"] == ("FAIL: client.key is not the private key of client.crt: the two files come from "
                                    "different kits; unpack your own kit again")


# --- root CA -----------------------------------------------------------------------------------------


def test_whole_kit_from_another_ca_is_a_ca_mismatch(kit, provisioned, capsys):
    """Certificate and rootCA.pem consistent with each other, but from another consortium's CA."""
    other_ca, other_key = new_ca("other-consortium")
    (kit / "startup" / "rootCA.pem").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    install(kit / "startup", *issue("site-1", other_ca, other_key, valid_from=-dt.timedelta(days=1),
                                    valid_until=dt.timedelta(days=300)))
    _, lines = check(kit, capsys, "--no-data")
    assert lines["certificate"].startswith("ok: ")  # self-consistent: only the fingerprint tells
    assert lines["root CA"].startswith("FAIL: CA mismatch: rootCA.pem is ")
    assert "this kit comes from another CA; ask the consortium admin for a kit issued under the consortium's root CA" \
        in lines["root CA"]
    # Without local/consortium.json, the fingerprint sent by a second channel catches it the same way.
    (kit / "local" / "consortium.json").unlink()
    expected = read_certificate(provisioned.kits / "site-2" / "startup" / "rootCA.pem").fingerprint
    _, lines = check(kit, capsys, "--no-data")
    assert lines["root CA"].startswith("ok: rootCA.pem SHA-256 ") and "compare it with the one" in lines["root CA"]
    _, lines = check(kit, capsys, "--no-data", "--ca-fingerprint", expected)
    assert lines["root CA"].startswith("FAIL: CA mismatch") and "(the fingerprint given)" in lines["root CA"]


# --- server ------------------------------------------------------------------------------------------


def test_server_on_a_closed_port_is_unreachable(kit, capsys):
    port = closed_port()
    point_at(kit, port)
    code, lines = check(kit, capsys, "--no-data")
    assert code == 1
    assert lines["server"] == (
        f"FAIL: nothing accepts connections on 127.0.0.1:{port} (connection refused): the FLARE server is not running "
        f"there, or {kit / 'startup' / 'fed_client.json'} names the wrong host or port; ask the consortium's operator")


def test_server_with_the_consortium_certificate_accepts_the_kit(kit, server_files, capsys):
    with tls_server(**server_files) as (port, outcomes):
        point_at(kit, port)
        code, lines = check(kit, capsys, "--no-data")
    assert outcomes == ["accepted"]
    assert code == 0 and lines["server"] == f"ok: 127.0.0.1:{port} reachable, mutual TLS handshake accepted"


def test_server_refusing_a_site_certificate_from_another_ca_is_a_ca_mismatch(kit, server_files, capsys):
    other_ca, other_key = new_ca("other-consortium")
    (kit / "startup" / "rootCA.pem").write_bytes(other_ca.public_bytes(serialization.Encoding.PEM))
    install(kit / "startup", *issue("site-1", other_ca, other_key, valid_from=-dt.timedelta(days=1),
                                    valid_until=dt.timedelta(days=300)))
    # The site trusts the server (it has the server's CA), the server does not trust the site.
    (kit / "startup" / "rootCA.pem").write_bytes(server_files["root_ca"].read_bytes()
                                                 + other_ca.public_bytes(serialization.Encoding.PEM))
    with tls_server(**server_files) as (port, outcomes):
        point_at(kit, port)
        _, lines = check(kit, capsys, "--no-data")
    assert len(outcomes) == 1 and outcomes[0].startswith("refused")
    assert lines["server"].startswith(f"FAIL: CA mismatch: the server at 127.0.0.1:{port} rejected this site's "
                                      "certificate (")
    assert lines["server"].endswith("the kit was not issued under the server's root CA: ask the consortium admin for "
                                    "a new kit")


def test_server_refusing_an_expired_site_certificate_says_expired(kit, provisioned, server_files, capsys):
    resign_site_certificate(kit, provisioned, valid_from=-dt.timedelta(days=90), valid_until=-dt.timedelta(days=1))
    with tls_server(**server_files) as (port, outcomes):
        point_at(kit, port)
        _, lines = check(kit, capsys, "--no-data")
    assert "certificate has expired" in outcomes[0]
    assert lines["server"].startswith(f"FAIL: the server at 127.0.0.1:{port} rejected this site's certificate as "
                                      "expired (")
    assert lines["certificate"].startswith("FAIL: client.crt expired on ")


def test_server_closing_on_an_expired_site_certificate_blames_the_expiry_not_the_ca(kit, provisioned, server_files,
                                                                                    capsys):
    resign_site_certificate(kit, provisioned, valid_from=-dt.timedelta(days=90), valid_until=-dt.timedelta(days=1))
    with tls_server(**server_files, silent=True) as (port, outcomes):
        point_at(kit, port)
        _, lines = check(kit, capsys, "--no-data")
    assert outcomes == ["closed"]
    expired_on = f"{NOW - dt.timedelta(days=1):%Y-%m-%d}"
    assert lines["server"] == (
        f"FAIL: the server at 127.0.0.1:{port} rejected this site's certificate (the server closed the connection "
        f"after the handshake); client.crt expired on {expired_on} (1 day ago), which explains it: see the "
        "certificate check")


def test_server_presenting_a_certificate_from_another_ca_is_a_ca_mismatch(kit, provisioned, tmp_path, capsys):
    other_ca, other_key = new_ca("other-consortium")
    install(tmp_path, *issue("localhost", other_ca, other_key, valid_from=-dt.timedelta(days=1),
                             valid_until=dt.timedelta(days=300)), stem="server")
    with tls_server(tmp_path / "server.crt", tmp_path / "server.key", kit / "startup" / "rootCA.pem") as (port, _):
        point_at(kit, port)
        _, lines = check(kit, capsys, "--no-data")
    assert lines["server"].startswith(f"FAIL: CA mismatch: the server at 127.0.0.1:{port} presents a certificate not "
                                      "signed by this kit's rootCA.pem (unable to get local issuer certificate)")


def test_server_presenting_an_expired_certificate_is_named(kit, provisioned, tmp_path, capsys):
    install(tmp_path, *issue("localhost", provisioned.root_cert, provisioned.root_key,
                             valid_from=-dt.timedelta(days=90), valid_until=-dt.timedelta(days=2)), stem="server")
    with tls_server(tmp_path / "server.crt", tmp_path / "server.key", kit / "startup" / "rootCA.pem") as (port, _):
        point_at(kit, port)
        _, lines = check(kit, capsys, "--no-data")
    assert lines["server"] == (f"FAIL: the server at 127.0.0.1:{port} presents a certificate outside its validity "
                               "window (certificate has expired): tell the consortium's operator to renew the server's kit")


def test_server_certificate_for_another_name_is_named(kit, provisioned, tmp_path, capsys):
    install(tmp_path, *issue("fl.other.example", provisioned.root_cert, provisioned.root_key,
                             valid_from=-dt.timedelta(days=1), valid_until=dt.timedelta(days=300)), stem="server")
    with tls_server(tmp_path / "server.crt", tmp_path / "server.key", kit / "startup" / "rootCA.pem") as (port, _):
        point_at(kit, port)
        _, lines = check(kit, capsys, "--no-data")
    assert lines["server"].startswith(f"FAIL: the server at 127.0.0.1:{port} presents a certificate for another name "
                                      "than 'localhost' (")


# --- data, site.yaml, resources --------------------------------------------------------------------


def test_missing_dicom_folder_is_named_with_its_key(kit, tmp_path, capsys):
    write_site_yaml(kit, dicom=str(tmp_path / "not-mounted"))
    code, lines = check(kit, capsys)
    assert code == 1
    assert lines["data"] == (
        f"FAIL: DICOM folder {tmp_path / 'not-mounted'} does not exist (`dicom:` in {kit / 'local' / 'site.yaml'}): "
        "point `dicom:` at the folder of the ultrasound DICOM export, or mount it")


def test_empty_dicom_folder_is_reported_empty(kit, tmp_path, capsys):
    (tmp_path / "empty" / "2024").mkdir(parents=True)
    write_site_yaml(kit, dicom=str(tmp_path / "empty"))
    _, lines = check(kit, capsys)
    assert lines["data"] == (f"FAIL: DICOM folder {tmp_path / 'empty'} is empty (no file in it or below it): check "
                             "that the export ran and that `dicom:` points at its root")


def test_dicom_folder_without_ultrasound_gives_the_reasons(kit, tmp_path, capsys):
    folder = tmp_path / "ct"
    folder.mkdir()
    shutil.copy(get_testdata_file("CT_small.dcm"), folder / "a.dcm")
    (folder / "notes.txt").write_text("not DICOM")
    write_site_yaml(kit, dicom=str(folder))
    _, lines = check(kit, capsys)
    assert lines["data"].startswith(f"FAIL: none of the first 2 files under {folder} can be used: ")
    assert "not_ultrasound 1 (e.g. Modality (0008,0060) is CT)" in lines["data"]
    assert "not_dicom 1" in lines["data"]


def test_dicom_folder_with_everything_excluded_names_the_patterns(kit, tmp_path, capsys):
    write_site_yaml(kit, ingest={"exclude": ["IM*"]})
    _, lines = check(kit, capsys)
    assert lines["data"].startswith("FAIL: every file under ") and "excluded by `ingest.include` / `ingest.exclude`" \
        in lines["data"]


def test_filled_cache_is_enough_without_a_dicom_folder(kit, tmp_path, capsys):
    assert main(["ingest", "--source", str(tmp_path / "dicom"), "--cache", str(tmp_path / "cache"),
                 "--config", str(kit / "local" / "site.yaml"), "--no-progress"]) == 0
    write_site_yaml(kit, dicom=None)
    _, lines = check(kit, capsys)
    assert lines["data"] == f"ok: cache {tmp_path / 'cache'} holds 1 images of 32 px"
    shutil.rmtree(tmp_path / "cache")
    _, lines = check(kit, capsys)
    assert lines["data"].startswith(f"FAIL: the cache {tmp_path / 'cache'} holds no images and ")


def test_invalid_site_yaml_names_the_key(kit, capsys):
    write_site_yaml(kit, num_workers=-1)
    _, lines = check(kit, capsys)
    assert lines["site.yaml"] == f"FAIL: {kit / 'local' / 'site.yaml'}: key 'num_workers': must be >= 0: fix that key"
    assert "data" not in lines and "resources" not in lines


def test_resources_this_machine_lacks_are_each_named(kit, tmp_path, capsys):
    gpus = torch.cuda.device_count()
    write_site_yaml(kit, resources={"gpus": gpus + 1, "min_memory_gb": 1_000_000, "min_free_disk_gb": 1_000_000_000})
    code, lines = check(kit, capsys)
    assert code == 1
    message = lines["resources"]
    assert message.startswith(f"FAIL: `resources.gpus` is {gpus + 1} but {gpus} GPU(s) are visible to this account")
    assert "`resources.min_memory_gb` is 1e+06 but this machine has " in message
    assert "`resources.min_free_disk_gb` is 1e+09 but " in message and f"(holding the cache {tmp_path / 'cache'})" in message
    assert message.endswith(f"Give the machine what {kit / 'local' / 'site.yaml'} declares, or lower the declaration "
                            "to what it has")


def test_validity_states_follow_the_window(provisioned):
    info = read_certificate(provisioned.kits / "site-1" / "startup" / "client.crt")
    assert validity(info).state == "ok"
    assert validity(info, now=info.not_after - dt.timedelta(days=29, hours=23)).state == "expiring"
    assert validity(info, now=info.not_after).state == "expired"
    assert validity(info, now=info.not_before - dt.timedelta(seconds=1)).state == "not_yet_valid"
