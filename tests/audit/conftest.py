"""Shared fixtures of the audit tests: one finished run on disk (read-only), and its two reports."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from scenario import Scenario, run_scenario
from ultrafedfm.privacy.audit import read_received_records, write_server_report, write_site_report

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "audit"  # ignored by git


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Scenario:
    """Four sites, three secure DP rounds; site-3 drops out of round 2 after sharing keys (the round recovers);
    the server's certificate expires in 10 days. Tests must not modify it: copy it first (``copy_run``)."""
    return run_scenario(tmp_path_factory.mktemp("finished-run"), drop_before_input={1: "site-3"},
                        cert_days={"server": 10})


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


@pytest.fixture(scope="session")
def reports(finished_run, tmp_path_factory):
    """(server report, site-1 report, server html, site html) of the finished run."""
    return write_reports(finished_run, tmp_path_factory.mktemp("reports"))


@pytest.fixture(scope="session")
def quick_empirical(tmp_path_factory) -> dict:
    """The empirical audit's smoke run (``ultrafedfm audit --empirical --quick``): its report and HTML path."""
    from ultrafedfm.privacy.audit.empirical import run_empirical_audit

    files = run_empirical_audit(out_dir=tmp_path_factory.mktemp("empirical"), quick=True, seed=0)
    return {"report": json.loads(files.json.read_text()), "html": files.html}
