"""The committed job folders are exactly what their Python definitions export."""
from __future__ import annotations

import json
from pathlib import Path

from ultrafedfm.cli import main
from ultrafedfm.flare.deploy.job_builder import check_committed_jobs, diff_job_folders, export_job_folder
from ultrafedfm.federation.job_spec import JOB_SPECS

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_every_committed_job_folder_is_exactly_its_specs_export_and_every_spec_is_committed():
    drift = check_committed_jobs(JOBS)
    committed = {p.name for p in JOBS.iterdir() if p.is_dir()}
    assert set(drift) == set(JOB_SPECS) == committed
    assert {"mae_pretrain", "mae_pretrain_tiny", "mae_pretrain_dp", "mae_pretrain_tiny_dp"} <= committed
    assert drift == {name: [] for name in drift}, "run `ultrafedfm jobs export` and commit jobs/"


def test_a_changed_knob_is_reported_as_drift(tmp_path):
    import dataclasses

    spec = dataclasses.replace(JOB_SPECS["mae_pretrain"], num_rounds=299)
    changed = export_job_folder(spec, tmp_path)
    problems = diff_job_folders(JOBS / "mae_pretrain", changed)
    assert problems == ["app/config/config_fed_server.json (differs)"]
    assert main(["jobs", "check", "--dir", str(tmp_path)]) == 1


def test_paper_job_folder_holds_the_paper_setup():
    server = json.loads((JOBS / "mae_pretrain" / "app" / "config" / "config_fed_server.json").read_text())
    spec = server["workflows"][0]["args"]["spec"]
    assert (spec["preset"], spec["img_size"], spec["num_rounds"], spec["min_sites"]) == ("base", 224, 300, 3)
    client = json.loads((JOBS / "mae_pretrain" / "app" / "config" / "config_fed_client.json").read_text())
    executor = client["executors"][0]["executor"]
    assert executor["path"].endswith("ClientAPIExecutor")
    assert executor["args"]["params_transfer_type"] == "DIFF"
    # NumPy both ways: FLARE passes params untouched, so secure-aggregation bytes arrive intact.
    assert executor["args"]["params_exchange_format"] == "numpy"
    assert executor["args"].get("server_expected_format", "numpy") == "numpy"  # omitted when FLARE's default
    assert spec["secure_aggregation"] is True and spec["secagg_phase_timeout_s"] == 60
    assert executor["args"]["command"][-1] == "ultrafedfm.flare.site.client_script"
    meta = json.loads((JOBS / "mae_pretrain" / "meta.json").read_text())
    assert meta["min_clients"] == 3
