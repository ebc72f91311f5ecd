"""A federation in one process: the server's tasks handed straight to each site's ``SiteSession``.

For tests of the round logic and quick experiments without FLARE's processes; every real run --
the demo, the simulator tests, a deployment -- goes through ``ultrafedfm.flare``. The tasks and
replies are exactly what FLARE would carry (arrays and small values), so the same core code runs.
"""
from __future__ import annotations

import logging
from typing import Collection, Mapping

from ultrafedfm.federation.exchange import ExchangeResult, TaskRequest
from ultrafedfm.federation.site_session import SiteSession, SiteTask

_logger = logging.getLogger(__name__)

__all__ = ["LocalExchange"]


class LocalExchange:
    """An ``Exchange`` over in-process site sessions; sites in ``unreachable`` never answer."""

    def __init__(self, sessions: Mapping[str, SiteSession], *, unreachable: Collection[str] = ()):
        self.sessions = dict(sessions)
        self.unreachable = set(unreachable)

    def connected_sites(self) -> list[str]:
        return sorted(set(self.sessions) - self.unreachable)

    def __call__(self, request: TaskRequest) -> ExchangeResult:
        result = ExchangeResult()
        for site in request.targets:
            session = self.sessions.get(site)
            if session is None or site in self.unreachable:
                continue
            task = SiteTask(name=request.task_name, round=request.round, params=dict(request.params),
                            meta=dict(request.meta))
            try:
                result.replies[site] = session.handle(task)
            except Exception as exc:  # as the FLARE site script: the server gets the failure reply
                _logger.warning("%s: task '%s' failed: %s", site, request.task_name, exc)
                result.replies[site] = session.failure_reply(exc, task)
        return result
