"""What a round sends to the sites and what comes back, independent of the transport.

The server side of a round is written against one callable, :data:`Exchange`: it delivers a
:class:`TaskRequest` to its target sites and returns their :class:`SiteReply` objects (FLARE's
``send_model_and_wait`` in ``ultrafedfm.flare.server``; a direct call in tests). A site answers
a task with a :class:`SiteReply` too, built by ``federation.site_session``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

_logger = logging.getLogger(__name__)

__all__ = ["Exchange", "ExchangeResult", "SiteReply", "TaskRequest"]


@dataclass(frozen=True)
class TaskRequest:
    """One task for a set of sites.

    Args:
        task_name: one of ``federation.tasks``.
        targets: the sites that get it.
        params: arrays sent to every target (global weights and/or protocol messages).
        meta: small JSON-like values (the round's lr, the training contract, the secagg settings).
        round / num_rounds: the round (0-based) and the job's length.
        timeout_s: how long to wait for the answers (0: forever).
    """

    task_name: str
    targets: tuple[str, ...]
    params: Mapping[str, Any]
    meta: Mapping[str, Any]
    round: int
    num_rounds: int
    timeout_s: float


@dataclass
class SiteReply:
    """One site's answer to a task.

    ``is_delta`` is true when ``params`` holds a weight delta (FLARE's ``ParamsType.DIFF``) or a
    protocol message; ``meta["error"]`` / ``meta["refused"]`` report a failure or a policy refusal.
    """

    site: str
    params: dict[str, Any] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    is_delta: bool = True

    @property
    def refused(self) -> str | None:
        """The site's policy refusal (safe to show), or ``None``."""
        return self.meta.get("refused")

    @property
    def error(self) -> str | None:
        """Why the task failed at the site (exception type only), or ``None``."""
        return self.meta.get("error")


@dataclass
class ExchangeResult:
    """Replies by site, and for sites without a usable reply the transport's reason (if it knows one)."""

    replies: dict[str, SiteReply] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)


Exchange = Callable[[TaskRequest], ExchangeResult]
