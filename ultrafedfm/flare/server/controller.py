"""FLARE server controller of federated MAE pretraining: the framework-free run plus FLARE's transport.

``MaePretrainController`` is a ``ModelController`` whose :meth:`run` hands the job to
:class:`ultrafedfm.federation.server.FederatedRun` with the job's aggregation strategy
(``federation.aggregation``) and one :meth:`_exchange` function: a task out through
``send_model_and_wait``, the sites' ``FLModel`` results back as ``SiteReply`` objects. Rounds,
vetting, secure aggregation, checkpoints and statistics all live in ``ultrafedfm.federation``;
this module adds what only FLARE knows: connected sites, the job id, the abort signal, the server
kit's ``local/`` folder (where the consortium's ``members.json`` is), the run folder ``nvflare
job download`` returns, and the admin console's ``show_stats``. It also removes FLARE's own fields
(client name, job id, task props) from a result's meta before the core vets what the site sent.
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

from nvflare.apis.fl_constant import FLContextKey, FLMetaKey, ReturnCode
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.widgets.info_collector import GroupInfoCollector, InfoCollector

from ultrafedfm.config import from_mapping
from ultrafedfm.federation.aggregation import make_aggregation
from ultrafedfm.federation.exchange import ExchangeResult, SiteReply, TaskRequest
from ultrafedfm.federation.job_spec import JobSpec
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.server import FederatedRun
from ultrafedfm.federation.stats import RunProgress
from ultrafedfm.flare.server.parent_watch import watch_parent
from ultrafedfm.kit.identity import load_server_members

_logger = logging.getLogger(__name__)

__all__ = ["MaePretrainController"]

RUN_STATE_FOLDER = "ultrafedfm_runs"
JOB_MODELS_FOLDER = "models"
AUDIT_FOLDER = "audit"
# What FLARE itself puts into a result's meta on the server side (ModelController, FLModelUtils):
# the transport's, not the site's; the metrics' copy is vetted as the reply's metrics. Everything
# else in the meta is the site's own and is vetted (tests/flare/test_flare_secagg_sim.py records it).
FLARE_RESULT_META = frozenset({"client_name", "props", FLMetaKey.JOB_ID, FLMetaKey.SITE_NAME, FLMetaKey.VALIDATE_TYPE,
                               FLMetaKey.INITIAL_METRICS})


class MaePretrainController(ModelController):
    def __init__(self, spec: dict, task_check_period: float = 0.2):
        """Runs the rounds of the job described by ``spec`` (a ``JobSpec`` as a mapping).

        Args:
            spec: every knob of the job; see ``ultrafedfm.federation.job_spec.JobSpec``.
            task_check_period: how often FLARE checks whether a task is complete (s).
        """
        # We keep our own checkpoints (run_state) and decide ourselves what a failed site
        # means, so: no persistor, and site errors never panic the job.
        super().__init__(persistor_id="", ignore_result_error=True, task_check_period=task_check_period)
        self.spec = spec
        self._job = from_mapping(JobSpec, spec, source="job config (MaePretrainController.spec)")
        self.progress = RunProgress.for_job(self._job)
        self._round_errors: dict[str, str] = {}

    def run(self) -> None:
        job = self._job
        workspace = self.engine.get_workspace()
        workspace_root = Path(workspace.get_root_dir())
        local_dir = Path(workspace.get_site_config_dir())  # the server kit's local/
        state_root = Path(job.run_state_dir) if job.run_state_dir else workspace_root / RUN_STATE_FOLDER
        run = FederatedRun(
            job=job, state=RunState(state_root, job.effective_run_name),
            aggregation=make_aggregation(job, members=lambda: load_server_members(local_dir)),
            exchange=self._exchange, job_id=self.fl_ctx.get_job_id(), progress=self.progress)
        # A job process outliving a killed server must not keep saving rounds (parent_watch).
        stop_watching = watch_parent(lambda: self.abort_signal.trigger(True))
        try:
            finished = run.run(connected_sites=lambda: sorted(self.sample_clients()),
                               aborted=lambda: bool(self.abort_signal.triggered))
        finally:
            stop_watching()
        if finished:
            job_models = Path(self.get_run_dir()) / JOB_MODELS_FOLDER  # what `nvflare job download` returns
            job_models.mkdir(parents=True, exist_ok=True)
            for path in run.exported:
                shutil.copy2(path, job_models / path.name)
        self._write_audit_report(run.state.dir, workspace_root)

    def _write_audit_report(self, run_dir: Path, workspace_root: Path) -> None:
        """The server's audit report of this job, in the run folder and in the job folder `nvflare job download`
        returns. A report that cannot be written is an ERROR in the log, never a failed job."""
        from ultrafedfm.privacy.audit import server_report_dir, write_server_report

        job_id = self.fl_ctx.get_job_id()
        try:
            files = write_server_report(run_dir=run_dir, job_id=job_id, job_spec=self.spec,
                                        job_meta=self.fl_ctx.get_prop(FLContextKey.JOB_META), workspace=workspace_root,
                                        out_dir=server_report_dir(run_dir, job_id))
        except Exception:  # the run's own state is saved; the report can be rebuilt with `ultrafedfm audit`
            self.log_exception(self.fl_ctx, "the server's audit report could not be written; rebuild it with "
                                            "`ultrafedfm audit --server`")
            return
        target = Path(self.get_run_dir()) / AUDIT_FOLDER
        shutil.copytree(Path(files.json).parent, target, dirs_exist_ok=True)
        self.info(f"audit report written to {Path(files.json).parent} and {target}")

    def _exchange(self, request: TaskRequest) -> ExchangeResult:
        """One task to ``request.targets`` through FLARE; their results as framework-free replies."""
        self._round_errors = {}
        task = FLModel(params=dict(request.params), params_type=ParamsType.FULL, current_round=request.round,
                       total_rounds=request.num_rounds, meta=dict(request.meta))
        results = self.send_model_and_wait(task_name=request.task_name, data=task, targets=list(request.targets),
                                           min_responses=len(request.targets), timeout=int(request.timeout_s))
        replies = {}
        for result in results:
            site = result.meta.get("client_name", "?")
            meta = {k: v for k, v in (result.meta or {}).items() if k not in FLARE_RESULT_META}
            replies[site] = SiteReply(site=site, params=result.params, meta=meta, metrics=dict(result.metrics or {}),
                                      is_delta=result.params_type == ParamsType.DIFF)
        return ExchangeResult(replies=replies, errors=dict(self._round_errors))

    def _accept_train_result(self, client_name: str, result: Shareable, fl_ctx: FLContext, is_unknown_task=False):
        rc = result.get_return_code()
        if rc and rc != ReturnCode.OK and not is_unknown_task:
            self._round_errors[client_name] = f"the site returned {rc} (its training process failed or was killed)"
        return super()._accept_train_result(client_name, result, fl_ctx, is_unknown_task=is_unknown_task)

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type != InfoCollector.EVENT_TYPE_GET_STATS:
            return
        collector = fl_ctx.get_prop(InfoCollector.CTX_KEY_STATS_COLLECTOR, None)
        if isinstance(collector, GroupInfoCollector):
            collector.add_info(group_name=self._name, info=self.progress.to_info())
