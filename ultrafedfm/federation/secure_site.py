"""The site's side of secure aggregation in a job (no FLARE import).

Whether a job may run at all, and with which secure-aggregation settings, is the site policy's
decision (``ultrafedfm.privacy.admit_job``); this module runs the protocol with what it admitted.

:class:`SiteSecureAggregation` holds one :class:`~ultrafedfm.secagg.SecAggClient` per round
and answers the server's phases: advertise keys, share keys, masked input (after training:
``weight x delta`` with weight = the site's image count), sign the survivor list, unmask. Every
answer is a ``params`` mapping of one uint8-encoded message (``federation.wire``); the delta itself
never leaves in the clear.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from ultrafedfm.federation.tasks import ADVERTISE_TASK, CONSISTENCY_TASK, SHARE_KEYS_TASK, UNMASK_TASK
from ultrafedfm.federation.wire import SECAGG_KEY, message_from_params, message_to_array, site_key
from ultrafedfm.kit.identity import load_site_identity
from ultrafedfm.secagg import SecAggClient, SecAggConfig, flatten_arrays
from ultrafedfm.site_config import SiteConfig

_logger = logging.getLogger(__name__)

__all__ = ["SiteSecureAggregation"]


class SiteSecureAggregation:
    """One site's secure-aggregation state across the rounds of a job (one per site process)."""

    def __init__(self, *, site_name: str, site_config: SiteConfig, kit_root: Path, job_id: str):
        self.site_name = site_name
        self.job_id = job_id
        # Loaded now so that a missing certificate fails the first task loudly, naming the file.
        self.identity, self.root_ca = load_site_identity(site_config, kit_root=kit_root, site_name=site_name)
        self._round: int | None = None
        self._client: SecAggClient | None = None

    def handle(self, task_name: str, *, params: Mapping[str, Any], config: SecAggConfig, round_index: int) -> dict:
        """Answer one key-exchange / consistency / unmask task; returns the reply's params."""
        if task_name == ADVERTISE_TASK:
            self._client, self._round = None, None  # a new round: the old keys are gone
            self._client = SecAggClient(identity=self.identity, root_ca=self.root_ca, job_id=self.job_id,
                                        round_number=round_index, config=config)
            self._round = round_index
            return {SECAGG_KEY: message_to_array(self._client.advertise_keys())}
        client = self._client_for(round_index, task_name)
        message = message_from_params(params)
        if task_name == SHARE_KEYS_TASK:
            reply = client.share_keys(message)
        elif task_name == CONSISTENCY_TASK:
            reply = client.sign_survivors(message)
        elif task_name == UNMASK_TASK:
            reply = client.unmask(message)
            _logger.info("%s: round %d: unmask shares sent", self.site_name, round_index + 1)
        else:
            raise ValueError(f"unknown secure-aggregation task '{task_name}'")
        return {SECAGG_KEY: message_to_array(reply)}

    def mask_update(self, *, params: Mapping[str, Any], delta: Mapping[str, np.ndarray], num_samples: int,
                    round_index: int) -> dict:
        """The masked input of this round: q(w * delta) || q(w) plus masks, w = ``num_samples``."""
        client = self._client_for(round_index, "train")
        delivery = message_from_params(params, key=site_key(self.site_name))
        vector, _ = flatten_arrays({k: np.asarray(v) for k, v in delta.items()}, dtype=np.float32)
        masked = client.mask_input(delivery, delta=vector, weight=float(num_samples))
        return {SECAGG_KEY: message_to_array(masked)}

    def _client_for(self, round_index: int, task_name: str) -> SecAggClient:
        if self._client is None or self._round != round_index:
            raise RuntimeError(f"site '{self.site_name}': task '{task_name}' of round {round_index + 1} arrived, but "
                               f"this site holds no secure-aggregation keys for that round (it missed the key "
                               "advertisement); it sits this round out")
        return self._client
