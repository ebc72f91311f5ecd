"""Secure aggregation (Bonawitz et al. 2017) as a round strategy: the server only ever holds a sum.

A round is five tasks to the sites and one decode (docs/secure-aggregation.md)::

    advertise keys    -> KeyRoster                       (secagg_phase_timeout_s)
    share keys        -> ShareDelivery per site          (secagg_phase_timeout_s)
    train             -> MaskedInput: the site trains, then masks num_samples x delta (round_timeout_s)
    consistency check -> signatures over the survivor list (secagg_phase_timeout_s)
    unmask            -> self-mask / mask-key shares      (secagg_phase_timeout_s)
    apply             -> global += sum(w * delta) / sum(w), decoded from the unmasked ring sum

One :class:`~ultrafedfm.secagg.SecAggServer` per round holds the running sum: a masked input is
vetted in full first, then added and dropped, so no site's delta is ever held, stored or logged
in the clear. A site that fails or does not answer is dropped; the protocol recovers it when at
least the threshold of sites answer the unmask task, and otherwise the round aborts with nothing
revealed and the model unchanged.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable

import numpy as np

from ultrafedfm.config import to_mapping
from ultrafedfm.federation.aggregation.base import Aggregation, vet_update_meta
from ultrafedfm.federation.exchange import SiteReply
from ultrafedfm.federation.rounds import RoundContext
from ultrafedfm.federation.tasks import ADVERTISE_TASK, CONSISTENCY_TASK, SHARE_KEYS_TASK, TRAIN_TASK, UNMASK_TASK
from ultrafedfm.federation.wire import SECAGG_KEY, message_from_params, message_to_array, site_key
from ultrafedfm.secagg import SecAggConfig, SecAggError, SecAggServer, flatten_arrays, unflatten_arrays
from ultrafedfm.secagg.errors import RoundAborted
from ultrafedfm.secagg.messages import Message

if TYPE_CHECKING:
    from cryptography import x509

_logger = logging.getLogger(__name__)

__all__ = ["SecureAggregation"]

Receive = Callable[[Message, SiteReply], None]


class SecureAggregation(Aggregation):
    """Masked inputs, summed; unmasked only as a sum of at least ``min_sites`` sites.

    Args:
        config: the job's ``SecAggConfig`` (also sent to every site, which checks it against its policy).
        root_ca: loads the project root CA the sites' key signatures are checked against.
    """

    name = "secure_aggregation"

    def __init__(self, *, config: SecAggConfig, root_ca: Callable[[], "x509.Certificate"]):
        self.config = config
        self._root_ca = root_ca

    def run_round(self, ctx: RoundContext) -> None:
        if not ctx.stats.targets:
            ctx.skip("no site is connected")
            return
        try:
            server = SecAggServer(root_ca=self._root_ca(), job_id=ctx.job_id, round_number=ctx.stats.round,
                                  config=self.config)
            result = self._phases(ctx, server)
        except RoundAborted as exc:
            ctx.skip(str(exc))
            return
        except SecAggError as exc:
            ctx.skip(f"round aborted: {exc}")
            return
        _, layout = flatten_arrays({k: np.zeros(np.shape(v), dtype=np.asarray(v).dtype) for k, v in ctx.params.items()})
        mean = unflatten_arrays(result.mean_delta(np.float32), layout)
        ctx.apply(mean, participants=result.survivors)
        if result.dropped:
            ctx.stats.message = f"secure aggregation recovered from dropped site(s) {', '.join(result.dropped)}"
        _logger.info("%s: securely aggregated %d sites (sum of weights %.1f); dropped after sharing keys: %s",
                     ctx.label, len(result.survivors), result.weight_sum, list(result.dropped))

    def _phases(self, ctx: RoundContext, server: SecAggServer):
        self._exchange(ctx, ADVERTISE_TASK, ctx.stats.targets, {}, lambda m, _: server.receive_advertisement(m))
        roster = server.key_roster()
        sites = sorted(a.sender for a in roster.advertisements)
        self._exchange(ctx, SHARE_KEYS_TASK, sites, {SECAGG_KEY: message_to_array(roster)},
                       lambda m, _: server.receive_encrypted_shares(m))
        deliveries = {site_key(site): message_to_array(d) for site, d in server.share_deliveries().items()}
        self._exchange(ctx, TRAIN_TASK, sorted(k.split("/", 1)[1] for k in deliveries), {**ctx.params, **deliveries},
                       lambda m, reply: self._receive_masked_input(ctx, server, m, reply),
                       timeout_s=ctx.job.round_timeout_s)
        if self.config.consistency_check:
            survivor_list = server.survivor_list()
            self._exchange(ctx, CONSISTENCY_TASK, sorted(survivor_list.survivors),
                           {SECAGG_KEY: message_to_array(survivor_list)},
                           lambda m, _: server.receive_survivor_signature(m))
        request = server.unmask_request()
        # Only survivors that signed the list can answer; the others have dropped out already.
        self._exchange(ctx, UNMASK_TASK, sorted(request.attestations) or sorted(request.survivors),
                       {SECAGG_KEY: message_to_array(request)}, lambda m, _: server.receive_unmask_response(m))
        return server.aggregate()

    def _receive_masked_input(self, ctx: RoundContext, server: SecAggServer, message: Message,
                              reply: SiteReply) -> None:
        # Everything about the reply is checked before its vector enters the sum: a reply refused
        # after being summed would leave an input in the sum that the unmask phase cannot cancel.
        problem = vet_update_meta(reply)
        if problem:
            raise ValueError(problem)
        server.receive_masked_input(message)
        ctx.stats.bytes_received += int(message.masked.nbytes)
        ctx.record_site(message.sender, loss=float(reply.metrics["loss"]), num_samples=int(reply.meta["num_samples"]),
                        train_seconds=float(reply.metrics.get("train_seconds", 0.0)))

    def _exchange(self, ctx: RoundContext, task_name: str, targets: list[str], params: dict, receive: Receive, *,
                  timeout_s: float | None = None) -> None:
        """One task: each usable reply's message goes to ``receive``; a bad message drops its site."""
        timeout_s = ctx.job.secagg_phase_timeout_s if timeout_s is None else timeout_s
        replies = ctx.ask(task_name, targets, params, timeout_s=timeout_s,
                          meta=ctx.task_meta(secagg=to_mapping(self.config)))
        for site, reply in sorted(replies.items()):
            try:
                message = message_from_params(reply.params)
                if message.sender != site:
                    raise SecAggError(f"message claims to come from '{message.sender}'")
                receive(message, reply)
            except (SecAggError, KeyError, TypeError, ValueError) as exc:
                ctx.drop(site, task_name, f"refused its message: {exc}")
