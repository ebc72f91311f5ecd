"""The site's side of secure aggregation in a job (no FLARE import).

Whether a job may run at all, with which secure-aggregation settings and with which floor on the
number of sites, is the site policy's decision (``ultrafedfm.privacy.admit_job``); this module runs
the protocol with what it admitted and with the site's own material: its signing key, the
consortium's pinned member list and its contribution ledger (``ultrafedfm.kit.identity``).

:class:`SiteSecureAggregation` holds one :class:`~ultrafedfm.secagg.SecAggClient` per round and
answers the server's phases: advertise keys (signing the round context the server announced:
model hash, lr, training settings), share keys, masked input (after :meth:`check_task` confirmed
the training task brings the announced model and settings), sign the survivor list, unmask. Every
answer is a ``params`` mapping of one uint8-encoded message (``federation.wire``); the delta, the
loss and the counts never leave in the clear.
"""
from __future__ import annotations

import logging
from typing import Any, Mapping

import numpy as np

from ultrafedfm.federation.tasks import ADVERTISE_TASK, CONSISTENCY_TASK, SHARE_KEYS_TASK, UNMASK_TASK
from ultrafedfm.federation.wire import ROUND_CONTEXT_KEY, SECAGG_KEY, message_from_params, message_to_array, site_key
from ultrafedfm.kit.enroll import SiteMaterial
from ultrafedfm.secagg import RoundContext, RoundFigures, SecAggClient, SecAggConfig, flatten_arrays, model_digest
from ultrafedfm.secagg.errors import ProtocolError

_logger = logging.getLogger(__name__)

__all__ = ["SiteSecureAggregation"]


class SiteSecureAggregation:
    """One site's secure-aggregation state across the rounds of a job (one per site process).

    Args:
        site_name: this site.
        job_id: the transport's id of the job (bound into every key, signature and ledger entry).
        material: the site's signing key, verified member list and ledger (``open_site_material``).
    """

    def __init__(self, *, site_name: str, job_id: str, material: SiteMaterial):
        self.site_name = site_name
        self.job_id = job_id
        self.material = material
        self._round: int | None = None
        self._client: SecAggClient | None = None

    def handle(self, task_name: str, *, params: Mapping[str, Any], meta: Mapping[str, Any], config: SecAggConfig,
               min_sites: int, round_index: int) -> dict:
        """Answer one key-exchange / consistency / unmask task; returns the reply's params."""
        if task_name == ADVERTISE_TASK:
            self._client, self._round = None, None  # a new round: the old keys are gone
            if ROUND_CONTEXT_KEY not in meta:
                raise ProtocolError(f"the key-advertisement task of round {round_index + 1} announces no round context "
                                    "(model hash, lr, training settings); nothing was signed")
            context = RoundContext.from_mapping(meta[ROUND_CONTEXT_KEY])
            m = self.material
            self._client = SecAggClient(signer=m.signer, members=m.members, job_id=self.job_id,
                                        round_number=round_index, config=config, context=context, ledger=m.ledger,
                                        min_sites=min_sites)
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

    def check_task(self, *, weights: Mapping[str, Any], lr: float, training: Mapping[str, Any],
                   round_index: int) -> RoundContext:
        """Before training: the task's weights (hashed), lr and settings must be what the round announced.

        Raises ``ContributionRefused`` otherwise (the server sends this site another model than its
        peers); returns the context the site then trains with.
        """
        client = self._client_for(round_index, "train")
        received = RoundContext(model_sha256=model_digest(weights), lr=lr, training=dict(training))
        client.check_task_context(received)
        return received

    def mask_update(self, *, params: Mapping[str, Any], delta: Mapping[str, np.ndarray], weight: float,
                    figures: RoundFigures, trained_with: RoundContext, round_index: int) -> tuple[dict, int]:
        """The masked input ``q(w·Δ) ‖ q(w) ‖ q(w·loss/L) ‖ steps ‖ images`` plus masks, as reply params, and
        how many coordinates of ``w·Δ`` the encoding clipped."""
        client = self._client_for(round_index, "train")
        delivery = message_from_params(params, key=site_key(self.site_name))
        vector, _ = flatten_arrays({k: np.asarray(v) for k, v in delta.items()}, dtype=np.float32)
        masked = client.mask_input(delivery, delta=vector, weight=float(weight), figures=figures,
                                   trained_with=trained_with)
        return {SECAGG_KEY: message_to_array(masked)}, int(client.clipped_coordinates or 0)

    def _client_for(self, round_index: int, task_name: str) -> SecAggClient:
        if self._client is None or self._round != round_index:
            raise RuntimeError(f"site '{self.site_name}': task '{task_name}' of round {round_index + 1} arrived, but "
                               f"this site holds no secure-aggregation keys for that round (it missed the key "
                               "advertisement); it sits this round out")
        return self._client
