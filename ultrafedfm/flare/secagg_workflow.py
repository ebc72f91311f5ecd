"""The server's secure-aggregation phases of a round, mixed into ``MaePretrainController``.

With ``secure_aggregation`` on, a round is six phases over one ``RoundContext``; each of the
first five is one ``send_model_and_wait`` to the round's sites (docs/secure-aggregation.md)::

    advertise keys    -> KeyRoster                       (secagg_phase_timeout_s)
    share keys        -> ShareDelivery per site          (secagg_phase_timeout_s)
    train             -> MaskedInput: the site trains, then masks num_samples x delta (round_timeout_s)
    consistency check -> signatures over the survivor list (secagg_phase_timeout_s)
    unmask            -> self-mask / mask-key shares      (secagg_phase_timeout_s)
    apply             -> global += sum(w * delta) / sum(w), decoded from the unmasked ring sum

The server holds one :class:`~ultrafedfm.secagg.SecAggServer` per round: masked vectors are
added into its running sum on arrival and dropped, so no single site's delta is ever held,
stored or logged in the clear. A site that fails or does not answer a phase is dropped
(reported in the round's ``failed``); the protocol recovers it when at least the threshold of
sites answer the unmask phase, and otherwise the round aborts with nothing revealed and the
model unchanged. A round aggregates only with at least ``min_sites`` masked inputs.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType

from ultrafedfm.flare.secagg_identity import load_server_root_ca
from ultrafedfm.flare.secagg_wire import (
    ADVERTISE_TASK, CONSISTENCY_TASK, SECAGG_KEY, SHARE_KEYS_TASK, UNMASK_TASK, message_from_params, message_to_array,
    site_key,
)
from ultrafedfm.secagg import SecAggConfig, SecAggError, SecAggServer, flatten_arrays, unflatten_arrays
from ultrafedfm.secagg.errors import RoundAborted
from ultrafedfm.train.fedavg import apply_delta

_logger = logging.getLogger(__name__)

__all__ = ["SecAggPhases"]


class SecAggPhases:
    """Mixin: the secure-aggregation phases (needs ``send_model_and_wait``, ``_job``, ``engine``, logging)."""

    TRAIN_TASK = "train"

    def secagg_round_phases(self) -> list:
        return [self.secagg_advertise_phase, self.secagg_share_keys_phase, self.secagg_masked_input_phase,
                self.secagg_consistency_phase, self.secagg_unmask_phase, self.secagg_apply_phase]

    # ------------------------------------------------------------------ phases

    def secagg_advertise_phase(self, ctx) -> None:
        stats = ctx.stats
        if not stats.targets:
            self._secagg_abort(ctx, "no site is connected")
            return
        try:
            root_ca = load_server_root_ca(Path(self.engine.get_workspace().get_root_dir()))
        except SecAggError as exc:
            self._secagg_abort(ctx, str(exc))
            return
        ctx.secagg = SecAggServer(root_ca=root_ca, job_id=self.fl_ctx.get_job_id(), round_number=stats.round,
                                  config=SecAggConfig(**self._job.secagg_config()))
        self._secagg_exchange(ctx, ADVERTISE_TASK, stats.targets, {}, lambda m, _: ctx.secagg.receive_advertisement(m))
        self._secagg_close(ctx, lambda: ctx.outbox.update({SECAGG_KEY: message_to_array(ctx.secagg.key_roster())}))

    def secagg_share_keys_phase(self, ctx) -> None:
        if ctx.aborted:
            return
        sites = sorted(a.sender for a in message_from_params(ctx.outbox).advertisements)
        self._secagg_exchange(ctx, SHARE_KEYS_TASK, sites, ctx.outbox,
                              lambda m, _: ctx.secagg.receive_encrypted_shares(m))

        def deliveries() -> None:
            ctx.outbox = {site_key(site): message_to_array(d) for site, d in ctx.secagg.share_deliveries().items()}

        self._secagg_close(ctx, deliveries)

    def secagg_masked_input_phase(self, ctx) -> None:
        """The training task: global weights + each site's share delivery; masked inputs back."""
        if ctx.aborted:
            return
        stats = ctx.stats
        sites = sorted(k.split("/", 1)[1] for k in ctx.outbox)
        params = {**ctx.params, **ctx.outbox}

        def receive(message, result) -> None:
            ctx.secagg.receive_masked_input(message)
            stats.bytes_received += int(message.masked.nbytes)
            stats.loss[message.sender] = float(result.metrics["loss"])
            stats.num_samples[message.sender] = int(result.meta["num_samples"])
            stats.train_seconds[message.sender] = float(result.metrics.get("train_seconds", 0.0))

        self._secagg_exchange(ctx, self.TRAIN_TASK, sites, params, receive, timeout=self._job.round_timeout_s)
        if ctx.secagg.config.consistency_check:
            self._secagg_close(ctx, lambda: ctx.outbox.update(
                {SECAGG_KEY: message_to_array(ctx.secagg.survivor_list())}), clear=True)

    def secagg_consistency_phase(self, ctx) -> None:
        if ctx.aborted:
            return
        survivors = sorted(message_from_params(ctx.outbox).survivors)
        self._secagg_exchange(ctx, CONSISTENCY_TASK, survivors, ctx.outbox,
                              lambda m, _: ctx.secagg.receive_survivor_signature(m))
        self._secagg_close(ctx, lambda: ctx.outbox.update({SECAGG_KEY: message_to_array(ctx.secagg.unmask_request())}),
                           clear=True)

    def secagg_unmask_phase(self, ctx) -> None:
        if ctx.aborted:
            return
        request = message_from_params(ctx.outbox)
        # Only survivors that signed the list can answer; the others have dropped out already.
        targets = sorted(request.attestations) or sorted(request.survivors)
        self._secagg_exchange(ctx, UNMASK_TASK, targets, ctx.outbox, lambda m, _: ctx.secagg.receive_unmask_response(m))

        def aggregate() -> None:
            ctx.aggregate = ctx.secagg.aggregate()

        self._secagg_close(ctx, aggregate)

    def secagg_apply_phase(self, ctx) -> None:
        stats = ctx.stats
        ctx.secagg = None  # the running sum is no longer needed
        if ctx.aborted or ctx.aggregate is None:
            stats.message = f"{ctx.aborted or 'no aggregate'}; the global model is unchanged"
            self.error(f"round {stats.round + 1}: secure aggregation: {stats.message}")
            return
        result = ctx.aggregate
        _, layout = flatten_arrays({k: np.zeros(np.shape(v), dtype=np.asarray(v).dtype) for k, v in ctx.params.items()})
        mean = unflatten_arrays(result.mean_delta(np.float32), layout)
        ctx.new_params = apply_delta(ctx.params, mean)
        survivors = list(result.survivors)
        stats.participants = survivors
        weights = [stats.num_samples[s] for s in survivors]
        stats.global_loss = float(np.average([stats.loss[s] for s in survivors], weights=weights))
        stats.applied = True
        if result.dropped:
            stats.message = f"secure aggregation recovered from dropped site(s) {', '.join(result.dropped)}"
        self.info(f"round {stats.round + 1}: securely aggregated {len(survivors)} sites "
                  f"(sum of weights {result.weight_sum:.1f}); dropped after sharing keys: {list(result.dropped)}")

    # ------------------------------------------------------------------ helpers

    def _secagg_exchange(self, ctx, task_name: str, targets: list[str], params: dict, receive, *,
                         timeout: int | None = None) -> None:
        """One phase: send ``params`` to ``targets``, hand each valid answer to ``receive``, record failures."""
        stats = ctx.stats
        self._round_errors = {}
        if not targets:
            return
        timeout = self._job.secagg_phase_timeout_s if timeout is None else timeout
        task = FLModel(params=params, params_type=ParamsType.FULL, current_round=stats.round,
                       total_rounds=stats.num_rounds,
                       meta={"lr": stats.lr, "training": self._job.local_training(),
                             "secagg": self._job.secagg_config()})
        results = self.send_model_and_wait(task_name=task_name, data=task, targets=targets,
                                           min_responses=len(targets), timeout=timeout)
        answered = set()
        for result in results:
            site = result.meta.get("client_name", "?")
            answered.add(site)
            if "refused" in result.meta:
                self._secagg_fail(ctx, site, task_name, f"refused by the site's policy: {result.meta['refused']}",
                                  level=logging.ERROR)
                continue
            if "error" in result.meta:
                self._secagg_fail(ctx, site, task_name, f"failed at the site: {result.meta['error']}")
                continue
            try:
                message = message_from_params(result.params)
                if message.sender != site:
                    raise SecAggError(f"message claims to come from '{message.sender}'")
                receive(message, result)
            except (SecAggError, KeyError, TypeError, ValueError) as exc:
                self._secagg_fail(ctx, site, task_name, f"refused its message: {exc}")
        for site in targets:
            if site not in answered:
                self._secagg_fail(ctx, site, task_name, self._round_errors.get(
                    site, f"no answer within {timeout} s (timed out, or the site's process died)"))

    def _secagg_fail(self, ctx, site: str, task_name: str, reason: str, *, level: int = logging.WARNING) -> None:
        ctx.stats.failed.setdefault(site, f"{task_name}: {reason}")
        log = self.error if level >= logging.ERROR else self.warning
        log(f"round {ctx.stats.round + 1}: site {site} dropped in {task_name}: {reason}")

    def _secagg_close(self, ctx, close, *, clear: bool = False) -> None:
        """Close a phase on the server's state machine; a ``RoundAborted`` ends the round."""
        if clear:
            ctx.outbox = {}
        try:
            close()
        except RoundAborted as exc:
            self._secagg_abort(ctx, str(exc))
        except SecAggError as exc:
            self._secagg_abort(ctx, f"round aborted: {exc}")

    def _secagg_abort(self, ctx, reason: str) -> None:
        ctx.aborted = reason
        ctx.outbox = {}
