"""Every figure in the reports equals an independent recomputation from the logs, ledgers and certificates.

The recomputations here read the raw files with ``json`` (not the audit's readers), take the
payloads as they were sent (kept by the scenario, apart from any log), recompute epsilon with
Google's ``dp-accounting`` (not the ledger's Opacus accountant) and fingerprints with
``cryptography``.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import dp_accounting
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from dp_accounting import rdp
from opacus.accountants import RDPAccountant

from test_audit_payload_log import _digest_by_the_doc
from ultrafedfm.privacy.audit.schema import REPORT_SCHEMA

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema (test dependency) validates the report schema")


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _charges(cache: Path) -> list[dict]:
    return [e for e in json.loads((cache / "privacy" / "dp_ledger.json").read_text())["entries"] if e["kind"] == "charge"]


def _rdp_epsilon(charges: list[dict], delta: float) -> float:
    accountant = rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    accountant.compose(dp_accounting.ComposedDpEvent([dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(c["sample_rate"], dp_accounting.GaussianDpEvent(c["noise_multiplier"])),
        c["steps"]) for c in charges]))
    return accountant.get_epsilon(delta)


def test_both_reports_follow_the_versioned_json_schema(reports):
    server, site, _, _ = reports
    for report in (server, site):
        jsonschema.validate(report, REPORT_SCHEMA)
        assert report["schema"] == "ultrafedfm-audit-report" and report["schema_version"] == 1
        assert list(report)[:4] == ["schema", "schema_version", "kind", "findings"]  # findings come first


def test_server_rounds_equal_what_happened_and_the_sites_own_figures(finished_run, reports):
    server, _, _, _ = reports
    run = finished_run
    figures = {s: {f["round"]: f for f in _lines(run.caches[s] / "privacy" / "round_figures.jsonl")}
               for s in run.sites}
    members = json.loads((run.server_kit / "local" / "members.json").read_text())["members"]
    assert len(server["rounds"]) == run.rounds
    for row, truth in zip(server["rounds"], run.truth["rounds"]):
        rnd = row["round"]
        assert row["participants"] == truth["participants"] and row["applied"]
        assert [d["site"] for d in row["dropouts"]] == sorted(truth["failed"])
        assert row["recovered"] == (["site-3"] if rnd == 1 else [])
        assert row["threshold"] == len(members) // 2 + 1 == 3
        assert row["secure_aggregation"] is True
        own = [figures[s][rnd] for s in row["participants"]]
        images = sum(f["num_samples"] for f in own)
        assert row["aggregate"]["total_images"] == images
        assert row["aggregate"]["total_steps"] == sum(f["steps"] for f in own)
        weighted = sum(f["loss"] * f["num_samples"] for f in own) / images
        assert row["aggregate"]["global_loss"] == pytest.approx(weighted, abs=1e-4)  # decoded from the masked sum
        sent = [p for s, t, r, p in run.truth["payloads"] if r == rnd]
        assert row["bytes_received"] == sum(a.nbytes for p in sent for a in p.values())
        assert row["messages_received"] == len(sent)
    # Aggregates only: no per-site loss, image count or time anywhere in the report.
    def keys(value):
        if isinstance(value, dict):
            return set(value) | set().union(*(keys(v) for v in value.values()))
        return set().union(*(keys(v) for v in value)) if isinstance(value, list) else set()
    assert not {"loss", "num_samples", "train_seconds"} & keys(server)


def test_every_received_payload_is_listed_with_the_hash_of_what_was_sent(finished_run, reports):
    server, _, _, _ = reports
    expected = sorted((s, t, r, *_digest_by_the_doc(p)) for s, t, r, p in finished_run.truth["payloads"])
    listed = sorted((m["site"], m["task"], m["round"], m["sha256"], m["bytes"]) for m in server["received"]["items"])
    assert listed == expected
    assert server["received"]["chain_intact"] is True
    assert {m["form"] for m in server["received"]["items"] if m["task"] == "train"} == {"masked"}


def test_server_transport_and_flare_audit_come_from_the_kit_and_flare_files(finished_run, reports):
    server, _, _, _ = reports
    run = finished_run
    cert = x509.load_pem_x509_certificate((run.server_kit / "startup" / "server.crt").read_bytes())
    listed = {c["file"]: c for c in server["transport"]["certificates"]}
    assert set(listed) == {"startup/server.crt", "startup/rootCA.pem"}
    assert listed["startup/server.crt"]["fingerprint_sha256"] == cert.fingerprint(hashes.SHA256()).hex()
    assert listed["startup/server.crt"]["issuer"] == "ufm-audit-root" and listed["startup/server.crt"]["days_left"] == 10
    assert server["transport"]["membership"]["size"] == 4
    meta = json.loads((run.download / "meta.json").read_text())
    assert server["subject"]["submitted_by"] == meta["submitter_name"] == "admin@ufm-e2e.org"
    assert server["subject"]["submitted_at"] == meta["submit_time_iso"]
    # The submission line of FLARE's own audit.log (it names the job's upload folder, not its id).
    submit = [line for line in (run.server_kit / "audit.log").read_text().splitlines() if "submit_job" in line]
    assert len(submit) == 1 and meta["job_folder_name"] in submit[0]
    events = server["flare_audit"]["submission_events"]
    assert [(e["user"], e["time"]) for e in events] == [("admin@ufm-e2e.org", "2026-12-02T06:06:17")]
    assert any(e["action"] == f"abort_job {run.job_id}" for e in server["flare_audit"]["events"])


def test_site_privacy_figures_equal_an_independent_accountant_and_the_policy(finished_run, reports):
    _, site, _, _ = reports
    run = finished_run
    charges = _charges(run.caches["site-1"])
    delta = charges[-1]["delta"]
    job = site["privacy"]["jobs"][0]
    independent = _rdp_epsilon(charges, delta)
    assert job["epsilon"] == pytest.approx(independent, rel=1e-3)
    assert job["delta"] == delta and job["accountant"] == "rdp"
    assert job["noise_multiplier"] == [1.0] and job["max_grad_norm"] == [1.0]
    assert job["sample_rate"] == sorted({c["sample_rate"] for c in charges})
    assert job["steps_charged"] == sum(c["steps"] for c in charges) and job["rounds_charged"] == run.rounds
    life = site["privacy"]["lifetime"]
    assert life["epsilon"] == pytest.approx(_rdp_epsilon(charges, min(c["delta"] for c in charges)), rel=1e-3)
    policy = run.policies["site-1"]
    assert site["privacy"]["policy"]["max_epsilon"] == policy.max_epsilon == 10.0
    assert site["privacy"]["budget_left"]["lifetime_left"] == pytest.approx(policy.lifetime_epsilon - life["epsilon"])
    assert site["privacy"]["budget_left"]["job_left"][run.job_id] == pytest.approx(policy.max_epsilon - job["epsilon"])
    assert [p["epsilon_job"] for p in site["privacy"]["epsilon_by_round"]] == [c["epsilon_job"] for c in charges]


def test_site_messages_and_bytes_equal_what_the_site_sent(finished_run, reports):
    _, site, _, _ = reports
    sent = [(t, r, *_digest_by_the_doc(p)) for s, t, r, p in finished_run.truth["payloads"] if s == "site-1"]
    items = site["messages"]["items"]
    assert [(m["task"], m["round"], m["sha256"], m["bytes"]) for m in items] == sent
    assert {m["match"] for m in items} == {"matched"} and site["messages"]["chain_intact"]
    assert all(m["masked"] == (m["task"] == "train") for m in items)
    by_round = defaultdict(int)
    for line in _lines(finished_run.caches["site-1"] / "privacy" / "outgoing_payloads.jsonl"):
        by_round[line["round"]] += line["bytes"]
    assert {r["round"]: r["bytes"] for r in site["bytes_by_round"]} == dict(by_round)


def test_a_site_that_dropped_out_shows_the_round_it_did_not_send(finished_run, tmp_path):
    from scenario import write_reports

    _, site3, _, _ = write_reports(finished_run, tmp_path, site="site-3")
    trained = sorted(m["round"] for m in site3["messages"]["items"] if m["task"] == "train")
    assert trained == [0, 2]  # it dropped out of round 2 (index 1) after sharing keys
    assert {m["match"] for m in site3["messages"]["items"]} == {"matched"}
