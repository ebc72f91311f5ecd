"""How a site answers the tasks of a job, without FLARE.

One :class:`SiteSession` per site process and job. Every task first goes through the site's
own policy (``ultrafedfm.privacy.admit_job``) with the job's
:class:`~ultrafedfm.federation.contract.TrainingContract`; then a ``train`` task trains one round
(``federation.site_training``) and a secure-aggregation task is answered by the protocol
(``federation.secure_site``). What leaves the site is built here and only here:

- with secure aggregation (the default, and required by the default policy): the site first
  checks that the training task brings the model, lr and settings the round announced, trains
  with a seed that mixes in fresh entropy, and answers with **only** the masked vector, which
  carries its loss, step count and image count inside the mask;
- a plain FedAvg job (only if the site's policy allows it): the delta in the clear with its image
  count, step count and loss (FedAvg needs the count; the server keeps only aggregates).

Either way the site appends its own figures of the round (loss, images, steps, training time,
clipped coordinates, seed, DP spend) to its own disk (``federation.site_figures``); they are never
sent. A failure is answered with its exception type only (a policy refusal, or a refusal to
contribute twice, with its own path-free message), so no path or file name leaves the site; the
full error stays in its log.
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
from ultrafedfm.federation.site_figures import SiteRoundFigures, append_site_figures, site_figures_path
from ultrafedfm.federation.site_training import SiteTrainer, SiteUpdate, local_generator_seed
from ultrafedfm.federation.tasks import SECAGG_TASKS, TRAIN_TASK
from ultrafedfm.federation.wire import split_params
from ultrafedfm.kit.identity import open_site_material
from ultrafedfm.privacy import Admission, PolicyRefusal, admit_job
from ultrafedfm.privacy.audit.payloads import record_outgoing
from ultrafedfm.secagg import ContributionRefused, RoundFigures, fresh_training_seed
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
        """The site's answer to ``task``, logged in the site's outgoing-payload log before it is returned
        for sending; raises on failure (see :meth:`failure_reply`)."""
        reply = self._answer(task)
        self._log_outgoing(task, reply)
        return reply

    def _answer(self, task: SiteTask) -> SiteReply:
        config = self._load()
        contract = TrainingContract.from_mapping(task.meta["training"])
        admission = admit_job(config.privacy, contract.job_request(task.meta.get("secagg")), site_name=self.site_name)
        if task.name in SECAGG_TASKS:
            return SiteReply(site=self.site_name, params=self._secure_aggregation(admission, task.name).handle(
                task.name, params=task.params or {}, meta=task.meta, config=admission.secagg,
                min_sites=admission.min_sites, round_index=task.round))
        if task.name != TRAIN_TASK:
            raise ValueError(f"unknown task '{task.name}'")
        return self._train(task, config, contract, admission)

    def _train(self, task: SiteTask, config: SiteConfig, contract: TrainingContract, admission: Admission) -> SiteReply:
        weights, _ = split_params(task.params)
        lr = float(task.meta["lr"])
        secure = admission.secagg is not None
        if secure:
            secagg = self._secure_aggregation(admission, task.name)
            # Before any step: the weights, lr and settings must be the ones every site signed.
            trained_with = secagg.check_task(weights=weights, lr=task.meta["lr"], training=task.meta["training"],
                                             round_index=task.round)
            # Fresh entropy: a server re-running the round cannot cancel this update out of two sums.
            seed = fresh_training_seed(contract.seed, task.round, self.site_name)
            update = self._trainer_for(config).train_round(global_params=weights, contract=contract, lr=lr,
                                                            round_index=task.round, job_id=self.job_id,
                                                            generator_seed=seed)
            params, clipped = secagg.mask_update(
                params=task.params or {}, delta=_numpy(update), weight=update.num_samples,
                figures=RoundFigures(loss=update.loss, steps=update.steps, num_samples=update.num_samples),
                trained_with=trained_with, round_index=task.round)
            reply = SiteReply(site=self.site_name, params=params)  # the masked vector and nothing else
        else:
            # Plain FedAvg (the policy allowed it): the delta is in the clear, and FedAvg needs its weight.
            seed, clipped = local_generator_seed(contract.seed, task.round, self.site_name), 0
            update = self._trainer_for(config).train_round(global_params=weights, contract=contract, lr=lr,
                                                            round_index=task.round, job_id=self.job_id)
            reply = SiteReply(site=self.site_name, params=_numpy(update),
                              meta={"num_samples": update.num_samples, "steps": update.steps},
                              metrics={"loss": update.loss})
        self._record(config, contract, task.round, update, masked=secure, clipped=clipped, seed=seed)
        return reply

    def _record(self, config: SiteConfig, contract: TrainingContract, round_index: int, update: SiteUpdate, *,
                masked: bool, clipped: int, seed: int) -> None:
        """The site's own figures of the round, on its own disk (never sent)."""
        privacy = getattr(update, "privacy", None)
        path = site_figures_path(config.cache)
        append_site_figures(path, SiteRoundFigures(
            job=contract.job, job_id=self.job_id, round=round_index, loss=update.loss, num_samples=update.num_samples,
            steps=update.steps, train_seconds=update.train_seconds, masked=masked, clipped_coordinates=clipped,
            epsilon=privacy.epsilon_job if privacy else None, delta=privacy.delta if privacy else None,
            noise_multiplier=privacy.noise_multiplier if privacy else None,
            accountant=privacy.accountant if privacy else None,
            epsilon_lifetime=privacy.epsilon_lifetime if privacy else None, generator_seed=seed))
        _logger.info("%s: round %d trained: %d images, %d steps, loss %.4f, %.1f s; %s (figures kept in %s)",
                     self.site_name, round_index + 1, update.num_samples, update.steps, update.loss,
                     update.train_seconds, f"masked, {clipped} coordinates clipped" if masked else "sent in the clear",
                     path)

    def failure_reply(self, error: BaseException, task: SiteTask | None = None) -> SiteReply:
        """What the server learns of a failed ``task``: the exception type, or the site's own path-free refusal
        (logged in the outgoing-payload log like every reply, when the site's configuration is known)."""
        cache = self.config.cache if self.config is not None else None
        reply = self._failure(error)
        if task is not None:
            self._log_outgoing(task, reply, cache=cache)
        return reply

    def write_audit_report(self):
        """The site's audit report of this job (``ultrafedfm.privacy.audit``), from its own disk; ``None`` when
        the site never loaded its configuration (nothing of this job is on its disk)."""
        from ultrafedfm.privacy.audit import write_site_report

        try:
            config = self._load()
        except Exception as exc:  # a site that could not even read site.yaml has nothing to report on
            _logger.warning("%s: no audit report for job %s: %s", self.site_name, self.job_id, exc)
            return None
        files = write_site_report(site=self.site_name, cache=config.cache, policy=config.privacy,
                                  kit=self.config_path.parent.parent, job_id=self.job_id)
        _logger.info("%s: audit report of job %s written to %s", self.site_name, self.job_id, files)
        return files

    def _log_outgoing(self, task: SiteTask, reply: SiteReply, *, cache: Path | None = None) -> None:
        cache = cache or (self.config.cache if self.config is not None else None)
        if cache is None:  # no site.yaml read: the site does not know where its records live
            return
        record_outgoing(cache, site=self.site_name, job_id=self.job_id, task=task.name, round_index=task.round,
                        params=reply.params, meta=reply.meta, metrics=reply.metrics)

    def _failure(self, error: BaseException) -> SiteReply:
        if isinstance(error, PolicyRefusal):
            return SiteReply(site=self.site_name, meta={"error": str(error), "refused": str(error)})
        # Re-read site.yaml and the secure-aggregation files next time: IT may have fixed them meanwhile.
        self.config = self._trainer = self._secagg = None
        if isinstance(error, ContributionRefused):  # names the model hash and survivor set, never a path
            return SiteReply(site=self.site_name, meta={"error": f"ContributionRefused: {error}"})
        return SiteReply(site=self.site_name, meta={"error": f"{type(error).__name__} (details in the site's log)"})

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
            material = open_site_material(self.config, kit_root=self.config_path.parent.parent,
                                          site_name=self.site_name)
            self._secagg = SiteSecureAggregation(site_name=self.site_name, job_id=self.job_id, material=material)
        return self._secagg


def _numpy(update: SiteUpdate) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in update.delta.items()}
