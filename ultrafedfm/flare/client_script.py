"""FLARE Client API script: the site side of federated MAE pretraining.

Run by FLARE's ``ClientAPIExecutor`` in an external process launched once per job (a crash in
training cannot take the site's FLARE client down). For every task it receives the global
weights, trains with the site's own data (``local/site.yaml`` of the site kit), and sends back
the delta (``ParamsType.DIFF``) with the number of training images and the loss. A failure is
logged here in full and reported to the server only by exception type, so no path or file name
leaves the site.

Everything sent goes through :func:`send_update`; secure aggregation replaces it with a masking
sender (``make_sender``), nothing else changes.
"""
from __future__ import annotations

import logging
import os
import sys
from typing import Callable

import nvflare.client as flare
from nvflare.apis.fl_constant import FLMetaKey
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from ultrafedfm.flare.site_training import SiteTrainer, SiteUpdate
from ultrafedfm.site_config import find_site_config, load_site_config

_logger = logging.getLogger("ultrafedfm.flare.client")

__all__ = ["main", "make_sender", "send_update"]


def send_update(update: SiteUpdate, *, round_index: int) -> None:
    """Send one round's update in the clear (the default, no secure aggregation)."""
    flare.send(
        FLModel(
            params=update.delta,
            params_type=ParamsType.DIFF,
            current_round=round_index,
            metrics={"loss": update.loss, "train_seconds": update.train_seconds},
            meta={"num_samples": update.num_samples, FLMetaKey.NUM_STEPS_CURRENT_ROUND: update.steps},
        )
    )


def send_failure(error: BaseException, *, round_index: int) -> None:
    """Tell the server this round failed here, naming only the exception type."""
    flare.send(
        FLModel(
            params=None,
            current_round=round_index,
            metrics={},
            meta={"error": f"{type(error).__name__} (details in the site's log)"},
        )
    )


def make_sender(*, secure_aggregation: bool) -> Callable[..., None]:
    """The function that sends a site's update; the seam for secure aggregation."""
    if secure_aggregation:
        raise RuntimeError("the job asks for secure aggregation, which this version does not implement")
    return send_update


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    flare.init()
    site_name = flare.get_site_name()
    trainer: SiteTrainer | None = None
    while flare.is_running():
        task = flare.receive()
        if task is None:
            break
        round_index = int(task.current_round or 0)
        try:
            if trainer is None:
                config_path = find_site_config(os.getcwd())
                trainer = SiteTrainer(site_name=site_name, site_config=load_site_config(config_path, site_name=site_name))
                _logger.info("%s: site configuration from %s", site_name, config_path)
            training = task.meta["training"]
            send = make_sender(secure_aggregation=bool(training.get("secure_aggregation", False)))
            update = trainer.train_round(
                global_params=task.params, training=training, lr=float(task.meta["lr"]), round_index=round_index
            )
        except Exception as exc:  # reported to the server, the process stays up for the next round
            _logger.exception("%s: round %d failed", site_name, round_index + 1)
            trainer = None  # re-read site.yaml next round: IT may have fixed it meanwhile
            send_failure(exc, round_index=round_index)
            continue
        _logger.info(
            "%s: round %d done: %d images, loss %.4f, %.1f s",
            site_name, round_index + 1, update.num_samples, update.loss, update.train_seconds,
        )
        send(update, round_index=round_index)
    return 0


if __name__ == "__main__":
    sys.exit(main())
