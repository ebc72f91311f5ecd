"""Sizes of the multi-site study: ``smoke`` (a test, seconds), ``cpu`` (about an hour on 2 cores), ``gpu``.

A preset fixes the model, the image size, how long each arm pretrains (in image-epochs: the
centralized arm's epochs equal the federated arm's rounds of one local epoch at every site),
the fine-tuning recipe, the label fractions, seeds, arms and test-time shifts.

The ``gpu`` preset is the paper's recipe shortened: ViT-B/16 at 224 px, 100 pretraining
rounds instead of 300 (40 warm-up rounds become 10), fine-tuning 50 epochs with layer decay 0.75.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

from ultrafedfm.config import check
from ultrafedfm.downstream.augment import SHIFTS
from ultrafedfm.train.finetune import FinetuneConfig

_logger = logging.getLogger(__name__)

__all__ = ["ARMS", "PRESETS", "StudyPreset", "TASKS", "get_study_preset"]

# Every arm the study knows; a preset runs a subset. "federated_dp": DP-SGD at every site (target epsilon 8).
ARMS = ("scratch", "central", "federated", "federated_dp", "resnet18", "central_no_thyroid")
TASKS = ("busi_cls", "busi_seg", "ddti_seg")


@dataclass(frozen=True)
class StudyPreset:
    """One size of the study.

    Args:
        name: preset name.
        model_preset / img_size: the MAE (``tiny``/``small``/``base``) and its square input side.
        pretrain_epochs: image-epochs of pretraining (central epochs = federated rounds).
        pretrain_warmup: warm-up epochs (= rounds).
        pretrain_batch / pretrain_base_lr: MAE batch and base learning rate (per 256 images).
        finetune_vit / finetune_cnn: fine-tuning recipes of the ViT arms and of the ResNet-18.
        finetune_mode: ``full`` (layer decay) or ``linear`` probing for the ViT arms.
        fractions / seeds: label fractions and seeds of every fine-tuning cell.
        arms / tasks: what runs (see :data:`ARMS`, :data:`TASKS`).
        shifts: test-time shifts reported as drops from the clean metric.
        n_boot: bootstrap resamples per interval.
        decoder_channels: segmentation U-Net widths, finest first.
        federated_timeout_s: stop the federated simulation after this long (a rerun resumes it).
        split_seed: the fixed train/val/test split of the downstream sets.
        max_site_images: cap per pretraining site (``None``: all images), for the smoke preset.
    """

    name: str
    model_preset: str
    img_size: int
    pretrain_epochs: int
    pretrain_warmup: int
    pretrain_batch: int
    pretrain_base_lr: float
    finetune_vit: FinetuneConfig
    finetune_cnn: FinetuneConfig
    finetune_mode: str = "full"
    fractions: tuple[float, ...] = (0.1, 1.0)
    seeds: tuple[int, ...] = (0, 1, 2)
    arms: tuple[str, ...] = ("scratch", "central", "federated", "federated_dp", "resnet18", "central_no_thyroid")
    tasks: tuple[str, ...] = TASKS
    shifts: tuple[str, ...] = SHIFTS
    n_boot: int = 1000
    decoder_channels: tuple[int, ...] = (32, 48, 64, 96)
    federated_timeout_s: float = 3 * 3600.0
    split_seed: int = 0
    max_site_images: int | None = None
    device: str | None = None
    pretrain_num_workers: int = 0

    def __post_init__(self) -> None:
        check(set(self.arms) <= set(ARMS), "arms", f"must be among {', '.join(ARMS)}")
        check(set(self.tasks) <= set(TASKS), "tasks", f"must be among {', '.join(TASKS)}")
        check(set(self.shifts) <= set(SHIFTS), "shifts", f"must be among {', '.join(SHIFTS)}")
        check(all(0 < f <= 1 for f in self.fractions), "fractions", "must lie in (0, 1]")
        check(len(self.seeds) >= 1 and self.pretrain_epochs >= 1, "seeds", "need a seed and >= 1 pretraining epoch")
        check(self.finetune_mode in ("full", "linear"), "finetune_mode", "must be full or linear")


_CPU = StudyPreset(
    name="cpu",
    model_preset="tiny",
    img_size=64,
    pretrain_epochs=20,
    pretrain_warmup=2,
    pretrain_batch=64,
    pretrain_base_lr=5e-3,
    finetune_vit=FinetuneConfig(epochs=30, min_steps=150, batch_size=32, base_lr=2e-2, warmup_epochs=3,
                                max_evals=15),
    # ResNet-18 costs ~8x the tiny ViT per step on a CPU: fewer epochs (its validation curve flattens by then).
    finetune_cnn=FinetuneConfig(epochs=20, min_steps=100, batch_size=32, base_lr=2e-2, warmup_epochs=2,
                                layer_decay=1.0, max_evals=10),
)

PRESETS: dict[str, StudyPreset] = {
    "cpu": _CPU,
    # Seconds: generated data, a 2-block ViT at 32 px, one seed, no federated arms (a slow test runs them).
    "smoke": replace(
        _CPU, name="smoke", img_size=32, pretrain_epochs=1, pretrain_warmup=0, pretrain_batch=16,
        finetune_vit=replace(_CPU.finetune_vit, epochs=2, min_steps=4, batch_size=8, max_evals=2),
        finetune_cnn=replace(_CPU.finetune_cnn, epochs=1, min_steps=2, batch_size=8, max_evals=1),
        fractions=(1.0,), seeds=(0,), arms=("scratch", "central", "resnet18"),
        shifts=("blur",), n_boot=50, decoder_channels=(8, 8, 8, 8), max_site_images=24,
    ),
    # The paper's recipe, shortened: ViT-B/16 at 224 px (documented; needs a GPU).
    "gpu": replace(
        _CPU, name="gpu", model_preset="base", img_size=224, pretrain_epochs=100, pretrain_warmup=10,
        pretrain_batch=64, pretrain_base_lr=1.5e-4, pretrain_num_workers=8,
        finetune_vit=FinetuneConfig(epochs=50, min_steps=500, batch_size=32, base_lr=5e-4, warmup_epochs=5,
                                    max_evals=25),
        finetune_cnn=FinetuneConfig(epochs=50, min_steps=500, batch_size=32, base_lr=1e-2, warmup_epochs=5,
                                    layer_decay=1.0, max_evals=25),
        decoder_channels=(64, 128, 256, 512), federated_timeout_s=24 * 3600.0,
    ),
}


def get_study_preset(name: str) -> StudyPreset:
    if name not in PRESETS:
        raise ValueError(f"unknown study preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
