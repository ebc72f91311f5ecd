"""The audit over the real federation core: secure DP rounds over in-process sites with the audit calls wired.

``local_run.AuditedExchange`` makes the calls the transport layer is to make (each reply logged by
the site that sent it and by the server that received it); the reports at the end must match
every message and agree with the sites' own ledgers and figures.
"""
from __future__ import annotations

import json

import pytest

from local_run import SIZES, run
from ultrafedfm.privacy.dp import read_ledger, site_ledger_path


@pytest.mark.slow  # about 20 s on two idle cores, more when they are shared
def test_a_secure_dp_run_of_the_federation_core_audits_clean_and_every_hash_matches(tmp_path):
    result = run(tmp_path / "work", out=tmp_path / "out", rounds=2)
    server = json.loads(result.server.json.read_text())
    assert [r["participants"] for r in server["rounds"]] == [sorted(SIZES)] * 2
    assert all(r["secure_aggregation"] and r["aggregate"]["total_images"] == sum(SIZES.values())
               for r in server["rounds"])
    assert [f["code"] for f in server["findings"]] == ["flare_audit_log_missing"]  # no FLARE in this run
    sent_bytes = 0
    for name, files in result.sites.items():
        site = json.loads(files.json.read_text())
        assert site["findings"] == [], site["findings"]
        items = site["messages"]["items"]
        assert {m["match"] for m in items} == {"matched"} and len(items) == 2 * 5  # five tasks a round
        assert {m["form"] for m in items if m["task"] == "train"} == {"masked"}
        assert all(not m["clear_fields"] for m in items)  # nothing beside the masked vector
        ledger = read_ledger(site_ledger_path(result.caches[name]), site_name=name)
        assert site["privacy"]["jobs"][0]["epsilon"] == pytest.approx(ledger.spent(site["subject"]["jobs"][0]["job_id"])
                                                                      .epsilon)
        assert site["privacy"]["jobs"][0]["rounds_completed"] == 2
        sent_bytes += sum(m["bytes"] for m in items)
    assert sum(r["bytes_received"] for r in server["rounds"]) == sent_bytes
