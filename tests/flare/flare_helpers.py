"""Shared helpers of the FLARE tests: small real site caches and one-call simulator runs."""
from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

from caches import make_cache  # noqa: F401  (re-exported for the FLARE tests)
from ultrafedfm.flare.deploy.job_builder import build_job, export_job_folder
from ultrafedfm.federation.job_spec import JOB_SPECS, JobSpec
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.flare.deploy.simulation import SimulationResult, prepare_workspace, run_simulation, workspace_processes


def tiny_spec(tmp: Path, **changes) -> JobSpec:
    base = dict(
        name="flare_test", img_size=16, num_rounds=2, warmup_rounds=1, batch_size=8, base_lr=1.5e-2,
        min_sites=1, round_timeout_s=300, run_name="test", run_state_dir=str(tmp / "run"), degradations=False,
        secure_aggregation=False,  # the plaintext FedAvg tests; test_flare_secagg*.py turn it on
    )
    base.update(changes)
    return dataclasses.replace(JOB_SPECS["mae_pretrain_tiny"], **base)


def simulate(
    tmp: Path, spec: JobSpec, site_configs: dict[str, dict], *, timeout_s: float = 300, record_replies: Path | None = None,
    simulation_members: bool = True, **kwargs
) -> tuple[SimulationResult, RunState]:
    """Export ``spec``, run it in the simulator; ``record_replies``: the server records what every reply
    carries (names, dtypes, shapes; ``ultrafedfm.flare.server.reply_record``) into that file."""
    if record_replies is None:
        job_dir = export_job_folder(spec, tmp / "job", python=sys.executable)
    else:
        from nvflare.job_config.defs import FilterType

        from ultrafedfm.flare.registry import ALL_TASKS
        from ultrafedfm.flare.server.reply_record import ReplyRecorder

        job = build_job(spec, python=sys.executable)
        # The server's filter table is keyed by task name ("*" matches nothing there).
        job.to_server(ReplyRecorder(record_file=str(record_replies)), filter_type=FilterType.TASK_RESULT,
                      tasks=list(ALL_TASKS))
        job.export_job(str(tmp / "job"))
        job_dir = tmp / "job" / spec.name
    workspace = tmp / "ws"
    prepare_workspace(workspace, site_configs=site_configs, simulation_members=simulation_members)
    result = run_simulation(job_dir=job_dir, workspace=workspace, clients=sorted(site_configs), timeout_s=timeout_s, **kwargs)
    return result, RunState(spec.run_state_dir, spec.effective_run_name)


def site(cache: Path, **extra) -> dict:
    """A simulated site's site.yaml entry; by default its policy admits plaintext jobs (the FedAvg tests)."""
    return {"cache": str(cache), "num_workers": 0, "num_threads": 1,
            "privacy": {"require_secure_aggregation": False}, **extra}


def secure_site(cache: Path, **extra) -> dict:
    """A site with the default (strict) privacy policy: it requires secure aggregation."""
    return {"cache": str(cache), "num_workers": 0, "num_threads": 1, **extra}


def site_trainer_pids(workspace: Path, site_name: str) -> list[int]:
    """PIDs of the site's training process (the client script FLARE launched for it)."""
    pids = []
    for pid in workspace_processes(workspace):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            continue
        if b"ultrafedfm.flare.site.client_script" in cmdline and f"{os.sep}{site_name}{os.sep}" in cwd:
            pids.append(pid)
    return pids
