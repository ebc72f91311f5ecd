"""DP-SGD with secure aggregation in the FLARE simulator: ``ultrafedfm demo --dp``."""
from __future__ import annotations

import json

import pytest

from ultrafedfm.cli.demo import run_demo
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.privacy.dp import read_ledger, site_ledger_path


@pytest.mark.slow
def test_demo_with_dp_runs_secure_rounds_and_every_site_reports_its_epsilon_from_its_own_ledger(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_demo(out=out, rounds=2, images_per_site=12, dp_epsilon=8.0, probe=False) == 0
    printed = capsys.readouterr().out
    rows = RunState(out / "run", "demo").read_rounds()
    assert [r["round"] for r in rows] == [0, 1] and all(r["applied"] for r in rows)
    assert all(set(r["participants"]) == {"site-1", "site-2", "site-3"} for r in rows)
    assert "each site's epsilon as the site itself reports it" in printed
    for name in ("site-1", "site-2", "site-3"):
        cache = out / "sites" / name / "cache"
        charges = read_ledger(site_ledger_path(cache), site_name=name).charges()
        assert [c.round for c in charges] == [0, 1] and charges[0].job == "ultrafedfm_demo"
        assert 0 < charges[0].epsilon_job < charges[1].epsilon_job <= 8.0 + 1e-6  # target 8 for the whole job
        figures = read_site_figures(site_figures_path(cache))
        assert [f.masked for f in figures] == [True, True]
        assert figures[-1].epsilon == pytest.approx(charges[-1].epsilon_job)
        line = next(t for t in printed.splitlines() if t.split()[:1] == [name] and "prv" in t)
        assert line.split()[2] == f"{charges[-1].epsilon_job:.3f}"
    # The server's records hold no epsilon: it is each site's own figure.
    assert "epsilon" not in (out / "run" / "demo" / "rounds.jsonl").read_text()
    # Every job ends with the privacy audit reports: the server's and each site's own, all hashes matched.
    server_report = json.loads(next((out / "run" / "demo" / "audit").glob("*/report.json")).read_text())
    assert "audit report :" in printed and str(out / "run" / "demo" / "audit") in printed
    for name in ("site-1", "site-2", "site-3"):
        site_report = next((out / "sites" / name / "cache" / "privacy" / "audit").glob("*/report.json"))
        assert str(site_report.with_suffix(".html")) in printed
    assert server_report["schema_version"]
    card = json.loads((out / "run" / "demo" / "encoder.json").read_text())["card"]
    assert "DP-SGD at every site (target epsilon 8 per site" in card["privacy"]
