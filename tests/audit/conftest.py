"""Shared fixtures of the audit tests: one finished run on disk (read-only), and its two reports."""
from __future__ import annotations

import json

import pytest

from scenario import Scenario, run_scenario, write_reports



@pytest.fixture(scope="session")
def finished_run(tmp_path_factory) -> Scenario:
    """Four sites, three secure DP rounds; site-3 drops out of round 2 after sharing keys (the round recovers);
    the server's certificate expires in 10 days. Tests must not modify it: copy it first (``copy_run``)."""
    return run_scenario(tmp_path_factory.mktemp("finished-run"), drop_before_input={1: "site-3"},
                        cert_days={"server": 10})


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
