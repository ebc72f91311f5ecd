"""One round on the server, whatever the aggregation: asking sites, dropping failures, applying the mean.

:class:`RoundContext` is what an aggregation strategy (``federation.aggregation``) works with:
:meth:`~RoundContext.ask` sends one task through the exchange and returns only the usable
replies (a refusal, a failure or a missing answer drops the site, with its reason, in one
place); :meth:`~RoundContext.apply` adds the weighted mean delta to the global model and records
the round's aggregate figures (weighted mean loss, total images and steps: never a site's own);
:meth:`~RoundContext.skip` leaves the model unchanged and says why.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ultrafedfm.federation.exchange import Exchange, SiteReply, TaskRequest
from ultrafedfm.federation.fedavg import apply_delta
from ultrafedfm.federation.job_spec import JobSpec
from ultrafedfm.federation.stats import RoundStats
from ultrafedfm.privacy.audit.payloads import record_received
from ultrafedfm.secagg.figures import AggregateFigures

_logger = logging.getLogger(__name__)

__all__ = ["RoundContext"]


class RoundContext:
    """State of one round on the server, shared by the phases of its aggregation strategy.

    ``run_dir`` is the run's folder outside the job workspace (``RunState.dir``), where a strategy
    may keep what must survive a server restart (secure aggregation's survivor set).
    """

    def __init__(self, *, job: JobSpec, round_index: int, params: dict[str, np.ndarray], targets: Sequence[str],
                 exchange: Exchange, job_id: str, run_dir: Path | None = None):
        self.job = job
        self.job_id = job_id
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.params = params
        self.exchange = exchange
        self.contract = job.training_contract()
        self.stats = RoundStats(round=round_index, num_rounds=job.num_rounds, lr=job.learning_rate(round_index),
                                targets=sorted(targets))
        self.new_params: dict[str, np.ndarray] | None = None

    @property
    def label(self) -> str:
        return f"round {self.stats.round + 1}"

    def task_meta(self, **extra: Any) -> dict[str, Any]:
        """What every task of the round carries: its lr and the training contract."""
        return {"lr": self.stats.lr, "training": self.contract.to_mapping(), **extra}

    def ask(self, task_name: str, targets: Sequence[str], params: Mapping[str, Any], *, timeout_s: float,
            meta: Mapping[str, Any] | None = None) -> dict[str, SiteReply]:
        """Send ``task_name`` to ``targets``; the replies that are neither refusals nor failures, by site."""
        if not targets:
            return {}
        request = TaskRequest(task_name=task_name, targets=tuple(targets), params=params,
                              meta=dict(meta) if meta is not None else self.task_meta(), round=self.stats.round,
                              num_rounds=self.stats.num_rounds, timeout_s=timeout_s)
        result = self.exchange(request)
        if self.run_dir is not None:  # what arrived, logged before anything is done with it (the audit)
            for site, reply in sorted(result.replies.items()):
                record_received(self.run_dir, site=site, job_id=self.job_id, task=task_name,
                                round_index=self.stats.round, params=reply.params, metrics=reply.metrics,
                                meta=reply.meta)
        usable = {}
        for site, reply in result.replies.items():
            if reply.refused:
                self.drop(site, task_name, reply.refused, refused=True)
            elif reply.error:
                self.drop(site, task_name, f"failed at the site: {reply.error}")
            else:
                usable[site] = reply
        for site in targets:
            if site not in result.replies:
                self.drop(site, task_name, result.errors.get(
                    site, f"no answer within {timeout_s:g} s (timed out, or the site's process died)"))
        return usable

    def drop(self, site: str, task_name: str, reason: str, *, refused: bool = False) -> None:
        """Record that ``site`` takes no further part in this round (its first reason is kept).

        ``refused``: the site's own privacy policy refused the job (an ERROR: someone must act).
        """
        if refused:
            self.stats.failed.setdefault(site, f"{task_name}: refused by the site's policy: {reason}")
            _logger.error("%s: site %s refused by the site's policy (%s): %s", self.label, site, task_name, reason)
        else:
            self.stats.failed.setdefault(site, f"{task_name}: {reason}")
            _logger.warning("%s: site %s failed in %s: %s", self.label, site, task_name, reason)

    def apply(self, mean_delta: Mapping[str, np.ndarray], *, participants: Sequence[str],
              figures: AggregateFigures) -> None:
        """Global model += ``mean_delta``; the round's statistics get the participants' aggregate ``figures``."""
        stats = self.stats
        self.new_params = apply_delta(self.params, mean_delta)
        stats.participants = sorted(participants)
        stats.global_loss = float(figures.loss) if np.isfinite(figures.loss) else None
        stats.total_images = int(figures.num_samples)
        stats.total_steps = int(figures.steps)
        stats.applied = True

    def skip(self, message: str) -> None:
        """The round leaves the global model unchanged, because of ``message``."""
        self.stats.message = f"{message}; the global model is unchanged"
        _logger.error("%s: %s", self.label, self.stats.message)
