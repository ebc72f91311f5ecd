"""End to end on loopback: provisioned server, three sites and an admin with mutual TLS.

What a consortium relies on and FLARE alone does not give: a site whose kit comes from another
CA never joins and `kit check` at that site names the CA mismatch; a certificate from our own
CA for a name outside the consortium is refused at registration; everything stops with no
process left behind.
"""
from __future__ import annotations

import concurrent.futures
import datetime as dt
import json
import time
from pathlib import Path

import pytest
import timm
import torch
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from nvflare.fuel.flare_api.api_spec import JobNotFound, JobNotRunning
from nvflare.fuel.flare_api.flare_api import new_secure_session

from ultrafedfm.cli import main
from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.synth import generate_sites
from ultrafedfm.kit.preflight import check_site_kit
from ultrafedfm.models import build_mae, timm_model_kwargs, timm_model_name

from .deployment import ADMIN, Deployment, copy_kit_as

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]
REPO = Path(__file__).resolve().parents[2]
TINY_JOB = REPO / "jobs" / "mae_pretrain_tiny"


def prepare_site_data(dep: Deployment) -> None:
    """What hospital IT does with a kit: DICOM store -> cache, and site.yaml filled in from the template."""
    data = generate_sites(out_dir=dep.root / "hospitals", n_sites=len(SITES), images_per_site=10, seed=7,
                          progress=False, workers=1)
    for site, site_dir in zip(SITES, data):
        cache = dep.root / "caches" / site
        ingest_dicom_folder(source=site_dir / "dicom", cache=cache, config=IngestConfig(image_size=32),
                            workers=1, progress=False)
        site_yaml = dep.kit(site) / "local" / "site.yaml"
        config = yaml.safe_load(site_yaml.read_text())  # the template the kit builder filled in
        config.update(cache=str(cache), dicom=str(site_dir / "dicom"), device="cpu", num_threads=1, num_workers=0)
        config["ingest"]["image_size"] = 32
        config["resources"] = {"gpus": 0, "min_memory_gb": 1, "min_free_disk_gb": 0}
        site_yaml.write_text(yaml.safe_dump(config, sort_keys=False))


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
    prepare_site_data(dep)
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


def test_three_sites_join_over_mutual_tls(deployment, capsys):
    assert registered_sites(deployment) == set(SITES)
    fed_client = json.loads((deployment.kit("site-1") / "startup" / "fed_client.json").read_text())
    assert fed_client["client"]["connection_security"] == "mtls"
    # `ultrafedfm kit check` at a healthy site: every check passes, data and resources included.
    assert main(["kit", "check", "--kit", str(deployment.kit("site-1"))]) == 0
    out = capsys.readouterr().out
    for check in ("certificate", "root CA", "server", "site.yaml", "data", "resources"):
        assert f"[ok] {check}:" in out, out
    assert "6 passed, 0 failed" in out


def test_site_from_another_ca_never_joins_and_kit_check_names_it(deployment, tmp_path, capsys):
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
    # The same from the command line, with the fingerprint the consortium sent by a second channel.
    assert main(["kit", "check", "--kit", str(kit), "--no-data",
                 "--ca-fingerprint", deployment.provisioned.root_ca_sha256]) == 1
    assert "[FAIL] server: CA mismatch" in capsys.readouterr().out
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


def test_tiny_job_submitted_with_nvflare_runs_rounds_and_downloads(deployment, tmp_path):
    submitted = deployment.nvflare("job", "submit", "-j", str(TINY_JOB))
    job_id = submitted["data"]["job_id"]
    # Watch rounds advance from the admin side while the job runs: FLARE's admin API polls
    # (one logged-in session), while `nvflare job stats` and the admin console's
    # `show_stats JOB server` run once each beside it and must print the same workflow stats.
    progress: set[tuple] = set()
    last_rounds: list[dict] = []
    others = concurrent.futures.ThreadPoolExecutor(max_workers=2)  # both are slow to log in
    cli_stats = console = None
    session = new_secure_session(ADMIN, str(deployment.admin_kit))
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                workflow = session.show_stats(job_id, "server").get("server", {}).get("MaePretrainController")
            except (JobNotFound, JobNotRunning):  # stats exist only while the job runs
                workflow = None
            if workflow:
                last = workflow.get("last_round") or {}
                progress.add((workflow["current_round"], last.get("round")))
                if last:
                    last_rounds.append(last)
                if console is None:
                    console = others.submit(deployment.admin_console, [f"show_stats {job_id} server", "check_status server"])
                    cli_stats = others.submit(deployment.nvflare, "job", "stats", job_id)
            if "FINISHED" in str(session.get_job_meta(job_id).get("status")):
                break
            time.sleep(0.5)
    finally:
        session.close()
    deployment.nvflare("job", "wait", job_id, "--timeout", "120")
    meta = deployment.nvflare("job", "meta", job_id)
    assert "FINISHED:COMPLETED" in json.dumps(meta["data"]), meta
    assert len(progress) >= 2, f"rounds did not visibly advance in the job's stats: {progress}"
    assert last_rounds and set(last_rounds[-1]["participants"]) == set(SITES), last_rounds
    assert last_rounds[-1]["applied"] and set(last_rounds[-1]["loss"]) == set(SITES)
    console_text = console.result(timeout=120)
    cli_text = json.dumps(cli_stats.result(timeout=120))
    others.shutdown()
    assert "current_round" in console_text and "MaePretrainController" in console_text, console_text[-2000:]
    assert "Registered clients: 3" in console_text, console_text[-2000:]
    assert "current_round" in cli_text, cli_text[-2000:]
    listed = deployment.nvflare("job", "list")
    assert job_id in json.dumps(listed)

    deployment.nvflare("job", "download", job_id, "-o", str(tmp_path / "download"))
    models = {p.name: p for p in (tmp_path / "download").rglob("*") if p.suffix in (".pt", ".pth")}
    assert {"final_model.pt", "encoder.pth"} <= set(models), sorted(models)
    mae = build_mae("tiny", img_size=32)
    mae.load_state_dict(torch.load(models["final_model.pt"], map_location="cpu"))
    # As docs/researcher.md shows it: the sidecar JSON names the timm model and its arguments.
    meta = json.loads(models["encoder.pth"].with_suffix(".json").read_text())
    assert meta["timm_model"] == timm_model_name(mae) and meta["timm_kwargs"] == timm_model_kwargs(mae)
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2, **meta["timm_kwargs"])
    missing, unexpected = vit.load_state_dict(torch.load(models["encoder.pth"], map_location="cpu"), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    # Sites outside the consortium never received the job.
    for outsider in ("rogue-site", "site-4"):
        log = deployment.log(outsider)
        assert not log.is_file() or job_id not in log.read_text(errors="replace")


def test_zz_everything_stops_with_no_process_left(deployment):
    leftovers = deployment.stop()
    assert leftovers == [], leftovers
    assert all(p.poll() is not None for p in deployment.processes.values())
