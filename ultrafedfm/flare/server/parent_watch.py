"""Stop a server job process whose FLARE server process has died.

FLARE 2.9 runs every job in its own process and session (``runner_process``). When the server
process is killed (SIGKILL, a crash) that job process lives on: cut off from part of the sites'
results, it keeps running rounds and saving them into the run folder -- the same folder the job
an operator resubmits after restarting the server continues from, so the two would write the
same rounds. The controller therefore calls :func:`watch_parent` when its run starts: as soon as
the process that started it is gone (``os.getppid()`` changes: the orphan was re-parented) it
calls ``on_orphaned`` once; the controller triggers FLARE's abort signal, so the round in progress
ends unsaved (``FederatedRun`` checks the abort before saving) and the job process stops.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Callable

_logger = logging.getLogger(__name__)

__all__ = ["watch_parent"]


def watch_parent(on_orphaned: Callable[[], None], *, interval_s: float = 0.5) -> Callable[[], None]:
    """Call ``on_orphaned()`` once when this process's parent dies; returns a function that stops watching."""
    parent = os.getppid()
    stopped = threading.Event()

    def watch() -> None:
        while not stopped.wait(interval_s):
            if os.getppid() != parent:
                _logger.error("the FLARE server process (pid %d) that started this job is gone: stopping the job "
                              "without saving the round in progress. Restart the server from its kit and resubmit "
                              "the job; it continues from the last saved round.", parent)
                on_orphaned()
                return

    threading.Thread(target=watch, name="ultrafedfm-parent-watch", daemon=True).start()
    return stopped.set
