"""Run a pretraining job in the FLARE simulator, and leave no process behind.

The simulator copies ``<workspace>/local/`` into every simulated site, so the sites' settings
go into one ``site.yaml`` keyed by site name, next to a ``resources.json`` whose
``class_allow_list`` admits our workflow and FLARE's ``ClientAPIExecutor`` besides FLARE's
defaults (``registry.REQUIRED_CLASS_ALLOW_LIST``).

Secure aggregation needs each site's own signing key and the consortium's signed member list,
which a simulation has no kits and no hospital IT for: ``prepare_workspace`` makes SIMULATION-ONLY
ones (``ultrafedfm.kit.simulation_members``: a key per site, a member list signed by a throwaway
admin key that is never written) in a fresh folder per site next to the workspace
(``<workspace>.secagg/<site>/``; the simulator wipes everything in the workspace but ``local/`` and
``startup/``), names that folder as ``secagg_dir`` in each site's ``site.yaml`` entry (the site
keeps its pins and contribution ledger there too) and puts the member list at
``<workspace>/local/members.json``, which the simulator copies to the server's ``local/`` as a
server kit has it. A deployment uses its kits and enrolled keys.

We start ``nvflare.private.fed.app.simulator.simulator`` ourselves (what ``nvflare simulator``
and ``FedJob.simulator_run`` do) so that we own its process group. When it has exited we give
the processes it started a short grace period to end on their own (site training processes run
in their own sessions), then record what is *still* running in the workspace
(``SimulationResult.left_running``: the simulator's own shutdown left it behind, or, after we
stopped the simulator, what our kill of its process group could not reach) and only then end
those processes. Callers that test a clean shutdown assert on ``left_running``; checking the
workspace afterwards would only see our cleanup. The exit code is not trusted either: callers
check the run's saved rounds.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from nvflare.app_common.default_component_policy import DEFAULT_CLASS_ALLOW_LIST

from ultrafedfm.flare.registry import REQUIRED_CLASS_ALLOW_LIST
from ultrafedfm.kit.identity import LOCAL, server_members_path
from ultrafedfm.kit.simulation_members import make_simulation_members
from ultrafedfm.site_config import SITE_CONFIG_FILE

_logger = logging.getLogger(__name__)

__all__ = ["LEFT_RUNNING_WARNING", "SimulationResult", "prepare_workspace", "run_simulation", "secagg_folder",
           "workspace_processes"]

SIMULATOR_MODULE = "nvflare.private.fed.app.simulator.simulator"
SERVER_LOG = Path("server") / "log.txt"
# Logged (WARNING) with the workspace and the command lines when something outlived the simulator.
LEFT_RUNNING_WARNING = "processes still running when the simulator had exited"


@dataclass
class SimulationResult:
    """How a simulation ended.

    ``left_running``: the command lines of processes still running in the workspace after the
    simulator exited and a grace period passed, recorded before they were ended here. Empty when
    the simulator shut everything down itself. After ``returncode is None`` (we killed the
    simulator's process group) it lists what that kill could not reach.
    """

    returncode: int | None  # None: we stopped it (timeout or on request)
    seconds: float
    workspace: Path
    left_running: list[str] = field(default_factory=list)

    @property
    def server_log(self) -> Path:
        return self.workspace / SERVER_LOG


def prepare_workspace(
    workspace: str | Path, *, site_configs: Mapping[str, Mapping[str, Any]], simulation_members: bool = True
) -> Path:
    """Write ``local/site.yaml`` (one entry per site) and ``local/resources.json``; with
    ``simulation_members``, fresh SIMULATION-ONLY site keys and member list (see the module doc;
    a site entry that already names a ``secagg_dir`` keeps it). Returns the ``local/`` folder."""
    workspace = Path(workspace)
    local = workspace / LOCAL
    local.mkdir(parents=True, exist_ok=True)
    sites = {name: {k: str(v) if isinstance(v, Path) else v for k, v in cfg.items()}
             for name, cfg in site_configs.items()}
    if simulation_members:
        folder = secagg_folder(workspace)
        # A new simulated consortium each time: keys pinned under an earlier throwaway admin key would refuse it.
        shutil.rmtree(folder, ignore_errors=True)
        files, members = make_simulation_members(folder, sorted(sites))
        shutil.copyfile(members, server_members_path(local))
        for name, cfg in sites.items():
            cfg.setdefault("secagg_dir", str(files[name].signing_key.parent))
    (local / SITE_CONFIG_FILE).write_text(yaml.safe_dump({"sites": sites}, sort_keys=True), encoding="utf-8")
    allow = [*DEFAULT_CLASS_ALLOW_LIST, *REQUIRED_CLASS_ALLOW_LIST]
    resources = {"format_version": 2, "class_allow_list": allow}
    (local / "resources.json").write_text(json.dumps(resources, indent=2), encoding="utf-8")
    return local


def secagg_folder(workspace: str | Path) -> Path:
    """Where ``prepare_workspace`` keeps the simulated sites' secure-aggregation files (one folder per site)."""
    workspace = Path(workspace)
    return workspace.parent / f"{workspace.name}.secagg"


def run_simulation(
    *,
    job_dir: str | Path,
    workspace: str | Path,
    clients: list[str],
    timeout_s: float = 900.0,
    log_config: str = "concise",
    stop_when: Callable[[], bool] | None = None,
    poll: Callable[[], None] | None = None,
) -> SimulationResult:
    """Run ``job_dir`` with ``clients`` in ``workspace``; stop it after ``timeout_s`` or when
    ``stop_when()`` turns true (tests use that to kill a "server" mid-job). ``poll`` is called
    about once a second (the demo prints round progress from it).
    """
    workspace = Path(workspace).resolve()
    command = [
        sys.executable, "-m", SIMULATOR_MODULE, str(Path(job_dir).resolve()),
        "-w", str(workspace), "-c", ",".join(clients), "-t", str(len(clients)), "-l", log_config,
    ]
    env = dict(os.environ, GRPC_ENABLE_FORK_SUPPORT="False", GRPC_POLL_STRATEGY="poll")
    start = time.monotonic()
    log_file = (workspace.parent / f"{workspace.name}.simulator.log").open("ab")
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    returncode: int | None = None
    left_running: list[str] = []
    try:
        while True:
            try:
                returncode = process.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if poll is not None:
                poll()
            if time.monotonic() - start > timeout_s:
                _logger.error("simulation exceeded %.0f s; stopping it", timeout_s)
                break
            if stop_when is not None and stop_when():
                _logger.info("stopping the simulation on request")
                break
    finally:
        if returncode is None:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait()
        left_running = _end_workspace_processes(workspace)
        log_file.close()
    if poll is not None:
        poll()
    return SimulationResult(returncode=returncode, seconds=time.monotonic() - start, workspace=workspace,
                            left_running=left_running)


def workspace_processes(workspace: str | Path) -> list[int]:
    """PIDs of processes whose working directory or command line lies in ``workspace``."""
    return [pid for pid, _ in _workspace_process_lines(workspace)]


def _workspace_process_lines(workspace: str | Path) -> list[tuple[int, str]]:
    root = str(Path(workspace).resolve())
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cwd = os.readlink(entry / "cwd")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if cwd == root or cwd.startswith(root + os.sep) or root in cmdline:
            found.append((int(entry.name), cmdline))
    return found


def _end_workspace_processes(workspace: Path, grace_s: float = 5.0) -> list[str]:
    """End what is still running in ``workspace`` after ``grace_s``; returns those processes' command lines.

    The list is taken before anything is signalled, so it shows what the simulator's own shutdown
    (or our kill of its process group) left behind.
    """
    deadline = time.monotonic() + grace_s
    found = _workspace_process_lines(workspace)
    while found and time.monotonic() < deadline:
        time.sleep(0.2)
        found = _workspace_process_lines(workspace)
    left = [f"{pid} {cmdline}" for pid, cmdline in found]
    if left:
        _logger.warning("%s, in %s (ending them now): %s", LEFT_RUNNING_WARNING, workspace, left)
    pids = [pid for pid, _ in found]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        pids = workspace_processes(workspace)
        if not pids:
            break
    if pids:
        _logger.error("processes survived SIGKILL in %s: %s", workspace, pids)
    return left


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass
