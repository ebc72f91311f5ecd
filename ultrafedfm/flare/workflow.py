"""Server workflow of federated MAE pretraining: a FLARE ``ModelController``.

Each round the workflow sends the global weights with the round's learning rate to every
connected site, waits for their deltas (up to ``round_timeout_s``), and -- when at least
``min_sites`` valid updates are in -- adds their sample-weighted mean to the global model
(``ultrafedfm.train.fedavg``). After each round it saves the run's state outside the job
workspace (``run_state.RunState``), so a resubmitted job continues where a killed server
stopped. At the end it writes the final model and the timm-loadable encoder.

A round is a list of phases (:meth:`MaePretrainController.round_phases`) sharing one
:class:`RoundContext`. With ``secure_aggregation`` on (the default) the plain ``train`` +
``aggregate`` pair is replaced by the key-exchange / masked-input / consistency / unmask /
apply phases of ``secagg_workflow.SecAggPhases``; the rest of the round is the same.
"""
from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from nvflare.apis.fl_constant import ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from ultrafedfm.config import from_mapping
from ultrafedfm.flare.job_spec import JobSpec
from ultrafedfm.flare.run_state import RunCheckpoint, RunState
from ultrafedfm.flare.secagg_workflow import SecAggPhases
from ultrafedfm.flare.stats import RoundStats, TensorBoardSink, format_round_line
from ultrafedfm.train.fedavg import apply_delta, round_learning_rate, weighted_mean_delta

_logger = logging.getLogger(__name__)

__all__ = ["MaePretrainController", "RoundContext", "TRAIN_TASK"]

TRAIN_TASK = "train"
RUN_STATE_FOLDER = "ultrafedfm_runs"


@dataclass
class ReceivedUpdate:
    """One site's accepted contribution to a round."""

    delta: dict[str, np.ndarray]
    num_samples: int
    loss: float
    train_seconds: float


@dataclass
class RoundContext:
    """State shared by the phases of one round."""

    stats: RoundStats
    params: dict[str, np.ndarray]
    updates: dict[str, ReceivedUpdate] = field(default_factory=dict)
    new_params: dict[str, np.ndarray] | None = None
    # secure aggregation: the round's SecAggServer, what the next phase sends, why the round aborted, the sum
    secagg: Any = None
    outbox: dict[str, np.ndarray] = field(default_factory=dict)
    aborted: str | None = None
    aggregate: Any = None


RoundPhase = Callable[[RoundContext], None]


class MaePretrainController(SecAggPhases, ModelController):
    def __init__(self, spec: dict, task_check_period: float = 0.2):
        """Runs the rounds of the job described by ``spec`` (a ``JobSpec`` as a mapping).

        Args:
            spec: every knob of the job; see ``ultrafedfm.flare.job_spec.JobSpec``.
            task_check_period: how often FLARE checks whether a task is complete (s).
        """
        # We keep our own checkpoints (run_state) and decide ourselves what a failed site
        # means, so: no persistor, and site errors never panic the job.
        super().__init__(persistor_id="", ignore_result_error=True, task_check_period=task_check_period)
        self.spec = spec
        self._job = from_mapping(JobSpec, spec, source="job config (MaePretrainController.spec)")
        self._round_errors: dict[str, str] = {}
        self._last_stats: RoundStats | None = None
        self._current_round: int | None = None
        self._phase = "init"
        self._state: RunState | None = None

    # ------------------------------------------------------------------ the run

    def run(self) -> None:
        job = self._job
        self._state = RunState(self._run_state_root(), job.effective_run_name)
        checkpoint = self._load_or_init(self._state)
        tensorboard = TensorBoardSink(self._state.tensorboard_dir)
        try:
            for round_index in range(checkpoint.next_round, job.num_rounds):
                if self.abort_signal.triggered:
                    self.warning(f"job aborted before round {round_index + 1}; the run can be resumed")
                    return
                self._current_round = round_index
                ctx = RoundContext(
                    stats=RoundStats(
                        round=round_index,
                        num_rounds=job.num_rounds,
                        lr=self._learning_rate(round_index),
                        targets=sorted(self.sample_clients()),
                    ),
                    params=checkpoint.params,
                )
                start = time.monotonic()
                for phase in self.round_phases():
                    self._phase = phase.__name__
                    phase(ctx)
                    if self.abort_signal.triggered:
                        self.warning(f"job aborted in round {round_index + 1}; that round is not saved")
                        return
                ctx.stats.duration_s = time.monotonic() - start
                self._finish_round(ctx, checkpoint)
                tensorboard.write(ctx.stats)
            self._phase = "export"
            self._export(checkpoint)
            self._phase = "finished"
        finally:
            tensorboard.close()

    def round_phases(self) -> list[RoundPhase]:
        """The phases of one round, in order (secure aggregation substitutes its own)."""
        if self._job.secure_aggregation:
            return self.secagg_round_phases()
        return [self.train_phase, self.aggregate_phase]

    def train_phase(self, ctx: RoundContext) -> None:
        """Send the global model to every site and collect their deltas."""
        stats = ctx.stats
        self._round_errors = {}
        if not stats.targets:  # FLARE would read an empty target list as "all sites"
            self.error(f"round {stats.round + 1}: no site is connected")
            return
        task = FLModel(
            params=ctx.params,
            params_type=ParamsType.FULL,
            current_round=stats.round,
            total_rounds=stats.num_rounds,
            meta={"lr": stats.lr, "training": self._job.local_training()},
        )
        results = self.send_model_and_wait(
            task_name=TRAIN_TASK,
            data=task,
            targets=stats.targets,
            min_responses=len(stats.targets),
            timeout=self._job.round_timeout_s,
        )
        for result in results:
            site = result.meta.get("client_name", "?")
            problem = self._check_result(result, ctx.params)
            if "refused" in result.meta:
                problem = f"refused by the site's policy: {result.meta['refused']}"
                self.error(f"round {stats.round + 1}: site {site} {problem}")
            if problem:
                stats.failed[site] = problem
                continue
            update = ReceivedUpdate(
                delta=result.params,
                num_samples=int(result.meta["num_samples"]),
                loss=float(result.metrics["loss"]),
                train_seconds=float(result.metrics.get("train_seconds", 0.0)),
            )
            ctx.updates[site] = update
            stats.bytes_received += sum(int(np.asarray(v).nbytes) for v in update.delta.values())
        for site in stats.targets:
            if site not in ctx.updates and site not in stats.failed:
                stats.failed[site] = self._round_errors.get(
                    site, "no result (timed out, or the site's training process died)"
                )
        stats.participants = sorted(ctx.updates)
        for site, update in ctx.updates.items():
            stats.loss[site] = update.loss
            stats.num_samples[site] = update.num_samples
            stats.train_seconds[site] = update.train_seconds
        for site, reason in sorted(stats.failed.items()):
            self.warning(f"round {stats.round + 1}: site {site} failed: {reason}")

    def aggregate_phase(self, ctx: RoundContext) -> None:
        """Sample-weighted FedAvg of the deltas, only with at least ``min_sites`` of them."""
        stats = ctx.stats
        if len(ctx.updates) < self._job.min_sites:
            stats.message = (
                f"only {len(ctx.updates)} valid update(s), fewer than min_sites={self._job.min_sites}; "
                "the global model is unchanged"
            )
            self.error(f"round {stats.round + 1}: {stats.message}")
            return
        sites = sorted(ctx.updates)
        weights = [ctx.updates[s].num_samples for s in sites]
        mean = weighted_mean_delta([ctx.updates[s].delta for s in sites], weights=weights)
        ctx.new_params = apply_delta(ctx.params, mean)
        stats.global_loss = float(np.average([ctx.updates[s].loss for s in sites], weights=weights))
        stats.applied = True

    # ------------------------------------------------------------------ helpers

    def _finish_round(self, ctx: RoundContext, checkpoint: RunCheckpoint) -> None:
        stats = ctx.stats
        is_best = False
        if stats.applied:
            checkpoint.params = ctx.new_params
            if checkpoint.best_loss is None or stats.global_loss < checkpoint.best_loss:
                checkpoint.best_loss, checkpoint.best_round, is_best = stats.global_loss, stats.round, True
        # A round without enough sites still moves the schedule on; it is recorded as not applied.
        checkpoint.last_completed_round = stats.round
        checkpoint.history.append(stats.to_dict())
        self._state.save(checkpoint, is_best=is_best)
        self._state.append_round(stats.to_dict())
        self._last_stats = stats
        self.info(format_round_line(stats))

    def _check_result(self, result: FLModel, global_params: dict[str, np.ndarray]) -> str | None:
        """Why a result cannot be aggregated, or ``None`` when it can."""
        if "error" in result.meta:
            return f"training failed at the site: {result.meta['error']}"
        if result.params_type != ParamsType.DIFF:
            return f"expected a delta (ParamsType.DIFF), got {result.params_type}"
        if not isinstance(result.meta.get("num_samples"), int) or result.meta["num_samples"] <= 0:
            return f"missing or invalid num_samples: {result.meta.get('num_samples')!r}"
        if not result.metrics or "loss" not in result.metrics:
            return "no loss in the metrics"
        params = result.params or {}
        if set(params) != set(global_params):
            return f"delta has {len(params)} entries, the global model {len(global_params)}"
        for name, value in params.items():
            value = np.asarray(value)
            if value.shape != np.shape(global_params[name]):
                return f"delta '{name}' has shape {value.shape}, expected {np.shape(global_params[name])}"
            if not np.all(np.isfinite(value)):
                return f"delta '{name}' has non-finite values"
        return None

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task=False):
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task:
            self._round_errors[client_name] = f"the site returned {rc} (its training process failed or was killed)"
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)

    def _learning_rate(self, round_index: int) -> float:
        job = self._job
        return round_learning_rate(
            round_index,
            base_lr=job.base_lr,
            batch_size=job.batch_size,
            warmup_rounds=job.warmup_rounds,
            total_rounds=job.num_rounds,
            min_lr=job.min_lr,
        )

    def _run_state_root(self) -> Path:
        if self._job.run_state_dir:
            return Path(self._job.run_state_dir)
        return Path(self.engine.get_workspace().get_root_dir()) / RUN_STATE_FOLDER

    def _load_or_init(self, state: RunState) -> RunCheckpoint:
        job = self._job
        checkpoint = state.load()
        if checkpoint is None:
            self.info(f"new run '{job.effective_run_name}' in {state.dir}")
            return RunCheckpoint(params=_initial_params(job), last_completed_round=-1, num_rounds=job.num_rounds)
        if checkpoint.num_rounds != job.num_rounds:
            raise RuntimeError(
                f"run '{job.effective_run_name}' in {state.dir} was started with num_rounds="
                f"{checkpoint.num_rounds}, this job has {job.num_rounds}; use another run_name"
            )
        fresh = _initial_params(job)
        if {k: np.shape(v) for k, v in fresh.items()} != {k: np.shape(v) for k, v in checkpoint.params.items()}:
            raise RuntimeError(
                f"run '{job.effective_run_name}' in {state.dir} holds a different model than this job "
                f"({job.preset}, {job.img_size} px); use another run_name"
            )
        state.rewrite_rounds(checkpoint.history)
        self.info(
            f"resuming run '{job.effective_run_name}' from {state.dir}: rounds 1..{checkpoint.next_round} "
            f"done, continuing with round {checkpoint.next_round + 1}/{job.num_rounds}"
        )
        return checkpoint

    def _export(self, checkpoint: RunCheckpoint) -> None:
        """Final model + encoder into the run folder, copied into the job workspace for download."""
        from ultrafedfm.flare.model_io import export_final_model

        paths = export_final_model(
            checkpoint.params, job=self._job, out_dir=self._state.dir, export_encoder=self._job.export_encoder
        )
        job_models = Path(self.get_run_dir()) / "models"
        job_models.mkdir(parents=True, exist_ok=True)
        for path in paths:
            shutil.copy2(path, job_models / path.name)
        self.info(f"final model and encoder written to {self._state.dir} and {job_models}")

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type != InfoCollector.EVENT_TYPE_GET_STATS:
            return
        collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
        if not isinstance(collector, GroupInfoCollector):
            return
        info = {
            "run_name": self._job.effective_run_name,
            "phase": self._phase,
            "current_round": None if self._current_round is None else self._current_round + 1,
            "num_rounds": self._job.num_rounds,
        }
        last = self._last_stats
        if last is not None:
            info["last_round"] = {
                "round": last.round + 1,
                "participants": last.participants,
                "failed": last.failed,
                "loss": last.loss,
                "global_loss": last.global_loss,
                "bytes_received": last.bytes_received,
                "duration_s": round(last.duration_s, 2),
                "applied": last.applied,
            }
        collector.add_info(group_name=self._name, info=info)


def _initial_params(job: JobSpec) -> dict[str, np.ndarray]:
    from ultrafedfm.flare.model_io import build_model, model_params

    return model_params(build_model(job.local_training()))
