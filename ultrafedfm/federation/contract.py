"""The training contract: what a site needs to train one round of a job, as one typed object.

The server builds it from the job (``JobSpec.training_contract()``), serialises it with
``to_mapping`` into every task, and each site rebuilds it with :meth:`TrainingContract.from_mapping`
-- the same object on both sides, never re-translated by hand. It is frozen and hashable, so
a site keeps its model and dataset per contract.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Mapping

from ultrafedfm.config import check, from_mapping, to_mapping
from ultrafedfm.federation.finetune import FinetuneSettings, build_finetune_model
from ultrafedfm.privacy.dp.config import DPConfig

if TYPE_CHECKING:  # torch-free at import: the kit tools read job specs too
    import torch

    from ultrafedfm.models.downstream.encoder import EncoderWeights
    from ultrafedfm.privacy.policy import JobRequest
    from ultrafedfm.train.pretrain import PretrainConfig

_logger = logging.getLogger(__name__)

__all__ = ["TrainingContract"]


@dataclass(frozen=True)
class TrainingContract:
    """One job's local training, as every site runs it.

    Args:
        job: the job's name (named in logs and in a site's refusal).
        preset, img_size, mask_ratio, norm_pix_loss: the MAE (``ultrafedfm.models.build_mae``).
        degradations: ultrasound degradations of the encoder input (the trainer's defaults).
        local_epochs / local_steps: work per round at each site (exactly one of them is set).
        batch_size, base_lr, weight_decay: AdamW as the MAE recipe (the server sends each round's lr).
        seed: the initial global model (every site can rebuild it) and the base of the data order.
        num_rounds: the job's rounds (a site plans its DP budget over them).
        secure_aggregation: the site's update leaves only masked (``ultrafedfm.secagg``).
        dp: DP-SGD settings (``ultrafedfm.privacy.dp.DPConfig``; ``enabled: false``: off).
        finetune: a fine-tuning job's task (``federation.finetune.FinetuneSettings``); ``None``: MAE pretraining.
    """

    job: str
    preset: Literal["tiny", "small", "base"]
    img_size: int
    mask_ratio: float
    norm_pix_loss: bool
    degradations: bool
    local_epochs: int | None
    local_steps: int | None
    batch_size: int
    base_lr: float
    weight_decay: float
    seed: int
    num_rounds: int
    secure_aggregation: bool
    dp: DPConfig = DPConfig()
    finetune: FinetuneSettings | None = None

    def __post_init__(self) -> None:
        check((self.local_epochs is None) != (self.local_steps is None), "local_epochs",
              "set exactly one of local_epochs and local_steps")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.num_rounds >= 1, "num_rounds", "must be at least 1")

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> "TrainingContract":
        """Rebuild the contract a task carries (``to_mapping`` of it); unknown or missing keys fail loudly."""
        return from_mapping(cls, data, source="the task's training contract")

    def to_mapping(self) -> dict[str, Any]:
        return to_mapping(self)

    def pretrain_config(self, *, num_workers: int = 0) -> "PretrainConfig":
        """The trainer's settings; the schedule across rounds is the server's (an lr per round), so no warm-up."""
        from ultrafedfm.models.degradations import DegradationConfig
        from ultrafedfm.train.pretrain import PretrainConfig

        return PretrainConfig(
            preset=self.preset, img_size=self.img_size, batch_size=self.batch_size, base_lr=self.base_lr,
            weight_decay=self.weight_decay, warmup_epochs=0, epochs=self.local_epochs or 1,
            mask_ratio=self.mask_ratio, norm_pix_loss=self.norm_pix_loss,
            degradations=DegradationConfig() if self.degradations else None, seed=self.seed,
            num_workers=num_workers,
        )

    def initial_model(self, *, encoder: "EncoderWeights | None" = None) -> "torch.nn.Module":
        """The network this contract describes, initialised from its seed (identical on every site and the
        server): the MAE, or for a fine-tuning job the downstream model (its encoder from ``encoder`` when given)."""
        import torch

        from ultrafedfm.train.pretrain import build_model

        if self.finetune is not None:
            return build_finetune_model(self.finetune, preset=self.preset, img_size=self.img_size, seed=self.seed,
                                        encoder=encoder, dp_compatible=self.dp.enabled)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return build_model(self.pretrain_config())

    def job_request(self, secagg: Mapping[str, Any] | None) -> "JobRequest":
        """What this contract (and the task's ``SecAggConfig`` mapping) asks of a site, for its privacy
        policy (``ultrafedfm.privacy.admit_job``)."""
        from ultrafedfm.privacy.policy import JobRequest

        return JobRequest(job=self.job, secure_aggregation=self.secure_aggregation,
                          differential_privacy=self.dp.enabled, secagg=secagg,
                          dp=to_mapping(self.dp) if self.dp.enabled else None)
