"""``ultrafedfm audit`` from the command line: the server's report from a download, a site's from its kit."""
from __future__ import annotations

import json

import yaml

from scenario import copy_run
from ultrafedfm.cli import main


def _site_kit(run, site: str) -> None:
    """What hospital IT has: local/site.yaml pointing at the cache, with the site's policy."""
    policy = run.policies[site]
    (run.kits[site] / "local" / "site.yaml").write_text(yaml.safe_dump({
        "cache": str(run.caches[site]),
        "privacy": {"max_epsilon": policy.max_epsilon, "lifetime_epsilon": policy.lifetime_epsilon}}))


def test_server_then_site_reports_from_the_command_line(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    code = main(["audit", "--server", str(run.download), "--run", str(run.run_dir), "--workspace", str(run.server_kit),
                 "--out", str(tmp_path / "server")])
    out = capsys.readouterr().out
    assert code == 0 and out.startswith("WARNING  The certificate startup/server.crt")  # findings first, then paths
    assert (tmp_path / "server" / "report.html").is_file()
    server = json.loads((tmp_path / "server" / "report.json").read_text())
    assert server["subject"]["job_id"] == run.job_id and len(server["rounds"]) == 3
    _site_kit(run, "site-2")
    code = main(["audit", "--site", str(run.kits["site-2"]), "--site-name", "site-2", "--server-report",
                 str(tmp_path / "server" / "report.json"), "--out", str(tmp_path / "site")])
    assert code == 0 and "no findings" in capsys.readouterr().out
    site = json.loads((tmp_path / "site" / "report.json").read_text())
    assert site["subject"]["site"] == "site-2" and site["messages"]["by_match"] == {"matched": 15}
    assert site["privacy"]["policy"]["max_epsilon"] == 10.0


def test_a_critical_finding_exits_1_and_is_printed_first(finished_run, tmp_path, capsys):
    run = copy_run(finished_run, tmp_path / "run")
    log = run.caches["site-1"] / "privacy" / "outgoing_payloads.jsonl"
    log.write_text(log.read_text().replace('"round": 2', '"round": 1', 1))  # a record moved to another round
    _site_kit(run, "site-1")
    code = main(["audit", "--site", str(run.kits["site-1"]), "--site-name", "site-1", "--server-report",
                 str(run.run_dir / "received_payloads.jsonl"), "--out", str(tmp_path / "site")])
    assert code == 1 and capsys.readouterr().out.startswith("CRITICAL")


def test_the_schema_prints_and_missing_inputs_exit_2(tmp_path, capsys):
    assert main(["audit", "--print-schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert schema["properties"]["schema_version"] == {"const": 1}
    assert main(["audit", "--server", str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")]) == 2
