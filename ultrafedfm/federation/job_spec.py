"""Every knob of a federated MAE pretraining job, in one dataclass (no FLARE import).

``JobSpec`` is the single definition a job is built from (``ultrafedfm.flare.deploy.job_builder``),
the mapping the server controller receives as its one argument, and the source of the typed
:class:`~ultrafedfm.federation.contract.TrainingContract` and ``SecAggConfig`` each site receives
with every task. The committed folders under ``jobs/``
are exported from the specs in :data:`JOB_SPECS`.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Literal

from ultrafedfm.config import check
from ultrafedfm.federation.contract import TrainingContract
from ultrafedfm.federation.finetune import FinetuneSettings
from ultrafedfm.privacy.dp.config import DPConfig

if TYPE_CHECKING:
    from ultrafedfm.secagg.params import SecAggConfig

_logger = logging.getLogger(__name__)

__all__ = ["JOB_SPECS", "JobSpec"]


@dataclass(frozen=True)
class JobSpec:
    """A federated MAE pretraining job.

    Model and local training (sent to the sites with every task):
        preset, img_size, mask_ratio, norm_pix_loss: the MAE (``ultrafedfm.models.build_mae``).
        degradations: ultrasound degradations of the encoder input (the trainer's defaults).
        local_epochs / local_steps: work per round at each site (exactly one of them is set).
        batch_size, base_lr, min_lr, weight_decay: AdamW as the MAE recipe; the rate is
            ``base_lr * batch_size / 256``, warmed up over ``warmup_rounds`` then cosine-decayed.
        seed: initial global model and the sites' data order.
    Federation:
        num_rounds, min_sites: a round updates the model only with at least ``min_sites`` updates.
        round_timeout_s: how long a round waits for slow sites (0: forever); a round then
            aggregates whoever answered, if at least ``min_sites``.
        task_request_interval_s: how often idle sites poll the server (FLARE default 2 s).
        run_name / run_state_dir: where the run's state lives, outside the job workspace, so a
            resubmitted job continues the run (``None``: the job name / ``<server
            workspace>/ultrafedfm_runs``).
    Secure aggregation (docs/secure-aggregation.md; on by default):
        secure_aggregation: the server learns only the sum of the sites' weighted deltas
            (Bonawitz et al. 2017); a round then needs ``min_sites`` >= 2 (3 recommended).
        secagg_max_weight: FedAvg weights (image counts) are divided by this before masking; a
            site with more images is refused. Keep it near the largest site's image count: the
            mean delta is exact to about ``n * 2^-f * secagg_max_weight / total images``.
        secagg_max_sites: the largest round the ring-overflow bound is checked for.
        secagg_phase_timeout_s: how long each key-exchange / consistency / unmask phase waits.
    Fine-tuning (docs/finetuning.md; ``None``: MAE pretraining):
        finetune: the downstream task (``federation.finetune.FinetuneSettings``: classification or
            segmentation, classes, full or linear); each site trains on the training split of the
            labelled folder its ``site.yaml`` names (``labelled:``).
        init_encoder: a pretrained encoder file on the server (``encoder.safetensors``) the
            global model starts from; ``None``: a random initialisation (the from-scratch arm).
    Differential privacy (docs/differential-privacy.md; off by default):
        dp: DP-SGD at every site, in pretraining and fine-tuning alike (``ultrafedfm.privacy.dp.DPConfig``;
            a fine-tuning network is then built without BatchNorm): a noise multiplier or a
            target epsilon for the whole job (each site computes its noise from its own image
            count), the per-image clipping norm, delta and the accountant. Each site's own policy
            decides whether it accepts them, and its ledger charges every round.
    """

    name: str
    preset: Literal["tiny", "small", "base"] = "base"
    img_size: int = 224
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    degradations: bool = True
    num_rounds: int = 300
    warmup_rounds: int = 40
    local_epochs: int | None = 1
    local_steps: int | None = None
    batch_size: int = 64
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    seed: int = 0
    min_sites: int = 3
    round_timeout_s: int = 4 * 3600
    task_request_interval_s: float = 0.2
    launch_timeout_s: float = 300.0
    run_name: str | None = None
    run_state_dir: str | None = None
    export_encoder: bool = True
    secure_aggregation: bool = True
    secagg_max_weight: float = 100_000.0
    secagg_max_sites: int = 32
    secagg_phase_timeout_s: int = 60
    dp: DPConfig = DPConfig()
    finetune: FinetuneSettings | None = None
    init_encoder: str | None = None

    def __post_init__(self) -> None:
        check(self.name.replace("_", "").replace("-", "").isalnum(), "name", "letters, digits, '-' and '_' only")
        check(16 <= self.img_size, "img_size", "must be at least 16")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(0.0 < self.mask_ratio < 1.0, "mask_ratio", "must be in (0, 1)")
        check(self.num_rounds >= 1, "num_rounds", "must be at least 1")
        check(0 <= self.warmup_rounds <= self.num_rounds, "warmup_rounds", "must be in 0..num_rounds")
        check(
            (self.local_epochs is None) != (self.local_steps is None),
            "local_epochs",
            "set exactly one of local_epochs and local_steps",
        )
        check(self.local_epochs is None or self.local_epochs >= 1, "local_epochs", "must be at least 1")
        check(self.local_steps is None or self.local_steps >= 1, "local_steps", "must be at least 1")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.base_lr > 0 and self.min_lr >= 0, "base_lr", "base_lr > 0 and min_lr >= 0")
        check(self.min_sites >= 1, "min_sites", "must be at least 1")
        check(self.round_timeout_s >= 0, "round_timeout_s", "must be >= 0 (0 waits forever)")
        check(self.task_request_interval_s > 0, "task_request_interval_s", "must be > 0")
        check(self.secagg_phase_timeout_s >= 1, "secagg_phase_timeout_s", "must be at least 1 s")
        if self.secure_aggregation:
            check(self.min_sites >= 2, "min_sites", "secure aggregation needs at least 2 sites per round (3 recommended)")
            self.secagg_config()  # validates max_weight / max_sites against the ring bound, naming the key
        check(self.init_encoder is None or self.finetune is not None, "init_encoder",
              "only a fine-tuning job (finetune: set) starts from a pretrained encoder")

    @property
    def effective_run_name(self) -> str:
        return self.run_name or self.name

    def secagg_config(self) -> "SecAggConfig":
        """The job's secure-aggregation settings (sent to the sites with every secure-aggregation task)."""
        from ultrafedfm.config import ConfigError
        from ultrafedfm.secagg.params import SecAggConfig

        try:
            return SecAggConfig(min_sites=self.min_sites, max_sites=self.secagg_max_sites,
                                max_weight=self.secagg_max_weight)
        except ConfigError as exc:
            key = {"min_sites": "min_sites", "max_sites": "secagg_max_sites", "max_weight": "secagg_max_weight"}.get(
                exc.key, "secagg_max_sites")
            raise ConfigError(f"secure aggregation: {exc.bare_message}", key=key) from None

    def training_contract(self) -> TrainingContract:
        """What a site needs to train one round (sent with every task)."""
        return TrainingContract(
            job=self.name, preset=self.preset, img_size=self.img_size, mask_ratio=self.mask_ratio,
            norm_pix_loss=self.norm_pix_loss, degradations=self.degradations, local_epochs=self.local_epochs,
            local_steps=self.local_steps, batch_size=self.batch_size, base_lr=self.base_lr,
            weight_decay=self.weight_decay, seed=self.seed, num_rounds=self.num_rounds,
            secure_aggregation=self.secure_aggregation, dp=self.dp, finetune=self.finetune,
        )

    def learning_rate(self, round_index: int) -> float:
        """The rate every site trains with in round ``round_index`` (warm-up, then half cosine, across rounds)."""
        from ultrafedfm.train.schedule import round_learning_rate

        return round_learning_rate(round_index, base_lr=self.base_lr, batch_size=self.batch_size,
                                   warmup_rounds=self.warmup_rounds, total_rounds=self.num_rounds, min_lr=self.min_lr)


_PAPER = JobSpec(name="mae_pretrain")
# Sample-level DP at every site: epsilon 8 for the whole job (delta: each site's 1/(10 N)),
# per-image clipping at 1.0, PRV accounting, ghost clipping.
_DP = DPConfig(enabled=True, target_epsilon=8.0, max_grad_norm=1.0)
_TINY = replace(
    _PAPER,
    name="mae_pretrain_tiny",
    preset="tiny",
    img_size=32,
    num_rounds=3,
    warmup_rounds=1,
    batch_size=16,
    base_lr=1.5e-3,
    min_sites=3,
    round_timeout_s=600,
    secagg_max_weight=1_000.0,
    secagg_phase_timeout_s=30,
)

_FINETUNE_CLS = replace(
    _PAPER, name="finetune_cls", finetune=FinetuneSettings(task="cls", classes=("benign", "malignant", "normal")),
    num_rounds=50, warmup_rounds=5, batch_size=32, base_lr=5e-4, export_encoder=False,
)
_FINETUNE_SEG = replace(
    _PAPER, name="finetune_seg", finetune=FinetuneSettings(task="seg"), num_rounds=50, warmup_rounds=5,
    batch_size=16, base_lr=5e-4, export_encoder=False,
)

JOB_SPECS: dict[str, JobSpec] = {
    # The UltraFedFM paper's setup: ViT-B/16 MAE at 224 px, 300 rounds x 1 local epoch.
    "mae_pretrain": _PAPER,
    # The paper's setup with DP-SGD at every site, for sites whose policy requires it.
    "mae_pretrain_dp": replace(_PAPER, name="mae_pretrain_dp", dp=_DP),
    # Small enough for CI and the demo on a 2-core CPU.
    "mae_pretrain_tiny": _TINY,
    "mae_pretrain_tiny_dp": replace(_TINY, name="mae_pretrain_tiny_dp", dp=_DP),
    # Federated fine-tuning of the paper's encoder (ViT-B/16 at 224 px) for breast-lesion diagnosis and
    # lesion segmentation; set init_encoder to the pretrained encoder on the server before submitting.
    "finetune_cls": _FINETUNE_CLS,
    "finetune_seg": _FINETUNE_SEG,
    # The same with DP-SGD at every site (epsilon 8 for the whole job, charged to each site's ledger);
    # the network is built without BatchNorm (ultrafedfm.models.downstream.heads, dp_compatible).
    "finetune_cls_dp": replace(_FINETUNE_CLS, name="finetune_cls_dp", dp=_DP),
    "finetune_seg_dp": replace(_FINETUNE_SEG, name="finetune_seg_dp", dp=_DP),
}
