"""Federated fine-tuning: the pretraining rounds, aggregation and privacy, for a classifier or a segmenter.

A fine-tuning job is a :class:`~ultrafedfm.federation.job_spec.JobSpec` with ``finetune`` set
(:class:`FinetuneSettings`): the global model is the downstream network of
``ultrafedfm.models.downstream`` (our ViT encoder with a classification head, or the 4-block
pyramid U-Net), initialised on the server from a pretrained encoder file (``init_encoder``) or
at random. Each site fine-tunes on the training split of its own labelled folder (``labelled:``
in its ``site.yaml``: images with ``labels.csv``), split by ``group`` with the job's seed, so
validation and test images never train and stay at the site for its own evaluation
(``ultrafedfm evaluate``). The update leaves the site masked by secure aggregation, and with the
job's ``dp`` on each site trains it with DP-SGD charged to its own ledger, exactly as in
pretraining (the network is then built without BatchNorm: ``dp_compatible``). Framework-free; the FLARE jobs are ``jobs/finetune_cls`` and ``jobs/finetune_seg``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from ultrafedfm.config import check

if TYPE_CHECKING:
    import torch

    from ultrafedfm.data.labelled import LabelledView
    from ultrafedfm.models.downstream.encoder import EncoderWeights
    from ultrafedfm.models.downstream.spec import DownstreamSpec
    from ultrafedfm.site_config import SiteConfig
    from ultrafedfm.train.finetune import FinetuneConfig

_logger = logging.getLogger(__name__)

__all__ = ["FinetuneSettings", "build_finetune_model", "downstream_spec", "finetune_config", "site_training_view"]


@dataclass(frozen=True)
class FinetuneSettings:
    """What a federated fine-tuning job trains (sent to the sites in the training contract).

    Args:
        task: ``cls`` (image classification) or ``seg`` (binary lesion segmentation).
        classes: the class names in output order (``cls``); a site's ``labels.csv`` may hold a subset,
            never another name.
        mode: ``full`` fine-tuning (layer-wise lr decay) or a ``linear`` probe on a frozen encoder.
        layer_decay: ViT layer-wise lr decay (the paper: 0.75).
        label_smoothing: cross-entropy smoothing (``cls``).
        augment: the fine-tuning recipe's intensity, gain, resolution and speckle augmentation.
        val_fraction / test_fraction: the share of each site's groups kept out of training.
    """

    task: Literal["cls", "seg"]
    classes: tuple[str, ...] = ()
    mode: Literal["linear", "full"] = "full"
    layer_decay: float = 0.75
    label_smoothing: float = 0.1
    augment: bool = True
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def __post_init__(self) -> None:
        check(self.task in ("cls", "seg"), "task", "must be cls or seg")
        check(self.task != "cls" or len(self.classes) >= 2, "classes", "classification needs at least two classes")
        check(self.task != "seg" or not self.classes, "classes", "segmentation takes no classes (lesion vs background)")
        check(0 < self.layer_decay <= 1, "layer_decay", "must lie in (0, 1]")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must lie in [0, 1)")
        check(0 < self.val_fraction and 0 < self.test_fraction and self.val_fraction + self.test_fraction < 1,
              "val_fraction", "val_fraction and test_fraction must be positive and sum to less than 1")


def downstream_spec(settings: FinetuneSettings, *, preset: str, img_size: int,
                    dp_compatible: bool = False) -> "DownstreamSpec":
    """The network of a fine-tuning job: our ViT of ``preset`` with the task's head (built for DP-SGD when the
    job turns it on: ``dp_compatible``, see ``ultrafedfm.models.downstream.heads``)."""
    from ultrafedfm.models.downstream.heads import pyramid_blocks
    from ultrafedfm.models.downstream.spec import DownstreamSpec
    from ultrafedfm.models.export import timm_model_kwargs, timm_model_name
    from ultrafedfm.models.presets import get_preset

    mae_preset = get_preset(preset, img_size=img_size)
    return DownstreamSpec(
        task=settings.task, arch="vit", img_size=img_size, classes=settings.classes, mode=settings.mode,
        timm_model=timm_model_name(mae_preset), timm_kwargs=timm_model_kwargs(mae_preset), preset=preset,
        blocks=pyramid_blocks(mae_preset.depth) if settings.task == "seg" else (), dp_compatible=dp_compatible,
    )


def build_finetune_model(settings: FinetuneSettings, *, preset: str, img_size: int, seed: int,
                         encoder: "EncoderWeights | None" = None, dp_compatible: bool = False) -> "torch.nn.Module":
    """The job's network, initialised from ``seed`` (identical everywhere) and, on the server, ``encoder``."""
    import torch

    from ultrafedfm.models.downstream.spec import build_downstream

    spec = downstream_spec(settings, preset=preset, img_size=img_size, dp_compatible=dp_compatible)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_downstream(spec, encoder=encoder)


def finetune_config(settings: FinetuneSettings, *, batch_size: int, base_lr: float, weight_decay: float,
                    seed: int) -> "FinetuneConfig":
    """The fine-tuning trainer's settings for one site's round (the server sends each round's lr)."""
    from ultrafedfm.downstream.augment import AugmentConfig
    from ultrafedfm.train.finetune import FinetuneConfig

    return FinetuneConfig(task=settings.task, batch_size=batch_size, base_lr=base_lr, layer_decay=settings.layer_decay,
                          weight_decay=weight_decay, warmup_epochs=0, label_smoothing=settings.label_smoothing,
                          augment=AugmentConfig() if settings.augment else None, seed=seed)


def site_training_view(site_config: "SiteConfig", settings: FinetuneSettings, *, img_size: int, seed: int,
                       site_name: str) -> "LabelledView":
    """The training split of the site's labelled folder, its labels mapped to the job's classes.

    Raises ``LabelledDataError`` naming the file and what to do: no ``labelled:`` folder, a class the
    job does not know, no masks for a segmentation job.
    """
    import numpy as np
    import torch

    from ultrafedfm.data.labelled import LabelledDataError, load_labelled_folder
    from ultrafedfm.downstream.splits import grouped_split

    if site_config.labelled is None:
        raise LabelledDataError(f"site '{site_name}': a fine-tuning job needs labelled images, but site.yaml has no "
                                "`labelled:` folder; point it at a folder of images with labels.csv "
                                "(file,label,mask,group)")
    require = "label" if settings.task == "cls" else "mask"
    data = load_labelled_folder(site_config.labelled, image_size=img_size, require=require, progress=False)
    labels = None
    if settings.task == "cls":
        unknown = sorted(set(data.classes) - set(settings.classes))
        if unknown:
            raise LabelledDataError(f"{site_config.labelled}/labels.csv: classes {unknown} are not among the job's "
                                    f"{list(settings.classes)}; relabel them or leave those rows' label empty")
        remap = torch.tensor([settings.classes.index(name) for name in data.classes] or [0], dtype=torch.int64)
        data.labels = torch.where(data.labels >= 0, remap[data.labels.clamp_min(0)], data.labels)
        data.classes = tuple(settings.classes)
        labels = data.labels.tolist()
    usable = data.require(require)
    split = grouped_split([data.groups[i] for i in usable], None if labels is None else [labels[i] for i in usable],
                          val_fraction=settings.val_fraction, test_fraction=settings.test_fraction, seed=seed)
    train = np.asarray(usable)[split.train]
    _logger.info("%s: fine-tuning on %d of %d labelled images (the rest stay for the site's own validation and test)",
                 site_name, len(train), len(data))
    return data.view(train, task=settings.task)

