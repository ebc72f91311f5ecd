"""One fine-tuning experiment: labelled data + split + encoder -> trained model, validation choice, test metrics.

The steps, in order: keep the images the task can use (labels for ``cls``, masks for ``seg``);
take ``label_fraction`` of the training groups (stratified, seeded); build the model (our ViT
from an encoder, or the ResNet-18 baseline); fine-tune with model selection on the validation
split; evaluate the selected model once on the test split, clean and under test-time shifts.
The CLI (``ultrafedfm finetune``) and the study both run exactly this.

Example::

    run = run_finetune(data, split, task="cls", encoder=load_encoder("encoder.safetensors"),
                       config=FinetuneConfig(task="cls"), label_fraction=0.1, seed=1)
    run.test.metrics["auroc_macro"], run.test.intervals["auroc_macro"]
"""
from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn as nn

from ultrafedfm.data.labelled import LabelledImages
from ultrafedfm.downstream.augment import Shift
from ultrafedfm.downstream.evaluate import EvalResult, evaluate_split, predict
from ultrafedfm.downstream.metrics import macro_auroc, segmentation_case_metrics
from ultrafedfm.downstream.splits import Split, label_fraction_subset
from ultrafedfm.models.downstream import DownstreamSpec, EncoderWeights, build_downstream
from ultrafedfm.train.finetune import FinetuneConfig, FitResult, fit

_logger = logging.getLogger(__name__)

__all__ = ["FinetuneRun", "restrict_split", "run_finetune", "validation_metric"]


@dataclass
class FinetuneRun:
    """A finished experiment: the selected model, how it was chosen, and its test result."""

    model: nn.Module
    spec: DownstreamSpec
    fit: FitResult
    test: EvalResult | None
    train_indices: np.ndarray
    split: Split

    @property
    def train_size(self) -> int:
        return len(self.train_indices)


def restrict_split(split: Split, usable: np.ndarray) -> Split:
    """``split`` with only the indices in ``usable`` (e.g. images with masks)."""
    keep = set(int(i) for i in usable)
    pick = lambda side: np.asarray([i for i in side if int(i) in keep], dtype=np.int64)  # noqa: E731
    return Split(train=pick(split.train), val=pick(split.val), test=pick(split.test))


def validation_metric(task: Literal["cls", "seg"]) -> str:
    return "auroc_macro" if task == "cls" else "dice"


def _validator(data: LabelledImages, indices: np.ndarray, task: str, device: torch.device):
    view = data.view(indices, task=task)

    def validate(model: nn.Module) -> float:
        preds = predict(model, view, device=device)
        model.train()
        if task == "cls":
            return macro_auroc(preds.labels, preds.probs)
        dice = segmentation_case_metrics(preds.pred_masks.float(), preds.masks.float())["dice"]
        return float(np.nanmean(dice)) if np.isfinite(dice).any() else math.nan

    return validate


def run_finetune(
    data: LabelledImages,
    split: Split,
    *,
    task: Literal["cls", "seg"],
    config: FinetuneConfig,
    encoder: EncoderWeights | None = None,
    arch: Literal["vit", "resnet18"] = "vit",
    mode: Literal["linear", "full"] = "full",
    label_fraction: float = 1.0,
    seed: int = 0,
    shifts: Sequence[Shift] = (),
    pairs: Sequence[tuple[str, str]] = (),
    decoder_channels: Sequence[int] = (32, 48, 64, 96),
    evaluate_test: bool = True,
    n_boot: int = 1000,
    device: str | torch.device | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
) -> FinetuneRun:
    """Fine-tune on ``split.train`` (a ``label_fraction`` of it), select on ``split.val``, test on ``split.test``.

    Args:
        encoder: the ViT encoder to start from (``arch="vit"``; use ``scratch_encoder`` for none).
        seed: label subset, head initialisation, data order and augmentation.
        shifts: test-time shifts to report besides the clean test metrics.
        pairs: binary AUROCs to report from the K-class probabilities, e.g. ``[("benign", "malignant")]``.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    usable = data.require("label" if task == "cls" else "mask")
    split = restrict_split(split, usable)
    for side in ("train", "val", "test"):
        if len(getattr(split, side)) == 0 and (side != "test" or evaluate_test):
            raise ValueError(f"{data.source}: the {side} split holds no image usable for {task}")
    labels = data.labels.numpy()
    train = label_fraction_subset(split.train, data.groups, labels if task == "cls" else None,
                                  fraction=label_fraction, seed=seed)
    classes = data.classes if task == "cls" else ()
    if arch == "vit":
        if encoder is None:
            raise ValueError("arch 'vit' needs an encoder (load_encoder(...) or scratch_encoder(...))")
        if encoder.img_size != data.image_size:
            raise ValueError(f"the encoder takes {encoder.img_size} px images but the data were loaded at "
                             f"{data.image_size} px; load them at image_size={encoder.img_size}")
        spec = DownstreamSpec.for_encoder(encoder, task=task, classes=classes, mode=mode,
                                          decoder_channels=tuple(decoder_channels))
    else:
        spec = DownstreamSpec(task=task, arch=arch, img_size=data.image_size, classes=classes,
                              decoder_channels=tuple(decoder_channels), drop_path=0.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = build_downstream(spec, encoder=encoder if arch == "vit" else None)
    config = dataclasses.replace(config, task=task, seed=seed)
    _logger.info("fine-tuning %s/%s (%s) on %d of %d training images (fraction %g), val %d, test %d",
                 arch, task, mode, len(train), len(split.train), label_fraction, len(split.val), len(split.test))
    result = fit(model, train=data.view(train, task=task), config=config,
                 validate=_validator(data, split.val, task, device), metric_name=validation_metric(task),
                 device=device, checkpoint_dir=checkpoint_dir, progress=progress)
    model.load_state_dict(result.best_state)
    model.eval()
    test = None
    if evaluate_test and len(split.test):
        test = evaluate_split(model, data.view(split.test, task=task), classes=classes, shifts=shifts, pairs=pairs,
                              n_boot=n_boot, device=device, seed=seed)
    return FinetuneRun(model=model, spec=spec, fit=result, test=test, train_indices=train, split=split)
