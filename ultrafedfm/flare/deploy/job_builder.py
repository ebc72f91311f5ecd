"""FLARE jobs for federated MAE pretraining, defined once in Python from a ``JobSpec``.

``build_job(spec)`` gives a ``FedJob``: our ``MaePretrainController`` on the server and, on
every site, ``python3 -m ultrafedfm.flare.site.client_script`` run by ``ClientAPIExecutor`` in
one external process per job. ``export_job_folder`` writes the folder that ``nvflare job submit -j`` takes;
the committed ``jobs/<name>`` folders are exactly that output (``ultrafedfm jobs check``).

The package is not copied into the job: servers and sites run with ``ultrafedfm`` installed, and their ``resources.json`` ``class_allow_list``
must admit ``ultrafedfm.flare.registry.REQUIRED_CLASS_ALLOW_LIST``.
"""
from __future__ import annotations

import filecmp
import logging
import shutil
import tempfile
from pathlib import Path

from nvflare.app_common.executors.client_api_executor import ClientAPIExecutor, ExecutionMode
from nvflare.client.config import ExchangeFormat, TransferType
from nvflare.job_config.api import FedJob

from ultrafedfm.config import to_mapping
from ultrafedfm.federation.job_spec import JOB_SPECS, JobSpec
from ultrafedfm.flare.registry import CLIENT_SCRIPT_MODULE
from ultrafedfm.flare.server.controller import MaePretrainController

_logger = logging.getLogger(__name__)

__all__ = ["build_job", "check_committed_jobs", "diff_job_folders", "export_all", "export_job_folder"]


def build_job(spec: JobSpec, *, python: str | None = None) -> FedJob:
    """The FLARE job for ``spec``.

    Args:
        spec: every knob of the job.
        python: interpreter that runs the site script (default ``python3``, as on a site whose
            environment has ``ultrafedfm`` installed; the simulator passes ``sys.executable``).
    """
    job = FedJob(name=spec.name, min_clients=spec.min_sites)
    job.set_app_packages(["ultrafedfm"])
    job.to_server(MaePretrainController(spec=to_mapping(spec)), id="mae_pretrain")
    # Idle sites poll for work this often; FLARE's 2 s default would dominate short rounds.
    job.to_server({"server": {"task_request_interval": spec.task_request_interval_s}})
    # The site script ships with the installed package (run as a module), so the job carries
    # no code; one process per job keeps the dataset and model across rounds.
    executor = ClientAPIExecutor(
        execution_mode=ExecutionMode.EXTERNAL_PROCESS,
        command=[python or "python3", "-u", "-m", CLIENT_SCRIPT_MODULE],
        launch_once=True,
        launch_timeout=spec.launch_timeout_s,
        # No heartbeat lease between the site's job process and its training process (FLARE's
        # default: 30 s). Both run on the site's machine; when that machine stalls longer (swap, a
        # paused VM, SIGSTOP in tests/e2e) the lease expires the moment it resumes, FLARE fails the
        # site's client job, and the server then fails the whole job for every site. Without it a
        # stalled site is dropped by the round's timeouts and takes part again when it resumes; a
        # training process that dies is still seen (FLARE checks its process group, and the
        # training process watches its owner's PID).
        heartbeat_timeout=0,
        # NumPy on both sides: FLARE passes params untouched (a PyTorch exchange drops
        # non-tensors and converts arrays), so secure-aggregation bytes arrive bit-exact.
        params_exchange_format=ExchangeFormat.NUMPY,
        server_expected_format=ExchangeFormat.NUMPY,
        params_transfer_type=TransferType.DIFF,
    )
    job.to_clients(executor, tasks=["*"])
    return job


def export_job_folder(spec: JobSpec, out_root: str | Path, *, python: str | None = None) -> Path:
    """Write the job folder ``out_root/<spec.name>`` (replacing an existing one)."""
    out_root = Path(out_root)
    target = out_root / spec.name
    if target.exists():
        shutil.rmtree(target)
    out_root.mkdir(parents=True, exist_ok=True)
    build_job(spec, python=python).export_job(str(out_root))
    return target


def export_all(out_root: str | Path) -> list[Path]:
    """Export every job of :data:`JOB_SPECS` (the committed ``jobs/`` folder)."""
    return [export_job_folder(spec, out_root) for spec in JOB_SPECS.values()]


def diff_job_folders(expected: str | Path, actual: str | Path) -> list[str]:
    """Relative paths that differ between two job folders (empty: identical)."""
    expected, actual = Path(expected), Path(actual)
    problems = []

    def walk(cmp: filecmp.dircmp, prefix: str) -> None:
        problems.extend(f"{prefix}{n} (only in {expected})" for n in cmp.left_only)
        problems.extend(f"{prefix}{n} (only in {actual})" for n in cmp.right_only)
        _, mismatch, errors = filecmp.cmpfiles(cmp.left, cmp.right, cmp.common_files, shallow=False)
        problems.extend(f"{prefix}{n} (differs)" for n in mismatch + errors)
        for name, sub in cmp.subdirs.items():
            walk(sub, f"{prefix}{name}/")

    if not expected.is_dir() or not actual.is_dir():
        return [f"missing folder: {expected if not expected.is_dir() else actual}"]
    walk(filecmp.dircmp(expected, actual, ignore=["__pycache__"]), "")
    return sorted(problems)


def check_committed_jobs(jobs_root: str | Path) -> dict[str, list[str]]:
    """Regenerate every job into a temporary folder; differences per job name."""
    with tempfile.TemporaryDirectory() as tmp:
        return {
            spec.name: diff_job_folders(Path(jobs_root) / spec.name, export_job_folder(spec, tmp))
            for spec in JOB_SPECS.values()
        }

