"""FLARE Client API script: the site side of federated MAE pretraining.

Run by FLARE's ``ClientAPIExecutor`` in an external process launched once per job (a crash in
training cannot take the site's FLARE client down). Before anything else it checks the job
against the site's privacy policy (``ultrafedfm.privacy.admit_job``): a site that requires
secure aggregation refuses a job that turns it off. For a ``train`` task it receives the global
weights, trains with the site's own data (``local/site.yaml`` of the site kit) and sends back
its update through the sender from :func:`make_sender`: the delta in the clear
(``ParamsType.DIFF``), or -- with secure aggregation -- only the masked ``weight x delta``. The
key-exchange, consistency and unmask tasks of secure aggregation are answered by
``secagg_site.SiteSecureAggregation``. A failure is logged here in full and reported to the
server only by exception type (a policy refusal by its own path-free message), so no path or
file name leaves the site.

The jobs exchange parameters as NumPy (``secagg_wire``): arrays arrive and leave untouched.
"""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Any, Callable

import nvflare.client as flare
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from ultrafedfm.flare.secagg_site import SiteSecureAggregation
from ultrafedfm.flare.secagg_wire import SECAGG_TASKS, split_params
from ultrafedfm.flare.site_training import SiteTrainer, SiteUpdate
from ultrafedfm.privacy import JobRequest, PolicyRefusal, admit_job
from ultrafedfm.site_config import SiteConfig, find_site_config, load_site_config

_logger = logging.getLogger("ultrafedfm.flare.client")

__all__ = ["main", "make_sender", "send_update"]

TRAIN_TASK = "train"


def _numpy(delta: dict) -> dict:
    return {k: v.detach().cpu().numpy() if hasattr(v, "detach") else v for k, v in delta.items()}


def _update_model(params: dict, update: SiteUpdate, *, round_index: int) -> FLModel:
    return FLModel(
        params=params,
        params_type=ParamsType.DIFF,  # never FULL: the Client API would subtract the global model from it
        current_round=round_index,
        metrics={"loss": update.loss, "train_seconds": update.train_seconds},
        meta={"num_samples": update.num_samples, FLMetaKey.NUM_STEPS_CURRENT_ROUND: update.steps},
    )


def send_update(update: SiteUpdate, *, round_index: int, **_: Any) -> None:
    """Send one round's update in the clear (a job with secure aggregation off)."""
    flare.send(_update_model(_numpy(update.delta), update, round_index=round_index))


def make_masked_sender(secagg: SiteSecureAggregation) -> Callable[..., None]:
    """A sender that masks ``num_samples x delta`` for the server's sum; the delta never leaves in the clear."""

    def send_masked(update: SiteUpdate, *, round_index: int, task_params: dict) -> None:
        params = secagg.mask_update(params=task_params, delta=_numpy(update.delta), num_samples=update.num_samples,
                                    round_index=round_index)
        flare.send(_update_model(params, update, round_index=round_index))
        _logger.info("%s: round %d: masked input sent", secagg.site_name, round_index + 1)

    return send_masked


def send_failure(error: BaseException, *, round_index: int) -> None:
    """Tell the server this task failed here, naming only the exception type (or the policy refused)."""
    meta = {"error": f"{type(error).__name__} (details in the site's log)"}
    if isinstance(error, PolicyRefusal):
        meta = {"error": str(error), "refused": str(error)}
    flare.send(FLModel(params=None, current_round=round_index, metrics={}, meta=meta))


def make_sender(*, secure_aggregation: bool, secagg: SiteSecureAggregation | None = None) -> Callable[..., None]:
    """The function that sends a site's update: in the clear, or masked for secure aggregation."""
    if not secure_aggregation:
        return send_update
    if secagg is None:
        raise RuntimeError("secure aggregation is on but the site has no secure-aggregation state")
    return make_masked_sender(secagg)


class _Site:
    """What the site process keeps across tasks: its configuration, trainer and secure-aggregation state."""

    def __init__(self, site_name: str):
        self.site_name = site_name
        self.config_path: Path | None = None
        self.config: SiteConfig | None = None
        self.trainer: SiteTrainer | None = None
        self.secagg: SiteSecureAggregation | None = None

    def load(self) -> None:
        if self.config is None:
            self.config_path = find_site_config(os.getcwd())
            self.config = load_site_config(self.config_path, site_name=self.site_name)
            _logger.info("%s: site configuration from %s", self.site_name, self.config_path)

    def secure_aggregation(self) -> SiteSecureAggregation:
        if self.secagg is None:
            self.secagg = SiteSecureAggregation(site_name=self.site_name, site_config=self.config,
                                                kit_root=self.config_path.parent.parent, job_id=flare.get_job_id())
        return self.secagg

    def reset(self) -> None:
        # Re-read site.yaml next time: IT may have fixed it meanwhile.
        self.config = self.trainer = self.secagg = None


def _handle(site: _Site, task: FLModel, task_name: str, round_index: int) -> None:
    site.load()
    training = task.meta["training"]
    secure = bool(training.get("secure_aggregation", False))
    request = JobRequest(job=str(training.get("job", "?")), secure_aggregation=secure,
                         differential_privacy=bool(training.get("differential_privacy", False)),
                         secagg=task.meta.get("secagg"))
    admission = admit_job(site.config.privacy, request, site_name=site.site_name)
    if task_name in SECAGG_TASKS:
        params = site.secure_aggregation().handle(task_name, params=task.params, config=admission.secagg,
                                                  round_index=round_index)
        flare.send(FLModel(params=params, params_type=ParamsType.DIFF, current_round=round_index, metrics={}))
        return
    if task_name != TRAIN_TASK:
        raise ValueError(f"unknown task '{task_name}'")
    send = make_sender(secure_aggregation=secure, secagg=site.secure_aggregation() if secure else None)
    weights, _ = split_params(task.params)
    if site.trainer is None:
        site.trainer = SiteTrainer(site_name=site.site_name, site_config=site.config)
    update = site.trainer.train_round(global_params=weights, training=training, lr=float(task.meta["lr"]),
                                      round_index=round_index)
    _logger.info("%s: round %d trained: %d images, loss %.4f, %.1f s", site.site_name, round_index + 1,
                 update.num_samples, update.loss, update.train_seconds)
    send(update, round_index=round_index, task_params=task.params)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flare.init()
    site = _Site(flare.get_site_name())
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        task_name = flare.get_task_name()
        round_index = int(task.current_round or 0)
        try:
            _handle(site, task, task_name, round_index)
        except PolicyRefusal as exc:
            _logger.error("%s", exc)
            send_failure(exc, round_index=round_index)
        except Exception as exc:  # reported to the server, the process stays up for the next task
            _logger.exception("%s: task '%s' of round %d failed", site.site_name, task_name, round_index + 1)
            site.reset()
            send_failure(exc, round_index=round_index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
