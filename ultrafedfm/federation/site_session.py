"""How a site answers the tasks of a job, without FLARE.

One :class:`SiteSession` per site process and job. Every task first goes through the site's
own policy (``ultrafedfm.privacy.admit_job``) with the job's
:class:`~ultrafedfm.federation.contract.TrainingContract`; then a ``train`` task trains one round
(``federation.site_training``) and answers with the delta -- masked by secure aggregation
(``federation.secure_site``) unless the job turned it off and the policy allowed that -- and a
secure-aggregation task is answered by the protocol. What leaves the site is built here and
only here. A failure is answered with its exception type only (a policy refusal with its own
path-free message), so no path or file name leaves the site; the full error stays in its log.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ultrafedfm.federation.contract import TrainingContract
from ultrafedfm.federation.exchange import SiteReply
from ultrafedfm.federation.secure_site import SiteSecureAggregation
from ultrafedfm.federation.site_training import SiteTrainer, SiteUpdate
from ultrafedfm.federation.tasks import SECAGG_TASKS, TRAIN_TASK
from ultrafedfm.federation.wire import split_params
from ultrafedfm.privacy import Admission, PolicyRefusal, admit_job
from ultrafedfm.site_config import SiteConfig, find_site_config, load_site_config

_logger = logging.getLogger(__name__)

__all__ = ["SiteSession", "SiteTask"]


@dataclass
class SiteTask:
    """One task as the site received it: its name, round (0-based), arrays and small values."""

    name: str
    round: int
    params: dict[str, Any] | None
    meta: dict[str, Any] = field(default_factory=dict)


class SiteSession:
    """What a site keeps across the tasks of one job: its configuration, trainer and protocol state.

    Args:
        site_name: the site's name in the consortium.
        job_id: the transport's id of the job (bound into secure-aggregation messages).
        start_dir: where to look for the site kit's ``local/site.yaml`` (this folder and those above).
    """

    def __init__(self, *, site_name: str, job_id: str, start_dir: Path):
        self.site_name = site_name
        self.job_id = job_id
        self.start_dir = Path(start_dir)
        self.config_path: Path | None = None
        self.config: SiteConfig | None = None
        self._trainer: SiteTrainer | None = None
        self._secagg: SiteSecureAggregation | None = None

    def handle(self, task: SiteTask) -> SiteReply:
        """The site's answer to ``task``; raises on failure (see :meth:`failure_reply`)."""
        config = self._load()
        contract = TrainingContract.from_mapping(task.meta["training"])
        admission = admit_job(config.privacy, contract.job_request(task.meta.get("secagg")), site_name=self.site_name)
        if task.name in SECAGG_TASKS:
            return SiteReply(site=self.site_name, params=self._secure_aggregation(admission, task.name).handle(
                task.name, params=task.params or {}, config=admission.secagg, round_index=task.round))
        if task.name != TRAIN_TASK:
            raise ValueError(f"unknown task '{task.name}'")
        weights, _ = split_params(task.params)
        update = self._trainer_for(config).train_round(global_params=weights, contract=contract,
                                                        lr=float(task.meta["lr"]), round_index=task.round)
        _logger.info("%s: round %d trained: %d images, loss %.4f, %.1f s", self.site_name, task.round + 1,
                     update.num_samples, update.loss, update.train_seconds)
        delta = {k: v.detach().cpu().numpy() for k, v in update.delta.items()}
        if contract.secure_aggregation:
            params = self._secure_aggregation(admission, task.name).mask_update(
                params=task.params or {}, delta=delta, num_samples=update.num_samples, round_index=task.round)
        else:
            params = delta
        return self._update_reply(params, update)

    def failure_reply(self, error: BaseException) -> SiteReply:
        """What the server learns of a failed task: the exception type, or the policy's own refusal."""
        if isinstance(error, PolicyRefusal):
            return SiteReply(site=self.site_name, meta={"error": str(error), "refused": str(error)})
        # Re-read site.yaml next time: IT may have fixed it meanwhile.
        self.config = self._trainer = self._secagg = None
        return SiteReply(site=self.site_name, meta={"error": f"{type(error).__name__} (details in the site's log)"})

    def _update_reply(self, params: dict[str, np.ndarray], update: SiteUpdate) -> SiteReply:
        return SiteReply(site=self.site_name, params=params, meta={"num_samples": update.num_samples},
                         metrics={"loss": update.loss, "train_seconds": update.train_seconds})

    def _load(self) -> SiteConfig:
        if self.config is None:
            self.config_path = find_site_config(self.start_dir)
            self.config = load_site_config(self.config_path, site_name=self.site_name)
            _logger.info("%s: site configuration from %s", self.site_name, self.config_path)
        return self.config

    def _trainer_for(self, config: SiteConfig) -> SiteTrainer:
        if self._trainer is None:
            self._trainer = SiteTrainer(site_name=self.site_name, site_config=config)
        return self._trainer

    def _secure_aggregation(self, admission: Admission, task_name: str) -> SiteSecureAggregation:
        if admission.secagg is None:
            raise ValueError(f"task '{task_name}' belongs to secure aggregation, which this job turned off")
        if self._secagg is None:
            # The kit root is the folder holding local/site.yaml.
            self._secagg = SiteSecureAggregation(site_name=self.site_name, site_config=self.config,
                                                 kit_root=self.config_path.parent.parent, job_id=self.job_id)
        return self._secagg
