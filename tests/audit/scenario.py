"""A small finished run on disk, made of the real pieces the audit reads, for the audit's tests.

Each round runs the real secure-aggregation protocol (``ultrafedfm.secagg``: site-held Ed25519 keys,
a signed member list, masks, unmasking) over real site caches; every message each site sends is
logged by ``record_outgoing`` at the site and ``record_received`` at the server exactly where the
transport would call them; DP rounds are charged in each site's real ledger (the site's accountant)
before the round; the server appends aggregates to a real ``rounds.jsonl`` (``RunState``); each site
appends its own figures with ``append_site_figures``. Kits get real X.509 certificates (a root CA and
one certificate per participant) and the member list. FLARE's part is the ``audit.log`` and job
``meta.json`` captured from a real provisioned FLARE 2.9 server (``data/``), and the job's real
``config_fed_server.json`` layout with our job spec.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from caches import make_cache
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.site_figures import SiteRoundFigures, append_site_figures, site_figures_path
from ultrafedfm.kit.enroll import load_server_membership, open_site
from ultrafedfm.kit.simulation_members import make_simulation_members
from ultrafedfm.privacy.audit import (
    read_received_records, record_outgoing, record_received, write_server_report, write_site_report,
)
from ultrafedfm.privacy.dp import DPConfig, PrivacyLedger, plan_job, site_ledger_path
from ultrafedfm.privacy.policy import PrivacyPolicy
from ultrafedfm.secagg import (
    RoundContext, RoundFigures, SecAggClient, SecAggConfig, SecAggServer, from_bytes, model_digest, to_bytes,
)

DATA = Path(__file__).parent / "data"
FLARE_JOB_ID = json.loads((DATA / "flare_job_meta.json").read_text())["job_id"]  # the captured real job
SECAGG_KEY = "__secagg__"
TASKS = ("secagg_advertise_keys", "secagg_share_keys", "train", "secagg_consistency_check", "secagg_unmask")


@dataclass
class Scenario:
    root: Path
    sites: list[str]
    caches: dict[str, Path]
    kits: dict[str, Path]
    policies: dict[str, PrivacyPolicy]
    run_dir: Path
    download: Path
    server_kit: Path
    job_id: str
    spec: dict
    sizes: dict[str, int]
    rounds: int
    truth: dict = field(default_factory=dict)  # what the scenario did, for the tests to compare with


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_kit_certificates(kits: dict[str, Path], *, root_cn: str = "ufm-audit-root", days: dict[str, int] | None = None,
                          now: dt.datetime | None = None) -> None:
    """A root CA and one certificate per kit (``startup/rootCA.pem``, ``startup/<role>.crt``), like FLARE's provisioning."""
    now = now or dt.datetime.now(dt.timezone.utc)
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = (x509.CertificateBuilder().subject_name(_name(root_cn)).issuer_name(_name(root_cn))
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=3650))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(root_key, hashes.SHA256()))
    for name, kit in kits.items():
        key = ec.generate_private_key(ec.SECP256R1())
        not_after = now + dt.timedelta(days=(days or {}).get(name, 365), hours=12)
        cert = (x509.CertificateBuilder().subject_name(_name(name)).issuer_name(root.subject)
                .public_key(key.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(min(now, not_after) - dt.timedelta(days=30))
                .not_valid_after(not_after)
                .sign(root_key, hashes.SHA256()))
        startup = kit / "startup"
        startup.mkdir(parents=True, exist_ok=True)
        (startup / "rootCA.pem").write_bytes(root.public_bytes(serialization.Encoding.PEM))
        role = "server" if name == "server" else "client"
        (startup / f"{role}.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (startup / f"{role}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                                serialization.PrivateFormat.PKCS8,
                                                                serialization.NoEncryption()))


def _array(message) -> np.ndarray:
    return np.frombuffer(to_bytes(message), dtype=np.uint8)


def _message(params: dict):
    return from_bytes(memoryview(np.ascontiguousarray(params[SECAGG_KEY])))


def run_scenario(root: Path, *, sites: tuple[str, ...] = ("site-1", "site-2", "site-3", "site-4"), rounds: int = 3,
                 dp: bool = True, secure: bool = True, drop_before_input: dict[int, str] | None = None,
                 policies: dict[str, dict] | None = None, cert_days: dict[str, int] | None = None, dim: int = 96,
                 noise_multiplier: float = 1.0) -> Scenario:
    """Run ``rounds`` rounds over ``sites`` and leave every file the audit reads under ``root``."""
    sites = list(sites)
    sizes = {s: 40 + 20 * i for i, s in enumerate(sites)}  # with batch 2: sampling rates 0.05 .. 0.02
    caches = {s: make_cache(root / "caches" / s, n_images=n, seed=i) for i, (s, n) in enumerate(sizes.items())}
    kits = {s: root / "kits" / s for s in sites}
    server_kit = root / "server-kit"
    make_kit_certificates({**kits, "server": server_kit}, days=cert_days)
    files, members_path = make_simulation_members(root / "secagg", sites)
    for s in sites:
        (kits[s] / "local").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(members_path, kits[s] / "local" / "members.json")
    (server_kit / "local").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(members_path, server_kit / "local" / "members.json")
    shutil.copyfile(DATA / "flare_server_audit.log", server_kit / "audit.log")
    members = load_server_membership(members_path)
    material = {s: open_site(files[s]) for s in sites}
    policy_objs = {s: PrivacyPolicy(**{"max_epsilon": 10.0, "lifetime_epsilon": 30.0, **(policies or {}).get(s, {})})
                   for s in sites}

    job_id = FLARE_JOB_ID
    dp_config = DPConfig(enabled=True, noise_multiplier=noise_multiplier, max_grad_norm=1.0, accountant="rdp")
    plans = {s: plan_job(dp_config, policy_objs[s], site_name=s, job="audit_test", num_images=sizes[s], batch_size=2,
                         rounds=rounds, local_epochs=1) for s in sites} if dp else {}
    run = RunState(root / "runs", "audit_run")
    config = SecAggConfig(max_weight=100.0)
    rng = np.random.default_rng(0)
    weights = {"w": np.zeros(dim, np.float32)}
    # What was sent, kept apart from the logs: (site, task, round, the params as they left).
    truth = {"payloads": [], "rounds": []}

    def send(site: str, task: str, rnd: int, params: dict, meta=None, metrics=None) -> dict:
        truth["payloads"].append((site, task, rnd, {k: np.array(v, copy=True) for k, v in params.items()}))
        record_outgoing(caches[site], site=site, job_id=job_id, task=task, round_index=rnd, params=params,
                        meta=meta, metrics=metrics)
        record_received(run.dir, site=site, job_id=job_id, task=task, round_index=rnd, params=params, metrics=metrics)
        return params

    for rnd in range(rounds):
        dropped = (drop_before_input or {}).get(rnd)
        figures, charges = {}, {}
        for s in sites:
            if dp:
                ledger = PrivacyLedger(site_ledger_path(caches[s]), site_name=s)
                charges[s] = ledger.charge_round(plans[s], job_id=job_id, round_index=rnd, policy=policy_objs[s])
                ledger.record_completion(charges[s], steps_taken=plans[s].steps_per_round, clipping="ghost")
            figures[s] = RoundFigures(loss=0.5 + 0.1 * sites.index(s) + 0.01 * rnd, steps=plans[s].steps_per_round
                                      if dp else 3, num_samples=sizes[s])
        deltas = {s: rng.normal(0, 0.01, dim).astype(np.float32) for s in sites}
        failed = {}
        if secure:
            context = RoundContext(model_sha256=model_digest(weights), lr=1e-3, training={"round": rnd})
            server = SecAggServer(members=members, job_id=job_id, round_number=rnd, config=config, context=context)
            clients = {s: SecAggClient(signer=material[s].signer, members=material[s].members, job_id=job_id,
                                       round_number=rnd, config=config, context=context, ledger=material[s].ledger,
                                       min_sites=3) for s in sites}
            for s, c in clients.items():
                server.receive_advertisement(_message(send(s, TASKS[0], rnd, {SECAGG_KEY: _array(c.advertise_keys())})))
            roster = server.key_roster()
            for s, c in clients.items():
                server.receive_encrypted_shares(_message(send(s, TASKS[1], rnd, {SECAGG_KEY: _array(c.share_keys(roster))})))
            deliveries = server.share_deliveries()
            for s, c in clients.items():
                if s == dropped:
                    failed[s] = "train: no answer within 600 s (timed out, or the site's process died)"
                    continue
                c.check_task_context(context)
                masked = c.mask_input(deliveries[s], delta=deltas[s], weight=float(sizes[s]), figures=figures[s],
                                      trained_with=context)
                message = _message(send(s, TASKS[2], rnd, {SECAGG_KEY: _array(masked)}))
                server.check_masked_input(message)
                server.receive_masked_input(message)
            survivor_list = server.survivor_list()
            for s in survivor_list.survivors:
                server.receive_survivor_signature(_message(send(s, TASKS[3], rnd, {
                    SECAGG_KEY: _array(clients[s].sign_survivors(survivor_list))})))
            request = server.unmask_request()
            for s in request.survivors:
                server.receive_unmask_response(_message(send(s, TASKS[4], rnd, {
                    SECAGG_KEY: _array(clients[s].unmask(request))})))
            result = server.aggregate()
            weights = {"w": weights["w"] + result.mean_delta(np.float32)}  # the next round's model differs
            participants = sorted(result.survivors)
            row = dict(round=rnd, num_rounds=rounds, lr=1e-3, targets=sites, participants=participants, failed=failed,
                       global_loss=float(result.figures.loss), total_images=int(result.figures.num_samples),
                       total_steps=int(result.figures.steps), bytes_received=0, duration_s=0.5, applied=True,
                       message=(f"secure aggregation recovered from dropped site(s) {', '.join(result.dropped)}"
                                if result.dropped else ""))
        else:
            for s in sites:
                send(s, "train", rnd, {"w": deltas[s]}, meta={"num_samples": sizes[s]},
                     metrics={"loss": figures[s].loss, "train_seconds": 0.1})
            participants = sites
            # An older server kept per-site values in its round records.
            row = dict(round=rnd, num_rounds=rounds, lr=1e-3, targets=sites, participants=sites, failed={},
                       loss={s: figures[s].loss for s in sites}, num_samples=dict(sizes),
                       global_loss=float(np.average([figures[s].loss for s in sites], weights=list(sizes.values()))),
                       bytes_received=dim * 4 * len(sites), duration_s=0.5, applied=True, message="")
        run.append_round(row)
        truth["rounds"].append(row)
        for s in sites:
            spent = charges.get(s)  # what the site reports after the round: its own charge's figures
            append_site_figures(site_figures_path(caches[s]), SiteRoundFigures(
                job="audit_test", job_id=job_id, round=rnd, loss=figures[s].loss, num_samples=sizes[s],
                steps=figures[s].steps, train_seconds=0.1, masked=secure, clipped_coordinates=0,
                epsilon=spent.epsilon_job if spent else None, delta=spent.delta if spent else None,
                accountant=spent.accountant if spent else None))

    spec = {"name": "audit_test", "num_rounds": rounds, "min_sites": 3, "secure_aggregation": secure,
            "dp": dataclasses.asdict(dp_config) if dp else {**dataclasses.asdict(DPConfig()), "enabled": False}}
    download = root / "download" / job_id
    (download / "job" / "app" / "config").mkdir(parents=True)
    (download / "job" / "app" / "config" / "config_fed_server.json").write_text(json.dumps(
        {"format_version": 2, "workflows": [{"id": "mae_pretrain", "path":
                                             "ultrafedfm.flare.server.controller.MaePretrainController",
                                             "args": {"spec": spec}}]}))
    shutil.copyfile(DATA / "flare_job_meta.json", download / "meta.json")
    (download / "workspace").mkdir()
    return Scenario(root=root, sites=sites, caches=caches, kits=kits, policies=policy_objs, run_dir=run.dir,
                    download=download, server_kit=server_kit, job_id=job_id, spec=spec, sizes=sizes, rounds=rounds,
                    truth=truth)


ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "audit"  # ignored by git


def copy_run(run: Scenario, dest: Path) -> Scenario:
    """The same run under ``dest`` (to tamper with)."""
    shutil.copytree(run.root, dest)
    moved = lambda p: dest / Path(p).relative_to(run.root)  # noqa: E731
    return Scenario(root=dest, sites=run.sites, caches={k: moved(v) for k, v in run.caches.items()},
                    kits={k: moved(v) for k, v in run.kits.items()}, policies=run.policies, run_dir=moved(run.run_dir),
                    download=moved(run.download), server_kit=moved(run.server_kit), job_id=run.job_id, spec=run.spec,
                    sizes=run.sizes, rounds=run.rounds, truth=run.truth)


def write_reports(run: Scenario, out: Path, *, site: str = "site-1") -> tuple[dict, dict, Path, Path]:
    """The server's report (from the download, the run folder and its kit), then ``site``'s, matched against it."""
    server = write_server_report(run_dir=run.run_dir, roots=[run.download], workspace=run.server_kit,
                                 out_dir=out / "server")
    site_files = write_site_report(site=site, cache=run.caches[site], policy=run.policies[site], kit=run.kits[site],
                                   job_id=run.job_id, received=read_received_records(server.json),
                                   out_dir=out / site)
    return (json.loads(server.json.read_text()), json.loads(site_files.json.read_text()), server.html,
            site_files.html)
