"""Secure aggregation (Bonawitz et al. 2017) as a round strategy: the server only ever holds a sum.

A round is five tasks to the sites and one decode (docs/secure-aggregation.md)::

    advertise keys    -> KeyRoster; the task announces the round context (hash of the global
                         weights, lr, training settings), which every site signs (secagg_phase_timeout_s)
    share keys        -> ShareDelivery per site          (secagg_phase_timeout_s)
    train             -> MaskedInput: the site checks the task against the announced context,
                         trains, then masks w x delta with its loss, steps and images (round_timeout_s)
    consistency check -> signatures over the survivor list (secagg_phase_timeout_s)
    unmask            -> self-mask / mask-key shares      (secagg_phase_timeout_s); the survivor set
                         is persisted in the run folder before this request leaves
    apply             -> global += sum(w * delta) / sum(w); round statistics from the decoded sums

Who may take part is the consortium's member list in the server kit's ``local/members.json``
(re-read every round): connected sites that are not members are dropped before any task.
One :class:`~ultrafedfm.secagg.SecAggServer` per round holds the running sum: a masked input
is checked in full (``check_masked_input``), then the rest of its reply is checked (it must carry
nothing but the masked payload), and only then is it added; a reply refused at any point never
enters the sum. A site that fails or does not answer is dropped; the protocol recovers it when at
least the threshold of sites answer the unmask task, and otherwise the round aborts with nothing
revealed and the model unchanged. If the sites are already bound to a survivor set for this
model (the server restarted after an unmask request), the round asks exactly those sites.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

from ultrafedfm.config import to_mapping
from ultrafedfm.federation.aggregation.base import Aggregation, vet_protocol_reply
from ultrafedfm.federation.aggregation.survivors import BoundSurvivors, read_bound_survivors, write_bound_survivors
from ultrafedfm.federation.exchange import SiteReply
from ultrafedfm.federation.rounds import RoundContext
from ultrafedfm.federation.tasks import ADVERTISE_TASK, CONSISTENCY_TASK, SHARE_KEYS_TASK, TRAIN_TASK, UNMASK_TASK
from ultrafedfm.federation.wire import ROUND_CONTEXT_KEY, SECAGG_KEY, message_from_params, message_to_array, site_key
from ultrafedfm.secagg import (
    AggregateResult, Membership, SecAggConfig, SecAggError, SecAggServer, flatten_arrays, model_digest,
    unflatten_arrays,
)
from ultrafedfm.secagg import RoundContext as SignedContext
from ultrafedfm.secagg.errors import RoundAborted
from ultrafedfm.secagg.messages import Message

_logger = logging.getLogger(__name__)

__all__ = ["SecureAggregation"]

Receive = Callable[[Message, SiteReply], None]


class SecureAggregation(Aggregation):
    """Masked inputs, summed; unmasked only as a sum of at least ``min_sites`` member sites.

    Args:
        config: the job's ``SecAggConfig`` (also sent to every site, which checks it against its policy).
        members: loads the consortium's member list (the server kit's ``local/members.json``).
    """

    name = "secure_aggregation"

    def __init__(self, *, config: SecAggConfig, members: Callable[[], Membership]):
        self.config = config
        self._members = members

    def run_round(self, ctx: RoundContext) -> None:
        if not ctx.stats.targets:
            ctx.skip("no site is connected")
            return
        try:
            members = self._members()
            context = SignedContext(model_sha256=model_digest(ctx.params), lr=ctx.stats.lr,
                                    training=ctx.contract.to_mapping())
            targets = self._targets(ctx, members, context)
            if targets is None:
                return
            server = SecAggServer(members=members, job_id=ctx.job_id, round_number=ctx.stats.round,
                                  config=self.config, context=context)
            result = self._phases(ctx, server, context, targets)
            _, layout = flatten_arrays({k: np.zeros(np.shape(v), dtype=np.asarray(v).dtype)
                                        for k, v in ctx.params.items()})
            mean = unflatten_arrays(result.mean_delta(np.float32), layout)
        except RoundAborted as exc:
            ctx.skip(str(exc))
            return
        except SecAggError as exc:
            ctx.skip(f"round aborted: {exc}")
            return
        figures = result.figures
        ctx.apply(mean, participants=result.survivors, figures=figures)
        if result.dropped:
            ctx.stats.message = f"secure aggregation recovered from dropped site(s) {', '.join(result.dropped)}"
        _logger.info("%s: securely aggregated %d sites (sum of weights %.1f, %d images, %d steps, mean loss %.4f); "
                     "dropped after sharing keys: %s", ctx.label, len(result.survivors), figures.weight_sum,
                     figures.num_samples, figures.steps, figures.loss, list(result.dropped))

    def _targets(self, ctx: RoundContext, members: Membership, context: SignedContext) -> list[str] | None:
        """The member sites to ask; ``None`` (round skipped) when the sites' binding cannot be met."""
        targets = []
        for site in ctx.stats.targets:
            if site in members.names:
                targets.append(site)
            else:
                ctx.drop(site, ADVERTISE_TASK, f"not in the consortium's member list (v{members.version}): the site "
                         "has not been enrolled (`ultrafedfm kit enroll`, then `kit membership add` by the admin)")
        bound = read_bound_survivors(ctx.run_dir, context.model_sha256)
        if bound is None:
            return targets
        missing = sorted(set(bound.survivors) - set(targets))
        if missing:
            ctx.skip(f"the sites already helped unmask a sum from this model over {list(bound.survivors)} (round "
                     f"{bound.round + 1} of job {bound.job_id}, before a server restart) and take part again only with "
                     f"exactly those sites; {missing} are not connected")
            return None
        for site in sorted(set(targets) - set(bound.survivors)):
            ctx.drop(site, ADVERTISE_TASK, f"this model's sum is bound to {list(bound.survivors)} (round "
                     f"{bound.round + 1} of job {bound.job_id} was interrupted after its unmask request); the round "
                     "is re-run with exactly those sites")
        _logger.warning("%s: re-running the round with the survivor set %s the sites are bound to for model %s...",
                        ctx.label, list(bound.survivors), context.model_sha256[:16])
        return sorted(bound.survivors)

    def _phases(self, ctx: RoundContext, server: SecAggServer, context: SignedContext,
                targets: list[str]) -> AggregateResult:
        meta = ctx.task_meta(secagg=to_mapping(self.config))
        self._exchange(ctx, ADVERTISE_TASK, targets, {}, lambda m, _: server.receive_advertisement(m),
                       meta={**meta, ROUND_CONTEXT_KEY: context.to_mapping()})
        roster = server.key_roster()
        sites = sorted(a.sender for a in roster.advertisements)
        self._exchange(ctx, SHARE_KEYS_TASK, sites, {SECAGG_KEY: message_to_array(roster)},
                       lambda m, _: server.receive_encrypted_shares(m), meta=meta)
        deliveries = {site_key(site): message_to_array(d) for site, d in server.share_deliveries().items()}
        self._exchange(ctx, TRAIN_TASK, sorted(k.split("/", 1)[1] for k in deliveries), {**ctx.params, **deliveries},
                       lambda m, reply: self._receive_masked_input(ctx, server, m, reply), meta=meta,
                       timeout_s=ctx.job.round_timeout_s, vet_first=False)
        if self.config.consistency_check:
            survivor_list = server.survivor_list()
            self._exchange(ctx, CONSISTENCY_TASK, sorted(survivor_list.survivors),
                           {SECAGG_KEY: message_to_array(survivor_list)},
                           lambda m, _: server.receive_survivor_signature(m), meta=meta)
        request = server.unmask_request()
        # Write-ahead: once a site reveals shares it is bound to this survivor set for this model;
        # a server restarted after this point re-runs the round with exactly these sites.
        write_bound_survivors(ctx.run_dir, BoundSurvivors(model_sha256=context.model_sha256, job_id=ctx.job_id,
                                                          round=ctx.stats.round, survivors=tuple(request.survivors)))
        # Only survivors that signed the list can answer; the others have dropped out already.
        self._exchange(ctx, UNMASK_TASK, sorted(request.attestations) or sorted(request.survivors),
                       {SECAGG_KEY: message_to_array(request)}, lambda m, _: server.receive_unmask_response(m),
                       meta=meta)
        return server.aggregate()

    def _receive_masked_input(self, ctx: RoundContext, server: SecAggServer, message: Message,
                              reply: SiteReply) -> None:
        # Check, then check the rest, then sum: a reply refused after its vector entered the sum
        # would leave an input in the sum that the unmask phase cannot cancel.
        server.check_masked_input(message)
        problem = vet_protocol_reply(reply)
        if problem:
            raise ValueError(problem)
        server.receive_masked_input(message)
        ctx.stats.bytes_received += int(message.masked.nbytes)

    def _exchange(self, ctx: RoundContext, task_name: str, targets: list[str], params: dict, receive: Receive, *,
                  meta: dict, timeout_s: float | None = None, vet_first: bool = True) -> None:
        """One task: each usable reply's message goes to ``receive``; a bad reply drops its site."""
        timeout_s = ctx.job.secagg_phase_timeout_s if timeout_s is None else timeout_s
        replies = ctx.ask(task_name, targets, params, timeout_s=timeout_s, meta=meta)
        for site, reply in sorted(replies.items()):
            try:
                problem = vet_protocol_reply(reply) if vet_first else None
                if problem:
                    raise ValueError(problem)
                message = message_from_params(reply.params)
                if message.sender != site:
                    raise SecAggError(f"message claims to come from '{message.sender}'")
                receive(message, reply)
            except (SecAggError, KeyError, TypeError, ValueError) as exc:
                ctx.drop(site, task_name, f"refused its message: {exc}")
