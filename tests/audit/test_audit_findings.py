"""Findings come first and say plainly what is off: tampering, no secure aggregation, DP off, caps, certificates."""
from __future__ import annotations

import json
import re

import pytest

from scenario import copy_run, write_reports
from scenario import run_scenario
from ultrafedfm.privacy.audit import write_site_report


def _codes(report: dict) -> list[str]:
    return [f["code"] for f in report["findings"]]


def _first_finding_in_html(html_path) -> tuple[str, str]:
    """(severity, code) of the first finding on the page, and the page must show findings before anything else."""
    html = html_path.read_text()
    body = html[html.index("<body>"):]
    assert body.index('id="findings"') < body.index("<h2>", body.index('id="findings"') + 40), "findings are not first"
    match = re.search(r'class="finding" data-severity="(\w+)" data-code="(\w+)"', body)
    return match.group(1), match.group(2)


def test_a_clean_run_has_no_critical_finding_and_flags_the_expiring_certificate(reports):
    server, site, server_html, site_html = reports
    assert [f["severity"] for f in server["findings"]] == ["warning"]
    assert _codes(server) == ["certificate_expiring"] and "in 10 days" in server["findings"][0]["message"]
    assert site["findings"] == []
    assert "No findings" in site_html.read_text()


def test_an_edited_hash_in_the_sites_payload_log_is_the_first_finding(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    log = run.caches["site-1"] / "privacy" / "outgoing_payloads.jsonl"
    lines = log.read_text().splitlines()
    record = json.loads(lines[7])  # the masked update of round 2 (index 1): five messages a round
    assert record["task"] == "train"
    record["sha256"] = "f" * 64  # what a site would do to hide what it sent
    lines[7] = json.dumps(record, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    _, site, _, site_html = write_reports(run, tmp_path / "out")
    assert site["findings"][0]["severity"] == "critical"
    assert set(_codes(site)[:2]) == {"payload_log_tampered", "payload_hash_mismatch"}
    assert "record 8" in site["findings"][_codes(site).index("payload_log_tampered")]["message"]
    mismatch = [m for m in site["messages"]["items"] if m["match"] == "hash_mismatch"]
    assert [(m["task"], m["round"]) for m in mismatch] == [("train", 1)]
    assert _first_finding_in_html(site_html)[0] == "critical"


def test_an_edited_server_log_is_flagged_at_the_server_and_as_a_mismatch_at_the_site(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    log = run.run_dir / "received_payloads.jsonl"
    lines = log.read_text().splitlines()
    index = next(i for i, line in enumerate(lines) if '"site": "site-1"' in line and '"task": "train"' in line)
    record = json.loads(lines[index])
    record["sha256"] = "0" * 64
    lines[index] = json.dumps(record, sort_keys=True)
    log.write_text("\n".join(lines) + "\n")
    server, site, server_html, _ = write_reports(run, tmp_path / "out")
    assert server["findings"][0]["code"] == "payload_log_tampered"
    assert _first_finding_in_html(server_html) == ("critical", "payload_log_tampered")
    assert site["findings"][0]["code"] == "payload_hash_mismatch"


def test_a_message_the_site_never_sent_is_flagged(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    log = run.caches["site-2"] / "privacy" / "outgoing_payloads.jsonl"
    log.write_text("\n".join(log.read_text().splitlines()[:-1]) + "\n")  # the last record removed from the site's log
    _, site, _, _ = write_reports(run, tmp_path / "out", site="site-2")
    assert site["findings"][0]["code"] == "payload_not_sent_by_site"


@pytest.fixture(scope="module")
def run_without_dp(tmp_path_factory):
    return run_scenario(tmp_path_factory.mktemp("no-dp"), sites=("site-1", "site-2", "site-3"), rounds=2, dp=False)


def test_a_run_without_dp_says_so_at_the_top_of_both_reports(run_without_dp, tmp_path):
    server, site, server_html, site_html = write_reports(run_without_dp, tmp_path)
    assert site["findings"][0]["code"] == "dp_off" and "OFF" in site["findings"][0]["message"]
    assert server["findings"][0]["code"] == "dp_off"
    assert _first_finding_in_html(site_html)[1] == "dp_off"
    assert _first_finding_in_html(server_html)[1] == "dp_off"
    assert site["privacy"]["jobs"][0]["dp"] is False


def test_dp_off_at_a_site_whose_policy_requires_it_is_critical(run_without_dp, tmp_path):
    from ultrafedfm.privacy.policy import PrivacyPolicy

    files = write_site_report(site="site-1", cache=run_without_dp.caches["site-1"],
                              policy=PrivacyPolicy(require_dp=True), out_dir=tmp_path)
    report = json.loads(files.json.read_text())
    assert report["findings"][0]["severity"] == "critical" and report["findings"][0]["code"] == "dp_off"


def test_a_run_without_secure_aggregation_says_so_at_the_top_of_both_reports(tmp_path):
    run = run_scenario(tmp_path / "run", sites=("site-1", "site-2", "site-3"), rounds=2, secure=False)
    server, site, server_html, site_html = write_reports(run, tmp_path / "out")
    assert server["findings"][0]["severity"] == "critical"
    assert server["findings"][0]["code"] == "no_secure_aggregation"
    assert "per_site_values_stored" in _codes(server)  # the old-style round records held per-site values
    assert {r["secure_aggregation"] for r in server["rounds"]} == {False}
    assert site["findings"][0]["code"] == "no_secure_aggregation" and "WITHOUT" in site["findings"][0]["message"]
    assert {m["form"] for m in site["messages"]["items"]} == {"clear"}
    assert _first_finding_in_html(server_html) == ("critical", "no_secure_aggregation")
    assert _first_finding_in_html(site_html) == ("critical", "no_secure_aggregation")


def test_a_site_near_its_cap_is_warned(finished_run, tmp_path):
    policy = finished_run.policies["site-1"]
    from dataclasses import replace

    near = replace(policy, max_epsilon=2.0)  # the run spent about 1.9 of it
    files = write_site_report(site="site-1", cache=finished_run.caches["site-1"], policy=near,
                              job_id=finished_run.job_id, out_dir=tmp_path)
    report = json.loads(files.json.read_text())
    # No server log given: the messages are unverified (an information, after the warning).
    assert _codes(report) == ["site_near_cap", "payloads_unverified"]
    assert "max_epsilon: 2" in report["findings"][0]["message"]


def test_an_edited_epsilon_in_the_ledger_is_caught_by_the_recomputation(finished_run, tmp_path):
    run = copy_run(finished_run, tmp_path / "run")
    path = run.caches["site-1"] / "privacy" / "dp_ledger.json"
    ledger = json.loads(path.read_text())
    charges = [e for e in ledger["entries"] if e["kind"] == "charge"]
    charges[-1]["epsilon_job"] = 0.5  # someone under-reports what was spent
    path.write_text(json.dumps(ledger))
    files = write_site_report(site="site-1", cache=run.caches["site-1"], policy=run.policies["site-1"],
                              job_id=run.job_id, out_dir=tmp_path / "out")
    report = json.loads(files.json.read_text())
    assert report["findings"][0]["code"] == "ledger_epsilon_mismatch" and "0.5000" in report["findings"][0]["message"]
    assert report["privacy"]["jobs"][0]["epsilon"] > 1.0  # the report shows the recomputed figure


def test_an_expired_site_certificate_is_critical(finished_run, tmp_path):
    from scenario import make_kit_certificates

    run = copy_run(finished_run, tmp_path / "run")
    make_kit_certificates({"site-1": run.kits["site-1"]}, days={"site-1": -3})
    files = write_site_report(site="site-1", cache=run.caches["site-1"], policy=run.policies["site-1"],
                              kit=run.kits["site-1"], job_id=run.job_id, out_dir=tmp_path / "out")
    report = json.loads(files.json.read_text())
    assert report["findings"][0]["code"] == "certificate_invalid" and "expired" in report["findings"][0]["message"]
