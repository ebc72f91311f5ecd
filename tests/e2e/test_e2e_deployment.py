"""End to end on loopback: provisioned server, three sites and an admin with mutual TLS.

What a consortium relies on and FLARE alone does not give: every site generates its own
secure-aggregation key (`kit enroll`), the admin signs the member list every kit carries, and the
tiny job runs secure aggregation against that pinned list; a site whose kit comes from another
CA never joins and `kit check` at that site names the CA mismatch; a certificate from our own
CA for a name outside the consortium is refused at registration; the server keeps aggregates
only; everything stops with no process left behind.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import datetime as dt
import io
import json
import time
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID

from nvflare.fuel.flare_api.api_spec import JobNotFound, JobNotRunning, NoConnection
from nvflare.fuel.flare_api.flare_api import new_secure_session

from ultrafedfm.cli import main
from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.synth import generate_sites
from ultrafedfm.kit.membership import read_member_list
from ultrafedfm.kit.preflight import check_site_kit
from ultrafedfm.models import build_mae, timm_model_kwargs, timm_model_name
from ultrafedfm.secagg import format_fingerprint

from .deployment import ADMIN, SERVER, Deployment, copy_kit_as

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


def enrol_sites(dep: Deployment) -> None:
    """Issue 9's enrolment, through the CLI: each site's IT creates its own key and reads its fingerprint to
    the admin; the admin signs each into the member list and sends the list to every kit (server included)."""
    membership = dep.root / "prov" / "membership"
    for site in SITES:
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert main(["kit", "enroll", "--kit", str(dep.kit(site))]) == 0
        fingerprint = printed.getvalue().split("fingerprint: ")[1].splitlines()[0]  # read out by phone
        request = dep.kit(site) / "local" / "secagg_enrollment.json"  # sent by e-mail: a public key only
        with contextlib.redirect_stdout(io.StringIO()):
            assert main(["kit", "membership", "add", "--workspace", str(dep.root / "prov"), "--request",
                         str(request), "--fingerprint", fingerprint]) == 0
    for participant in (*SITES, dep.config.server.host):
        (dep.kit(participant) / "local" / "members.json").write_bytes((membership / "members.json").read_bytes())


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
    enrol_sites(dep)
    dep.start(dep.config.server.host)
    try:
        dep.wait_for_log(dep.config.server.host, "Server started", timeout=90)
        for site in SITES:
            dep.start(site)
        for site in SITES:
            dep.wait_for_log(site, "Successfully registered client", timeout=90)
        yield dep
    finally:
        dep.stop()  # idempotent: the last test stops it first and checks for leftovers


def test_three_enrolled_sites_join_over_mutual_tls_and_kit_check_prints_every_members_fingerprint(deployment, capsys):
    assert registered_sites(deployment) == set(SITES)
    fed_client = json.loads((deployment.kit("site-1") / "startup" / "fed_client.json").read_text())
    assert fed_client["client"]["connection_security"] == "mtls"
    # `ultrafedfm kit check` at a healthy site: every check passes, membership, data and resources included.
    assert main(["kit", "check", "--kit", str(deployment.kit("site-1"))]) == 0
    out = capsys.readouterr().out
    for check in ("certificate", "root CA", "server", "membership", "site.yaml", "data", "resources"):
        assert f"[ok] {check}:" in out, out
    assert "7 passed, 0 failed" in out
    # ... and prints every member's fingerprint and the admin key's, to compare out of band.
    member_list = read_member_list(deployment.kit("site-1") / "local" / "members.json")
    assert [m.name for m in member_list.members] == SITES and member_list.version == 4
    for member in member_list.members:
        assert format_fingerprint(member.fingerprint) in out
    assert format_fingerprint(member_list.admin_fingerprint) in out
    # The keys were generated at the sites: the provisioning workspace (FLARE's state/cert.json with every
    # FLARE key, the admin's membership folder) holds none of them. (Here the kits were issued inside it.)
    kits = deployment.provisioned.kits_dir
    workspace = [p.read_bytes() for p in (deployment.root / "prov").rglob("*")
                 if p.is_file() and kits not in p.parents]
    assert any(b"root_pri_key" in data for data in workspace)  # the scan sees FLARE's state
    for site in SITES:
        secret = (deployment.kit(site) / "local" / "secagg_site_key.pem").read_text().strip().splitlines()[1].encode()
        assert not any(secret in data for data in workspace), site


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
            except (JobNotFound, JobNotRunning, NoConnection):  # stats exist only while the job runs; asked as
                # the job's process ends, the server answers ERROR_SERVER_CONNECTION (the job's meta decides below)
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
    # Secure aggregation with the pinned member list: the server shows aggregates, nothing per site.
    own = {s: read_site_figures(site_figures_path(deployment.root / "caches" / s)) for s in SITES}
    assert all(len(f) == 3 and all(x.masked for x in f) for f in own.values()), own
    last = last_rounds[-1]
    assert last["applied"] and last["global_loss"] is not None and "loss" not in last
    assert last["total_images"] == sum(f[-1].num_samples for f in own.values())
    rows = RunState(deployment.kit(SERVER) / "ultrafedfm_runs", "mae_pretrain_tiny").read_rounds()
    assert len(rows) == 3 and all(r["applied"] and r["failed"] == {} for r in rows), rows
    assert all(not {"loss", "num_samples", "train_seconds"} & set(r) for r in rows)
    for site in SITES:  # each site pinned the member list and recorded what it contributed to
        local = deployment.kit(site) / "local"
        assert json.loads((local / "secagg_pins.json").read_text())["version"] == 4
        ledger = json.loads((local / "secagg_ledger.json").read_text())
        assert [e["round"] for e in ledger["rounds"] if e["job"] == job_id] == [0, 1, 2]
        assert len(ledger["models"]) == 3 and all(m["survivors"] == SITES for m in ledger["models"].values())
    console_text = console.result(timeout=120)
    cli_text = json.dumps(cli_stats.result(timeout=120))
    others.shutdown()
    assert "current_round" in console_text and "MaePretrainController" in console_text, console_text[-2000:]
    assert "Registered clients: 3" in console_text, console_text[-2000:]
    assert "current_round" in cli_text, cli_text[-2000:]
    listed = deployment.nvflare("job", "list")
    assert job_id in json.dumps(listed)

    deployment.nvflare("job", "download", job_id, "-o", str(tmp_path / "download"))
    models = {p.name: p for p in (tmp_path / "download").rglob("*") if p.suffix in (".pt", ".safetensors")}
    assert {"final_model.pt", "encoder.safetensors"} <= set(models), sorted(models)
    mae = build_mae("tiny", img_size=32)
    mae.load_state_dict(torch.load(models["final_model.pt"], map_location="cpu"))
    # As docs/researcher.md shows it: the sidecar JSON names the timm model and its arguments.
    meta = json.loads(models["encoder.safetensors"].with_suffix(".json").read_text())
    assert meta["timm_model"] == timm_model_name(mae) and meta["timm_kwargs"] == timm_model_kwargs(mae)
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2, **meta["timm_kwargs"])
    missing, unexpected = vit.load_state_dict(load_file(models["encoder.safetensors"]), strict=False)
    assert set(missing) == {"head.weight", "head.bias"} and not unexpected
    # Sites outside the consortium never received the job.
    for outsider in ("rogue-site", "site-4"):
        log = deployment.log(outsider)
        assert not log.is_file() or job_id not in log.read_text(errors="replace")


def test_zz_everything_stops_with_no_process_left(deployment):
    leftovers = deployment.stop()
    assert leftovers == [], leftovers
    assert all(p.poll() is not None for p in deployment.processes.values())
