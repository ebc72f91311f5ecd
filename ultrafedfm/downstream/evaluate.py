"""Run a fine-tuned model over a labelled split and score it: metrics, bootstrap intervals, shifts, pictures.

:func:`predict` gives class probabilities or binary masks (optionally under a test-time
shift); :func:`score` turns them into metrics (:mod:`ultrafedfm.downstream.metrics`) with
cluster-bootstrap 95% intervals on the headline metrics; :func:`evaluate_split` does both,
clean and under every requested shift. :func:`save_examples_png` draws a few segmentation
predictions (green: reference outline, red: prediction outline).

An evaluation folder may hold only some of the model's classes; its labels are mapped onto the
model's class list by name (:func:`map_labels`), and a label the model does not know is an error.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
from PIL import Image
from scipy import ndimage

from ultrafedfm.data.labelled import LabelledDataError, LabelledImages, LabelledView
from ultrafedfm.downstream.augment import Shift, apply_shift
from ultrafedfm.downstream.metrics import (
    binary_auroc, bootstrap_ci, classification_metrics, macro_auroc, segmentation_case_metrics, summarise_segmentation,
)

_logger = logging.getLogger(__name__)

__all__ = ["EvalResult", "Predictions", "evaluate_split", "map_labels", "predict", "save_examples_png", "score"]


@dataclass
class Predictions:
    """Model outputs on one split: ``probs`` (N, K) for cls; ``pred_masks``/``masks`` (N, 1, S, S) for seg."""

    task: str
    groups: list[str]
    labels: np.ndarray | None = None
    probs: np.ndarray | None = None
    pred_masks: torch.Tensor | None = None
    masks: torch.Tensor | None = None


@dataclass
class EvalResult:
    """Metrics (clean), their 95% intervals, and the metrics under each test-time shift."""

    metrics: dict[str, float]
    intervals: dict[str, tuple[float, float]]
    shifted: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: Predictions | None = None

    def to_mapping(self) -> dict[str, Any]:
        return {"metrics": self.metrics, "ci95": {k: list(v) for k, v in self.intervals.items()},
                "shifted": self.shifted}


def map_labels(data: LabelledImages, model_classes: Sequence[str]) -> LabelledImages:
    """``data`` with labels re-indexed into ``model_classes`` (by name); unknown names raise."""
    unknown = sorted(set(data.classes) - set(model_classes))
    if unknown:
        raise LabelledDataError(f"{data.source}: labels {unknown} are not classes of the model "
                                f"({', '.join(model_classes)}); rename them in labels.csv or drop those rows")
    lookup = torch.tensor([list(model_classes).index(c) for c in data.classes] + [-1], dtype=torch.int64)
    labels = lookup[data.labels]  # -1 (no label) indexes the trailing -1
    return LabelledImages(images=data.images, labels=labels, classes=tuple(model_classes), masks=data.masks,
                          has_mask=data.has_mask, groups=data.groups, files=data.files, source=data.source,
                          groups_derived=data.groups_derived)


@torch.no_grad()
def predict(model: nn.Module, view: LabelledView, *, batch_size: int = 64, device: str | torch.device = "cpu",
            shift: Shift | None = None, shift_seed: int = 0) -> Predictions:
    """Outputs of ``model`` (eval mode) on ``view``, optionally under a test-time ``shift``."""
    model.eval().to(device)
    probs, preds, targets = [], [], []
    for start in range(0, len(view), batch_size):
        items = [view[i] for i in range(start, min(len(view), start + batch_size))]
        imgs = torch.stack([x for x, _ in items]).to(device)
        if shift is not None:
            imgs = apply_shift(imgs, shift, seed=shift_seed + start)
        out = model(imgs).float()
        if view.task == "cls":
            probs.append(out.softmax(dim=1).cpu())
        else:
            preds.append((out > 0).cpu())
            targets.append(torch.stack([t for _, t in items]) > 0.5)
    if view.task == "cls":
        return Predictions(task="cls", groups=view.groups, labels=view.labels, probs=torch.cat(probs).numpy())
    return Predictions(task="seg", groups=view.groups, pred_masks=torch.cat(preds), masks=torch.cat(targets))


def score(preds: Predictions, *, classes: Sequence[str] = (), positive: str | None = None,
          pairs: Sequence[tuple[str, str]] = (), n_boot: int = 1000, seed: int = 0) -> EvalResult:
    """Metrics of ``preds`` with cluster-bootstrap (by group) 95% intervals on the headline metrics.

    Headlines: ``auroc_macro``, ``accuracy`` and every binary AUROC (cls); ``dice``, ``iou``,
    ``hd95`` (seg).
    """
    groups = preds.groups
    if preds.task == "cls":
        y, p = preds.labels, preds.probs
        metrics = classification_metrics(y, p, classes, positive=positive, pairs=pairs)
        stats = {"auroc_macro": lambda idx: macro_auroc(y[idx], p[idx], fast=True),
                 "accuracy": lambda idx: float((p[idx].argmax(1) == y[idx]).mean())}
        for key in [k for k in metrics if "_vs_" in k]:
            a, b = key.split("/", 1)[1].split("_vs_")
            neg, pos = list(classes).index(a), list(classes).index(b)
            stats[key] = lambda idx, neg=neg, pos=pos: binary_auroc(y[idx], p[idx], negative=neg, positive=pos, fast=True)
        n = len(y)
    else:
        cases = segmentation_case_metrics(preds.pred_masks.float(), preds.masks.float())
        metrics = summarise_segmentation(cases)

        def mean_of(name: str):
            values = cases[name]
            return lambda idx: float(np.nanmean(values[idx])) if np.isfinite(values[idx]).any() else math.nan

        stats = {name: mean_of(name) for name in ("dice", "iou", "hd95")}
        n = len(cases["dice"])
    intervals = {} if n_boot <= 0 else {
        name: bootstrap_ci(fn, n, groups=groups, n_boot=n_boot, seed=seed) for name, fn in stats.items()}
    return EvalResult(metrics=metrics, intervals=intervals, predictions=preds)


def evaluate_split(model: nn.Module, view: LabelledView, *, classes: Sequence[str] = (), shifts: Sequence[Shift] = (),
                   positive: str | None = None, pairs: Sequence[tuple[str, str]] = (), n_boot: int = 1000,
                   device: str | torch.device = "cpu", seed: int = 0) -> EvalResult:
    """Clean metrics with intervals, and metrics (without intervals) under each shift."""
    clean = score(predict(model, view, device=device), classes=classes, positive=positive, pairs=pairs,
                  n_boot=n_boot, seed=seed)
    for shift in shifts:
        shifted = score(predict(model, view, device=device, shift=shift, shift_seed=seed), classes=classes,
                        positive=positive, pairs=pairs, n_boot=0)
        clean.shifted[shift] = shifted.metrics
    return clean


def _outline(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask)


def save_examples_png(view: LabelledView, preds: Predictions, path: str | Path, *, count: int = 8,
                      scale: int = 2) -> Path:
    """A strip of ``count`` test images: green = reference outline, red = predicted outline."""
    path = Path(path)
    tiles = []
    picks = np.linspace(0, len(view) - 1, num=min(count, len(view))).round().astype(int)
    for i in picks:
        image = (view[int(i)][0][0].numpy() * 255).astype(np.uint8)
        rgb = np.stack([image] * 3, axis=-1)
        rgb[_outline(preds.masks[i, 0].numpy())] = (0, 255, 0)
        rgb[_outline(preds.pred_masks[i, 0].numpy())] = (255, 0, 0)
        tiles.append(np.kron(rgb, np.ones((scale, scale, 1), dtype=np.uint8)))
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.concatenate(tiles, axis=1)).save(path)
    return path
