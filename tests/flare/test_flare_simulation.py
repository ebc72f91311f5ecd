"""The simulator runner's process-leak report: it sees what outlived the simulator, before ending it."""
from __future__ import annotations

import logging
import signal
import subprocess
import sys

from ultrafedfm.flare.deploy.simulation import LEFT_RUNNING_WARNING, run_simulation, workspace_processes


def test_a_process_still_running_when_the_simulator_exits_is_reported_then_ended(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="ultrafedfm.flare.deploy.simulation")
    workspace = tmp_path / "ws"
    workspace.mkdir()
    # A stand-in for a site process the simulator failed to stop: its own session, the workspace in its
    # command line (the simulator re-creates the workspace folder, so its working directory would not match).
    command = [sys.executable, "-c", "import time; time.sleep(300)", str(workspace / "site-1")]
    leftover = subprocess.Popen(command, start_new_session=True)
    try:
        # A job folder that does not exist: the simulator exits at once, on its own.
        result = run_simulation(job_dir=tmp_path / "no-such-job", workspace=workspace, clients=["site-1"],
                                timeout_s=120)
        assert result.returncode is not None  # it exited by itself; we did not stop it
        assert result.left_running == [f"{leftover.pid} {' '.join(command)}"]
        assert leftover.wait(timeout=10) == -signal.SIGTERM  # then the runner ended it
        assert workspace_processes(workspace) == []
        assert LEFT_RUNNING_WARNING in caplog.text and str(workspace / "site-1") in caplog.text
    finally:
        if leftover.poll() is None:
            leftover.kill()
