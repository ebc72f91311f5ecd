"""A federated run on the server, without FLARE: resume or start, run the rounds, save each, export.

:class:`FederatedRun` is given the job, where its state lives (``RunState``, outside any job
workspace, so a resubmitted job continues a run a killed server left), an aggregation strategy
and an :data:`~ultrafedfm.federation.exchange.Exchange`. Each round it builds a
:class:`~ultrafedfm.federation.rounds.RoundContext` for the connected sites, lets the strategy
run it, then saves the checkpoint and the round's statistics before the next round starts: a
round is either fully saved or not at all. The statistics are aggregates only (no site's loss,
image count or time: ``federation.stats``). At the end it exports the final model and encoder.
The FLARE controller (``ultrafedfm.flare.server.controller``) is this plus FLARE's transport.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from ultrafedfm.federation.aggregation import Aggregation
from ultrafedfm.federation.exchange import Exchange
from ultrafedfm.federation.job_spec import JobSpec
from ultrafedfm.federation.model_io import export_final_model, model_params
from ultrafedfm.federation.rounds import RoundContext
from ultrafedfm.federation.run_state import RunCheckpoint, RunState
from ultrafedfm.federation.stats import PER_SITE_KEYS, RunProgress, TensorBoardSink, format_round_line

if TYPE_CHECKING:
    from ultrafedfm.models.card import ModelCard

_logger = logging.getLogger(__name__)

__all__ = ["FederatedRun", "encoder_card", "initial_params"]


def encoder_card(job: JobSpec, history: Sequence[dict], *, aggregation: str) -> "ModelCard":
    """The exported encoder's model card, from what the server knows: the job and the aggregate round figures."""
    from ultrafedfm.models.card import ModelCard

    applied = [row for row in history if row.get("applied")]
    sites = sorted({site for row in applied for site in row.get("participants", [])})
    images = [row["total_images"] for row in applied if row.get("total_images")]
    data = [f"{len(sites)} site(s) took part: {', '.join(sites) or 'none'}"]
    if images:
        data.append(f"{max(images)} training images in the largest round (an aggregate; no site's count is known)")
    if job.dp.enabled:
        budget = (f"target epsilon {job.dp.target_epsilon:g} per site for the whole job" if job.dp.target_epsilon
                  else f"noise multiplier {job.dp.noise_multiplier:g}")
        privacy = (f"DP-SGD at every site ({budget}, clip {job.dp.max_grad_norm:g}, {job.dp.accountant}); each "
                   "site's exact spend is in its own ledger and audit report")
    else:
        privacy = "no DP-SGD (epsilon = infinity: the model itself may reveal training images)"
    privacy += "; secure aggregation" if job.secure_aggregation else "; deltas aggregated in the clear"
    last_loss = next((row["global_loss"] for row in reversed(applied) if row.get("global_loss") is not None), None)
    what = "MAE, masked patches" if job.finetune is None else "fine-tuning loss"
    notes = [f"final global training loss ({what}) {last_loss:.4f}"] if last_loss is not None else []
    if job.finetune is not None:
        start = f"from the encoder {Path(job.init_encoder).name}" if job.init_encoder else "from a random initialisation"
        return ModelCard(title=f"UltraFedFM {'classifier' if job.finetune.task == 'cls' else 'segmenter'} from "
                         f"federated fine-tuning job '{job.name}'",
                         kind="classifier" if job.finetune.task == "cls" else "segmenter", preset=job.preset,
                         data=tuple(data), training=f"federated fine-tuning ({job.finetune.mode}, {aggregation}) "
                         f"{start}, {job.img_size} px; each site trained on its own training split only",
                         rounds=len(applied), privacy=privacy, classes=job.finetune.classes, notes=tuple(notes))
    return ModelCard(title=f"UltraFedFM encoder from federated job '{job.name}'", kind="encoder", preset=job.preset,
                     data=tuple(data), training=f"federated MAE pretraining ({aggregation}), {job.img_size} px, mask "
                     f"ratio {job.mask_ratio:g}", rounds=len(applied), privacy=privacy, notes=tuple(notes))


def initial_params(job: JobSpec) -> dict[str, np.ndarray]:
    """The job's initial global model (seeded, so every process builds the same one); a fine-tuning job's
    encoder comes from its ``init_encoder`` file on the server when set."""
    encoder = None
    if job.init_encoder:
        from ultrafedfm.models.downstream.encoder import load_encoder

        encoder = load_encoder(job.init_encoder, img_size=job.img_size)
    return model_params(job.training_contract().initial_model(encoder=encoder))


class FederatedRun:
    """The rounds of one job on the server.

    Args:
        job: every knob of the job.
        state: the run's folder (checkpoint, round statistics, TensorBoard, final model).
        aggregation: how a round turns the sites' answers into one update.
        exchange: delivers a task to sites and returns their replies.
        job_id: the transport's id of this job (bound into secure-aggregation messages).
        progress: where the run reports its phase and last round (the admin console reads it).
    """

    def __init__(self, *, job: JobSpec, state: RunState, aggregation: Aggregation, exchange: Exchange, job_id: str,
                 progress: RunProgress | None = None):
        self.job = job
        self.state = state
        self.aggregation = aggregation
        self.exchange = exchange
        self.job_id = job_id
        self.progress = progress or RunProgress.for_job(job)
        self.exported: list[Path] = []

    def run(self, *, connected_sites: Callable[[], Sequence[str]], aborted: Callable[[], bool]) -> bool:
        """Run the remaining rounds; ``False`` when aborted (the run can be resumed)."""
        checkpoint = self.load_or_init()
        tensorboard = TensorBoardSink(self.state.tensorboard_dir)
        try:
            for round_index in range(checkpoint.next_round, self.job.num_rounds):
                if aborted():
                    _logger.warning("job aborted before round %d; the run can be resumed", round_index + 1)
                    return False
                self.progress.current_round, self.progress.phase = round_index, self.aggregation.name
                ctx = RoundContext(job=self.job, round_index=round_index, params=checkpoint.params,
                                   targets=connected_sites(), exchange=self.exchange, job_id=self.job_id,
                                   run_dir=self.state.dir)
                start = time.monotonic()
                self.aggregation.run_round(ctx)
                if aborted():
                    _logger.warning("job aborted in round %d; that round is not saved", round_index + 1)
                    return False
                ctx.stats.duration_s = time.monotonic() - start
                self._finish_round(ctx, checkpoint)
                tensorboard.write(ctx.stats)
            self.progress.phase = "export"
            self.exported = export_final_model(checkpoint.params, contract=self.job.training_contract(),
                                               out_dir=self.state.dir, export_encoder=self.job.export_encoder,
                                               card=encoder_card(self.job, checkpoint.history,
                                                                 aggregation=self.aggregation.name))
            _logger.info("final model and encoder written to %s", self.state.dir)
            self.progress.phase = "finished"
            return True
        finally:
            tensorboard.close()

    def load_or_init(self) -> RunCheckpoint:
        """The checkpoint to continue from, or a new run's start; refuses a run made by another job."""
        job, state = self.job, self.state
        checkpoint = state.load()
        if checkpoint is None:
            _logger.info("new run '%s' in %s", job.effective_run_name, state.dir)
            return RunCheckpoint(params=initial_params(job), last_completed_round=-1, num_rounds=job.num_rounds)
        if checkpoint.num_rounds != job.num_rounds:
            raise RuntimeError(
                f"run '{job.effective_run_name}' in {state.dir} was started with num_rounds="
                f"{checkpoint.num_rounds}, this job has {job.num_rounds}; use another run_name")
        fresh = initial_params(job)
        if {k: np.shape(v) for k, v in fresh.items()} != {k: np.shape(v) for k, v in checkpoint.params.items()}:
            raise RuntimeError(
                f"run '{job.effective_run_name}' in {state.dir} holds a different model than this job "
                f"({job.preset}, {job.img_size} px); use another run_name")
        # A run saved by an older version may hold per-site figures in its history: keep aggregates only.
        checkpoint.history = [{k: v for k, v in row.items() if k not in PER_SITE_KEYS} for row in checkpoint.history]
        state.rewrite_rounds(checkpoint.history)
        _logger.info("resuming run '%s' from %s: rounds 1..%d done, continuing with round %d/%d",
                     job.effective_run_name, state.dir, checkpoint.next_round, checkpoint.next_round + 1,
                     job.num_rounds)
        return checkpoint

    def _finish_round(self, ctx: RoundContext, checkpoint: RunCheckpoint) -> None:
        stats = ctx.stats
        is_best = False
        if stats.applied:
            checkpoint.params = ctx.new_params
            better = checkpoint.best_loss is None or (stats.global_loss or 0.0) < checkpoint.best_loss
            if stats.global_loss is not None and better:
                checkpoint.best_loss, checkpoint.best_round, is_best = stats.global_loss, stats.round, True
        # A round without enough sites still moves the schedule on; it is recorded as not applied.
        checkpoint.last_completed_round = stats.round
        checkpoint.history.append(stats.to_dict())
        self.state.save(checkpoint, is_best=is_best)
        self.state.append_round(stats.to_dict())
        self.progress.last_stats = stats
        _logger.info("%s", format_round_line(stats))
