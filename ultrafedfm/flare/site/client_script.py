"""FLARE Client API script: the site side of a federated job, a loop around ``SiteSession``.

Run by FLARE's ``ClientAPIExecutor`` in an external process launched once per job (a crash in
training cannot take the site's FLARE client down). Each task is handed to
:class:`ultrafedfm.federation.site_session.SiteSession`, which checks it against the site's
privacy policy, trains or runs the secure-aggregation protocol, and builds the only thing that
leaves the site; this script moves it through FLARE. A failure is logged here in full and
reported to the server only as the session's path-free failure reply. Arrays arrive and leave
as NumPy (the jobs' exchange format), untouched.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import nvflare.client as flare
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from ultrafedfm.federation.exchange import SiteReply
from ultrafedfm.federation.site_session import SiteSession, SiteTask
from ultrafedfm.federation.tasks import TRAIN_TASK
from ultrafedfm.federation.wire import SECAGG_KEY
from ultrafedfm.privacy import PolicyRefusal

_logger = logging.getLogger("ultrafedfm.flare.site")

__all__ = ["main"]


def _send(reply: SiteReply, *, round_index: int) -> None:
    if reply.params is None:  # a failure: no params, its reason in meta
        flare.send(FLModel(params=None, current_round=round_index, metrics={}, meta=reply.meta))
        return
    # DIFF, never FULL: the Client API would subtract the global model from a FULL result. A masked
    # reply has no metrics and no meta: None, so that FLARE adds no (empty) metrics entry either.
    flare.send(FLModel(params=reply.params, params_type=ParamsType.DIFF, current_round=round_index,
                       metrics=reply.metrics or None, meta=reply.meta))


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flare.init()
    session = SiteSession(site_name=flare.get_site_name(), job_id=flare.get_job_id(), start_dir=Path(os.getcwd()))
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        task = SiteTask(name=flare.get_task_name(), round=int(received.current_round or 0), params=received.params,
                        meta=dict(received.meta or {}))
        try:
            reply = session.handle(task)
        except PolicyRefusal as exc:
            _logger.error("%s", exc)
            reply = session.failure_reply(exc, task)
        except Exception as exc:  # reported to the server; the process stays up for the next task
            _logger.exception("%s: task '%s' of round %d failed", session.site_name, task.name, task.round + 1)
            reply = session.failure_reply(exc, task)
        _send(reply, round_index=task.round)
        if task.name == TRAIN_TASK and reply.params is not None and SECAGG_KEY in reply.params:
            _logger.info("%s: round %d: masked input sent", session.site_name, task.round + 1)
    try:  # the site's own audit report of the job, from its own disk (it never leaves the site)
        session.write_audit_report()
    except Exception:
        _logger.exception("%s: the site's audit report could not be written; rebuild it with `ultrafedfm audit "
                          "--site`", session.site_name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
