"""End to end on loopback: provisioned server, sites and an admin with mutual TLS, real processes.

What a consortium relies on and FLARE alone does not give: every site generates its own
secure-aggregation key (`kit enroll`), the admin signs the member list every kit carries, and the
tiny job runs secure aggregation against that pinned list; a site whose kit comes from another
CA tries to connect, never joins, and `kit check` at that site names the CA mismatch; a
certificate from our own CA for a name outside the consortium is refused at registration; the
server keeps aggregates only.

Faults a deployment meets, in one 4-round job over 4 sites (secure aggregation, min_sites 3, so
every round can still aggregate with one site missing): a kit made by `kit add-site` while the
consortium runs (no restart) enrols, is signed into the member list the admin re-distributes, and
trains in that job, ingesting its `dicom:` folder on first use (its cache is empty); a site
SIGSTOPped after sharing its keys hangs past the round timeout, is dropped, the round completes
with the other three, and it rejoins the next round after SIGCONT; the server process is SIGKILLed
while the sites train, its orphaned job process stops by itself without saving the round, the
server is restarted from its kit, the sites reconnect on their own, and the resubmitted job
(docs/operator.md) completes rounds 0..3 exactly once. Everything then stops the product's way with
no process left behind (checked before any cleanup).
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import io
import json
import shutil
import signal
import time
from typing import Callable
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
from ultrafedfm.config import to_mapping
from ultrafedfm.data.cache import open_cache
from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.synth import generate_sites
from ultrafedfm.flare.deploy.job_builder import export_job_folder
from ultrafedfm.kit.membership import read_member_list
from ultrafedfm.kit.preflight import check_site_kit
from ultrafedfm.models import build_mae, timm_model_kwargs, timm_model_name
from ultrafedfm.secagg import format_fingerprint

from .deployment import ADMIN, SERVER, Deployment, copy_kit_as

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

SITES = ["site-1", "site-2", "site-3"]
NEW_SITE = "site-4"  # issued with `kit add-site` while the consortium runs
ALL_SITES = [*SITES, NEW_SITE]
HUNG_SITE = "site-2"
REPO = Path(__file__).resolve().parents[2]
TINY_JOB = REPO / "jobs" / "mae_pretrain_tiny"
# The fault job: 4 rounds with short timeouts, so a hung site costs seconds, not hours. Its own seed:
# a job starting from the tiny job's initial weights would be the same model, whose sum the sites
# already helped unmask over the tiny job's three sites (their ledgers refuse a second set).
FAULT_JOB = dataclasses.replace(JOB_SPECS["mae_pretrain_tiny"], name="mae_pretrain_faults", num_rounds=4, seed=12,
                                round_timeout_s=30, secagg_phase_timeout_s=15)


def hospital_data(dep: Deployment) -> Path:
    return dep.root / "hospitals"


def prepare_site_data(dep: Deployment) -> None:
    """What hospital IT does with a kit: DICOM store -> cache, and site.yaml filled in from the template.
    The fourth hospital's DICOM store exists too; it joins later (`kit add-site`)."""
    data = generate_sites(out_dir=hospital_data(dep), n_sites=len(ALL_SITES), images_per_site=10, seed=7,
                          progress=False, workers=1)
    for site, site_dir in zip(SITES, data):
        cache = dep.root / "caches" / site
        ingest_dicom_folder(source=site_dir / "dicom", cache=cache, config=IngestConfig(image_size=32),
                            workers=1, progress=False)
        write_site_yaml(dep.kit(site), cache=cache, dicom=site_dir / "dicom")


def write_site_yaml(kit: Path, *, cache: Path, dicom: Path) -> None:
    site_yaml = kit / "local" / "site.yaml"
    config = yaml.safe_load(site_yaml.read_text())  # the template the kit builder filled in
    config.update(cache=str(cache), dicom=str(dicom), device="cpu", num_threads=1, num_workers=0)
    config["ingest"]["image_size"] = 32
    config["resources"] = {"gpus": 0, "min_memory_gb": 1, "min_free_disk_gb": 0}
    site_yaml.write_text(yaml.safe_dump(config, sort_keys=False))


def enrol(dep: Deployment, site: str, kit: Path) -> None:
    """Issue 9's enrolment, through the CLI: the site's IT creates its own key and reads its fingerprint to
    the admin, who signs it into the member list (a new version of membership/members.json)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["kit", "enroll", "--kit", str(kit)]) == 0
    fingerprint = printed.getvalue().split("fingerprint: ")[1].splitlines()[0]  # read out by phone
    request = kit / "local" / "secagg_enrollment.json"  # sent by e-mail: a public key only
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["kit", "membership", "add", "--workspace", str(dep.root / "prov"), "--request",
                     str(request), "--fingerprint", fingerprint]) == 0


def distribute_member_list(dep: Deployment, kits: list[Path]) -> None:
    """The admin sends the signed members.json to every kit's local/ folder (provisioning/README.md)."""
    members = (dep.root / "prov" / "membership" / "members.json").read_bytes()
    for kit in kits:
        (kit / "local" / "members.json").write_bytes(members)


def enrol_sites(dep: Deployment) -> None:
    for site in SITES:
        enrol(dep, site, dep.kit(site))
    distribute_member_list(dep, [dep.kit(p) for p in (*SITES, SERVER)])


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
    """The server's list of registered sites, as the admin sees it (empty while the server is not ready)."""
    status = deployment.nvflare("system", "status", check=False)
    if not isinstance(status, dict) or status.get("status") != "ok":
        return set()
    return {c["client_name"] for c in status["data"]["clients"]}


def wait_until(condition: Callable[[], bool], *, timeout: float, what: str, poll: float = 0.2) -> float:
    """Seconds until ``condition()`` held; fails the test naming ``what`` after ``timeout``."""
    start = time.monotonic()
    while not condition():
        if time.monotonic() - start > timeout:
            pytest.fail(f"{what}: not within {timeout:.0f} s")
        time.sleep(poll)
    return time.monotonic() - start


def job_log_lines(deployment: Deployment, site: str, job_id: str, *fragments: str) -> int:
    """How many lines of the site's FLARE job log (``<kit>/<job_id>/log.txt``) hold every fragment."""
    log = deployment.kit(site) / job_id / "log.txt"
    if not log.is_file():
        return 0
    return sum(all(f in line for f in fragments) for line in log.read_text(errors="replace").splitlines())


def submit(deployment: Deployment, job_dir: Path) -> str:
    return deployment.nvflare("job", "submit", "-j", str(job_dir))["data"]["job_id"]


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


def test_site_from_another_ca_tries_our_server_never_joins_and_kit_check_names_it(deployment, tmp_path, capsys):
    other = Deployment.provision(tmp_path / "other", ["site-9"], name="other-consortium")
    kit = other.kit("site-9")
    # Point the foreign kit at our server (same host, same port), as a mis-distributed kit would be.
    port = deployment.config.server.fed_learn_port
    fed_client = json.loads((kit / "startup" / "fed_client.json").read_text())
    fed_client["servers"][0]["service"]["target"] = f"localhost:{port}"
    (kit / "startup" / "fed_client.json").write_text(json.dumps(fed_client, indent=2))
    outsider = deployment.start("foreign-site-9", kit)
    # It started and tried: its own log shows the TLS handshake with our server failing on the certificate.
    deployment.wait_for_log("foreign-site-9", f"Cannot connect to host localhost:{port} ssl:True", timeout=60)
    log = deployment.log("foreign-site-9").read_text(errors="replace")
    assert "CERTIFICATE_VERIFY_FAILED" in log
    assert "Successfully registered client" not in log
    assert "site-9" not in registered_sites(deployment)
    assert "site-9" not in deployment.log(SERVER).read_text(errors="replace")  # the server says nothing about it
    # What FLARE's server does not say, the site's own pre-flight check does.
    results = {r.name: r for r in check_site_kit(kit, check_data=False,
                                                  expected_ca_sha256=deployment.provisioned.root_ca_sha256)}
    assert not results["root CA"].ok and "CA mismatch" in results["root CA"].message
    assert not results["server"].ok and "CA mismatch" in results["server"].message
    # The same from the command line, with the fingerprint the consortium sent by a second channel.
    assert main(["kit", "check", "--kit", str(kit), "--no-data",
                 "--ca-fingerprint", deployment.provisioned.root_ca_sha256]) == 1
    assert "[FAIL] server: CA mismatch" in capsys.readouterr().out
    assert outsider.poll() is None  # it retries forever, and survives `shutdown all` (FLARE_NOTES): end it here
    outsider.kill()
    outsider.wait(timeout=10)


def test_certificate_from_our_ca_outside_the_consortium_tries_to_register_and_is_refused(deployment, tmp_path):
    state = deployment.root / "prov" / deployment.config.name / "state" / "cert.json"
    kit = copy_kit_as(deployment.kit("site-1"), tmp_path / "rogue-site")
    rename_kit(kit, "site-1", "rogue-site", *mint_site_certificate(state, "rogue-site", "rogue"))
    rogue = deployment.start("rogue-site", kit)
    # The leftover-process scan of the last test covers this kit, outside the deployment's folder:
    assert rogue.pid in {pid for pid, _ in deployment.running()}
    deployment.wait_for_log(SERVER, "'rogue-site' is not in the consortium allow-list", timeout=60)
    # It got through TLS (our CA signed it) and asked to register: its own log shows the refusal.
    deployment.wait_for_log("rogue-site", "registration rejected", timeout=60)
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
    for outsider in ("rogue-site", "foreign-site-9"):
        log = deployment.log(outsider)
        assert not log.is_file() or job_id not in log.read_text(errors="replace")
    check_audit_reports(deployment, job_id, download=tmp_path / "download", out=tmp_path / "audit")


def check_audit_reports(deployment: Deployment, job_id: str, *, download: Path, out: Path) -> None:
    """The privacy audit as a real deployment leaves it (docs/privacy-audit.md).

    The job wrote the server's report and each site's own at its end; the operator rebuilds the
    server's from `nvflare job download` and the server kit (FLARE's audit.log names who
    submitted); each site matches every message it sent against the hashes the server received.
    """
    run_dir = deployment.kit(SERVER) / "ultrafedfm_runs" / "mae_pretrain_tiny"
    assert (run_dir / "audit" / job_id / "report.html").is_file(), sorted(run_dir.rglob("report.*"))
    server_out = out / "server"
    assert main(["audit", "--server", str(download), "--run", str(run_dir), "--workspace",
                 str(deployment.kit(SERVER)), "--job-id", job_id, "--out", str(server_out)]) == 0
    server = json.loads((server_out / "report.json").read_text())
    assert server["subject"]["job_id"] == job_id and server["subject"]["secure_aggregation"] is True
    assert [sorted(r["participants"]) for r in server["rounds"]] == [SITES] * 3, server["rounds"]
    assert all(r["secure_aggregation"] and r["aggregate"]["global_loss"] is not None for r in server["rounds"])
    assert {e["user"] for e in server["flare_audit"]["submission_events"]} == {ADMIN}, server["flare_audit"]
    certificates = server["transport"]["certificates"]
    assert certificates and all(c["state"] == "ok" and c["days_left"] > 300 for c in certificates), certificates
    assert [f["code"] for f in server["findings"]] == ["dp_off"], server["findings"]
    for site in SITES:
        assert (deployment.root / "caches" / site / "privacy" / "audit" / job_id / "report.json").is_file()
        site_out = out / site
        assert main(["audit", "--site", str(deployment.kit(site)), "--server-report", str(server_out / "report.json"),
                     "--job-id", job_id, "--out", str(site_out)]) == 0
        report = json.loads((site_out / "report.json").read_text())
        messages = report["messages"]
        assert messages["count"] >= 3 * 3 and messages["by_match"] == {"matched": messages["count"]}, messages
        assert messages["chain_intact"] and all(m["masked"] for m in messages["items"] if m["task"] == "train")


@dataclasses.dataclass
class AddedSite:
    kit: Path
    server_pid: int  # the server process before `kit add-site`


@pytest.fixture(scope="module")
def added_site(deployment) -> AddedSite:
    """`kit add-site` while the consortium runs, then the steps provisioning/README.md gives: the admin copies
    the server's new allow-list to the running server; the new site's IT fills in site.yaml (an empty cache
    and its DICOM folder), runs `kit check` and `kit enroll`; the admin signs it into the member list and
    sends the new members.json to every kit, the server's included; the site starts. No restart."""
    server_pid = deployment.processes[SERVER].pid
    consortium_file = deployment.root / "consortium.yaml"
    consortium_file.write_text(yaml.safe_dump(to_mapping(deployment.config), sort_keys=False))
    workspace = deployment.root / "prov"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["kit", "add-site", "--consortium", str(consortium_file), "--workspace", str(workspace),
                     "--name", NEW_SITE, "--org", "site_4", "--out", str(deployment.root / "new-kits")]) == 0
    kit = deployment.root / "new-kits" / NEW_SITE
    newest = sorted((workspace / deployment.config.name).glob("prod_*"))[-1]
    shutil.copyfile(newest / SERVER / "local" / "consortium.json", deployment.kit(SERVER) / "local" / "consortium.json")
    cache = deployment.root / "caches" / NEW_SITE
    cache.mkdir(parents=True)  # empty: the site ingests its DICOM folder when it first trains
    write_site_yaml(kit, cache=cache, dicom=hospital_data(deployment) / NEW_SITE / "dicom")
    enrol(deployment, NEW_SITE, kit)
    distribute_member_list(deployment, [kit, *(deployment.kit(p) for p in (*SITES, SERVER))])
    deployment.start(NEW_SITE, kit)
    deployment.wait_for_log(NEW_SITE, "Successfully registered client", timeout=90)
    return AddedSite(kit=kit, server_pid=server_pid)


def test_a_kit_from_add_site_enrols_and_joins_the_running_consortium_without_a_server_restart(deployment, added_site,
                                                                                             capsys):
    server = deployment.processes[SERVER]
    assert registered_sites(deployment) == set(ALL_SITES)
    # The same server process throughout, started once.
    assert server.poll() is None and server.pid == added_site.server_pid
    assert deployment.log(SERVER).read_text(errors="replace").count("Server started") == 1
    kit = added_site.kit
    # Same root CA as every other kit; the site's own pre-flight check passes, data included (an empty
    # cache with a DICOM folder to ingest), and it lists the re-signed member list with itself in it.
    assert (kit / "startup" / "rootCA.pem").read_bytes() == \
        (deployment.kit("site-1") / "startup" / "rootCA.pem").read_bytes()
    capsys.readouterr()
    assert main(["kit", "check", "--kit", str(kit)]) == 0
    out = capsys.readouterr().out
    assert "[ok] data:" in out and "[ok] membership:" in out, out
    member_list = read_member_list(deployment.kit(SERVER) / "local" / "members.json")
    assert [m.name for m in member_list.members] == ALL_SITES and member_list.version == 5
    for other in (kit, *(deployment.kit(s) for s in SITES)):
        assert read_member_list(other / "local" / "members.json") == member_list


@dataclasses.dataclass
class FaultRun:
    """What the fault scenario observed while it ran (the tests below judge it)."""

    first_job: str
    second_job: str
    rows_when_hung: int
    rows_when_continued: list[dict]
    server_pids_killed: list[int]
    orphan_stopped_after_s: float
    rows_when_orphan_stopped: int
    checkpoint_at_kill: object
    site_pids: dict[str, int]
    site_pids_after_restart: dict[str, int]
    reconnected_after_s: float
    jobs_after_restart: dict
    second_meta: dict
    server_log_after_restart: str


@pytest.fixture(scope="module")
def fault_run(deployment, added_site, tmp_path_factory) -> FaultRun:
    """One 4-site job with every fault; see the module docstring. Each fault is injected at a moment read
    from the product's own files (rounds.jsonl, the sites' FLARE job logs), never after a fixed sleep."""
    job_dir = export_job_folder(FAULT_JOB, tmp_path_factory.mktemp("fault-job"))
    state = RunState(deployment.kit(SERVER) / "ultrafedfm_runs", FAULT_JOB.name)

    def rows() -> int:
        return len(state.read_rounds())

    first = submit(deployment, job_dir)

    # Round 2: site-2 has shared its keys (so it is in the round's key set) -> every process of it stops.
    wait_until(lambda: rows() >= 1, timeout=240, what="round 1 of the fault job")
    wait_until(lambda: job_log_lines(deployment, HUNG_SITE, first, "task_name=secagg_share_keys,",
                                     "task result sent to server") >= 2,
               timeout=120, what="site-2 sharing its keys in round 2", poll=0.02)
    deployment.signal(HUNG_SITE, signal.SIGSTOP)
    rows_when_hung = rows()
    try:
        wait_until(lambda: rows() >= 2, timeout=FAULT_JOB.round_timeout_s + 180, what="round 2 without site-2")
    finally:
        deployment.signal(HUNG_SITE, signal.SIGCONT)
    rows_when_continued = state.read_rounds()

    # Round 4: the sites are training -> SIGKILL the server process (its job process is not touched).
    wait_until(lambda: rows() >= 3, timeout=180, what="round 3 of the fault job")
    wait_until(lambda: job_log_lines(deployment, "site-1", first, "got task assignment: name=train,") >= 4,
               timeout=120, what="round 4's training task at site-1", poll=0.02)
    server = deployment.processes[SERVER]
    server_pids = deployment.pids_of(SERVER)  # the server process and its job process (own session)
    server.send_signal(signal.SIGKILL)
    server.wait(timeout=30)
    checkpoint_at_kill = state.load()
    # The orphaned job process notices its server is gone and stops by itself, saving nothing more.
    orphan_s = wait_until(lambda: not deployment.pids_of(SERVER), timeout=90,
                          what="the orphaned server job process to stop by itself")
    rows_when_orphan_stopped = rows()

    # Restart from the kit; the sites, untouched, reconnect on their own.
    site_pids = {s: deployment.processes[s].pid for s in ALL_SITES}
    offset = deployment.log_size(SERVER)
    deployment.start(SERVER)
    deployment.wait_for_log(SERVER, "Server started", timeout=90, after=offset)
    reconnect_s = wait_until(lambda: registered_sites(deployment) == set(ALL_SITES), timeout=180,
                             what="the sites reconnecting to the restarted server", poll=1.0)
    site_pids_after = {s: deployment.processes[s].pid for s in ALL_SITES if deployment.processes[s].poll() is None}
    jobs = {j["job_id"]: j["status"] for j in deployment.nvflare("job", "list")["data"]}

    # docs/operator.md: resubmit the same job; it continues from the last saved round.
    second = submit(deployment, job_dir)
    deployment.nvflare("job", "wait", second, "--timeout", "300", timeout=330)
    meta = deployment.nvflare("job", "meta", second)["data"]
    return FaultRun(first_job=first, second_job=second, rows_when_hung=rows_when_hung,
                    rows_when_continued=rows_when_continued, server_pids_killed=server_pids,
                    orphan_stopped_after_s=orphan_s, rows_when_orphan_stopped=rows_when_orphan_stopped,
                    checkpoint_at_kill=checkpoint_at_kill, site_pids=site_pids, site_pids_after_restart=site_pids_after,
                    reconnected_after_s=reconnect_s, jobs_after_restart=jobs, second_meta=meta,
                    server_log_after_restart=deployment.log(SERVER).read_bytes()[offset:].decode(errors="replace"))


def fault_rows(deployment) -> list[dict]:
    return RunState(deployment.kit(SERVER) / "ultrafedfm_runs", FAULT_JOB.name).read_rounds()


def own_figures(deployment, site: str, job_id: str) -> list:
    return [f for f in read_site_figures(site_figures_path(deployment.root / "caches" / site)) if f.job_id == job_id]


def test_the_added_site_ingests_its_dicom_folder_on_first_use_and_trains_in_the_next_job(deployment, fault_run):
    cache = open_cache(deployment.root / "caches" / NEW_SITE)  # it was an empty folder
    assert len(cache.entries) >= 10 and cache.image_size == 32
    assert f"{NEW_SITE}: ingesting {hospital_data(deployment) / NEW_SITE / 'dicom'}" in \
        deployment.log(NEW_SITE).read_text(errors="replace")
    first_round = own_figures(deployment, NEW_SITE, fault_run.first_job)[0]
    assert first_round.round == 0 and first_round.masked and first_round.num_samples == len(cache.entries)
    row = fault_rows(deployment)[0]
    assert row["participants"] == ALL_SITES and row["applied"], row
    # The server's total is the four sites' own counts: the new site's images are in the sum.
    assert row["total_images"] == sum(own_figures(deployment, s, fault_run.first_job)[0].num_samples for s in ALL_SITES)
    # Every site pinned the new member from the re-signed list (v5) when the job opened it.
    for site in ALL_SITES:
        pins = json.loads((deployment.kit(site) / "local" / "secagg_pins.json").read_text())
        assert pins["version"] == 5 and sorted(pins["members"]) == ALL_SITES, site


def test_a_site_hung_past_the_round_timeout_is_dropped_and_the_round_completes_with_the_others(deployment, fault_run):
    assert fault_run.rows_when_hung == 1  # stopped in round 2, after sharing its keys
    row = fault_run.rows_when_continued[1]  # recorded while site-2 was still stopped
    assert row["round"] == 1 and row["applied"], row
    assert row["participants"] == ["site-1", "site-3", "site-4"]
    assert list(row["failed"]) == [HUNG_SITE]
    assert row["failed"][HUNG_SITE].startswith(f"train: no answer within {FAULT_JOB.round_timeout_s} s"), row
    assert row["duration_s"] >= FAULT_JOB.round_timeout_s  # the round waited out the timeout, then went on


def test_the_hung_site_rejoins_the_next_round_after_sigcont(deployment, fault_run):
    row = fault_rows(deployment)[2]
    assert row["participants"] == ALL_SITES and row["failed"] == {} and row["applied"], row
    rounds_trained = [f.round for f in own_figures(deployment, HUNG_SITE, fault_run.first_job) if f.round >= 2]
    assert rounds_trained[:1] == [2]  # in the same job (FLARE never relaunches a site's job process)


def test_the_server_sigkilled_mid_job_and_restarted_from_its_kit_completes_rounds_0_to_3_exactly_once(deployment,
                                                                                                   fault_run):
    # The kill landed in round 4, after rounds 1-3 were saved; the orphaned job process saved nothing more.
    assert len(fault_run.server_pids_killed) >= 2  # the server process and the job process it had started
    assert fault_run.checkpoint_at_kill.last_completed_round == 2
    assert fault_run.rows_when_orphan_stopped == 3
    assert "that started this job is gone: stopping the job without saving the round in progress" in \
        deployment.log(SERVER).read_text(errors="replace")  # the orphan's own line (ultrafedfm.flare.server.parent_watch)
    # FLARE 2.9 cannot resume the killed job (its record stays RUNNING); the resubmitted job completes the run.
    assert fault_run.jobs_after_restart[fault_run.first_job] == "RUNNING"
    assert "FINISHED:COMPLETED" in fault_run.second_meta["status"], fault_run.second_meta
    assert "continuing with round 4/4" in fault_run.server_log_after_restart
    rows = fault_rows(deployment)
    assert [r["round"] for r in rows] == [0, 1, 2, 3] and all(r["applied"] for r in rows), rows
    assert rows[3]["participants"] == ALL_SITES
    state = RunState(deployment.kit(SERVER) / "ultrafedfm_runs", FAULT_JOB.name)
    final = state.load()
    assert final.last_completed_round == 3 and [h["round"] for h in final.history] == [0, 1, 2, 3]
    assert (state.dir / "final_model.pt").is_file()
    # None applied twice: the resubmitted job trained round 4 only, and each model's sum was unmasked once.
    for site in ALL_SITES:
        assert [f.round for f in own_figures(deployment, site, fault_run.second_job)] == [3], site
        ledger = json.loads((deployment.kit(site) / "local" / "secagg_ledger.json").read_text())
        assert [e["round"] for e in ledger["rounds"] if e["job"] == fault_run.second_job] == [3]
        assert all(e["masked_inputs"] <= 1 for e in ledger["rounds"]), site
    survivors = json.loads((state.dir / "secagg_survivors.json").read_text())["models"]
    assert sorted(m["round"] for m in survivors.values()) == [0, 1, 2, 3]


def test_the_sites_reconnect_to_the_restarted_server_on_their_own(deployment, fault_run):
    # Every site's FLARE process from before the kill is alive after the restart (nobody restarted a site,
    # none died of losing its server), and all four registered again.
    assert fault_run.site_pids_after_restart == fault_run.site_pids
    assert registered_sites(deployment) == set(ALL_SITES)


def test_zz_everything_stops_with_no_process_left(deployment):
    leftovers = deployment.stop()
    assert leftovers == [], leftovers
    assert all(p.poll() is not None for p in deployment.processes.values())
