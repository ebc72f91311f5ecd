"""Fine-tuning a downstream model (classification or segmentation) with model selection on validation.

The recipe follows MAE's fine-tuning (He et al. 2022) adapted to ultrasound across
institutions: AdamW with layer-wise learning-rate decay (0.75, the UltraFedFM setting;
``lr_scale`` per parameter group from timm's ``param_groups_layer_decay``), linear warm-up then
cosine, label smoothing, stochastic depth (in the model), and strong intensity, gain, resolution,
blur and speckle augmentation (:mod:`ultrafedfm.downstream.augment`). The checkpoint kept is
the one with the best **validation** metric (macro AUROC / mean Dice); the test split is never
looked at here.

:func:`train_steps` is the inner loop alone -- "train these steps at this rate" -- which a
federated site calls per round (:mod:`ultrafedfm.train.finetune_local`); :func:`fit` wraps it
with the schedule, validation and resumable checkpoints.

Example::

    config = FinetuneConfig(task="cls", epochs=30)
    result = fit(model, train=train_view, config=config, metric_name="auroc_macro",
                 validate=lambda m: evaluate_split(m, val_view, classes=classes).metrics["auroc_macro"])
    model.load_state_dict(result.best_state)
"""
from __future__ import annotations

import contextlib
import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ultrafedfm.config import check
from ultrafedfm.downstream.augment import AugmentConfig, augment_batch
from ultrafedfm.fileio import atomic_torch_save
from ultrafedfm.train.privatize import Privatize
from ultrafedfm.train.schedule import WarmupCosineLr

_logger = logging.getLogger(__name__)

__all__ = ["FinetuneConfig", "FitResult", "NonFiniteLossError", "Privatize", "StepsResult", "build_optimizer",
           "fit", "make_loader", "per_image_loss_fn", "train_steps"]

CHECKPOINT_FILE = "finetune_checkpoint.pt"


@dataclass
class FinetuneConfig:
    """Fine-tuning settings (YAML section ``finetune``).

    Args:
        task: ``cls`` or ``seg``.
        epochs: passes over the training set (at least ``min_steps`` steps are taken, so a
            10% label fraction still trains enough).
        min_steps: lower bound on optimizer steps.
        batch_size: images per step.
        base_lr: learning rate per 256 images (effective ``base_lr * batch_size / 256``).
        layer_decay: ViT layer-wise lr decay (1.0: none); ignored for CNNs and linear probes.
        weight_decay: AdamW decoupled weight decay (not on biases, norms, tokens).
        warmup_epochs: linear warm-up, in epochs of this run (fractions allowed).
        label_smoothing: cross-entropy smoothing (classification).
        max_evals: at most this many validation passes per run (evenly spaced, plus the last step).
        augment: training augmentation, or ``null`` for none.
        seed: data order, augmentation and dropout.
        amp: bf16 autocast on a GPU.
    """

    task: Literal["cls", "seg"] = "cls"
    epochs: int = 50
    min_steps: int = 200
    batch_size: int = 32
    base_lr: float = 5e-3
    layer_decay: float = 0.75
    weight_decay: float = 0.05
    warmup_epochs: float = 5.0
    label_smoothing: float = 0.1
    max_evals: int = 25
    augment: AugmentConfig | None = field(default_factory=AugmentConfig)
    seed: int = 0
    amp: bool = True

    def __post_init__(self) -> None:
        check(self.task in ("cls", "seg"), "task", "must be cls or seg")
        check(self.epochs >= 1 and self.min_steps >= 0, "epochs", "epochs >= 1 and min_steps >= 0")
        check(self.batch_size >= 2, "batch_size", "must be at least 2 (batch norm needs two images)")
        check(self.base_lr > 0 and math.isfinite(self.base_lr), "base_lr", "must be a positive number")
        check(0 < self.layer_decay <= 1, "layer_decay", "must lie in (0, 1]")
        check(self.weight_decay >= 0 and self.warmup_epochs >= 0, "weight_decay", "weight_decay and warmup_epochs >= 0")
        check(0 <= self.label_smoothing < 1, "label_smoothing", "must lie in [0, 1)")
        check(self.max_evals >= 1, "max_evals", "must be at least 1")

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256


class NonFiniteLossError(RuntimeError):
    def __init__(self, step: int, loss: float):
        super().__init__(f"non-finite fine-tuning loss {loss} at step {step}; lower base_lr or check the data")


@dataclass
class StepsResult:
    """What :func:`train_steps` did."""

    num_samples: int
    steps: int
    mean_loss: float
    seconds: float


@dataclass
class FitResult:
    """The best validation checkpoint and the history of a :func:`fit` run."""

    best_state: dict[str, torch.Tensor]
    best_step: int
    best_metric: float
    metric_name: str
    total_steps: int
    history: list[dict[str, float]]
    seconds: float


def build_optimizer(model: nn.Module, config: FinetuneConfig) -> torch.optim.AdamW:
    """AdamW over trainable parameters; ViT encoders get timm's layer-wise ``lr_scale`` groups."""
    from timm.optim._param_groups import param_groups_layer_decay

    encoder = getattr(model, "encoder", model)
    groups: list[dict[str, Any]] = []
    if hasattr(encoder, "blocks") and hasattr(encoder, "group_matcher") and any(
            p.requires_grad for p in encoder.parameters()):
        nwd = set(encoder.no_weight_decay()) if hasattr(encoder, "no_weight_decay") else set()
        groups += param_groups_layer_decay(encoder, weight_decay=config.weight_decay, no_weight_decay_list=nwd,
                                           layer_decay=config.layer_decay)
        covered = {id(p) for g in groups for p in g["params"]}
    else:
        covered = set()
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad and id(param) not in covered:
            (no_decay if param.ndim <= 1 else decay).append(param)
    groups += [{"params": decay, "weight_decay": config.weight_decay, "lr_scale": 1.0},
               {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
    groups = [g for g in groups if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameter")
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.999))


class _Batches(torch.utils.data.Sampler[list[int]]):
    """Shuffled batches per epoch from a seed; a last batch of one image is dropped (batch norm) unless
    ``keep_single`` (DP-SGD replaces the batches by Poisson sampling over ``ceil(n / batch)`` steps)."""

    def __init__(self, n: int, batch_size: int, seed: int, keep_single: bool = False):
        self.n, self.batch_size, self.seed, self.epoch = n, batch_size, seed, 0
        self.min_batch = 1 if keep_single else 2

    def __iter__(self):
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
        order = torch.randperm(self.n, generator=g).tolist()
        self.epoch += 1
        for start in range(0, self.n, self.batch_size):
            batch = order[start:start + self.batch_size]
            if len(batch) >= self.min_batch:
                yield batch

    def __len__(self) -> int:
        full, rest = divmod(self.n, self.batch_size)
        return full + (1 if rest >= self.min_batch else 0)


def make_loader(dataset: Dataset, config: FinetuneConfig, *, seed: int, keep_single: bool = False) -> DataLoader:
    """Shuffled batches of ``config.batch_size``; ``keep_single``: keep a last batch of one image (no BatchNorm)."""
    if len(dataset) < 2:
        raise ValueError(f"fine-tuning needs at least 2 training images, got {len(dataset)}")
    return DataLoader(dataset, batch_sampler=_Batches(len(dataset), config.batch_size, seed, keep_single),
                      num_workers=0)


def _loss_fn(config: FinetuneConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The batch loss: cross-entropy, or BCE + Dice over the batch's pixels (batch Dice)."""
    if config.task == "cls":
        return lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing)
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, batch=True)
    return lambda logits, y: F.binary_cross_entropy_with_logits(logits.float(), y) + dice(logits.float(), y)


def per_image_loss_fn(config: FinetuneConfig) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One loss per image, (N,) (DP-SGD clips each image's gradient): cross-entropy, or BCE + Dice of that image."""
    if config.task == "cls":
        return lambda logits, y: F.cross_entropy(logits.float(), y, label_smoothing=config.label_smoothing,
                                                 reduction="none")
    from monai.losses import DiceLoss

    dice = DiceLoss(sigmoid=True, batch=False, reduction="none")

    def seg_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = logits.float()
        bce = F.binary_cross_entropy_with_logits(logits, y, reduction="none").flatten(1).mean(1)
        return bce + dice(logits, y).reshape(logits.shape[0])

    return seg_loss


def train_steps(model: nn.Module, loader: DataLoader, optimizer: Optimizer, config: FinetuneConfig, *,
                steps: int, lr: Callable[[int], float] | float, start_step: int = 0,
                device: torch.device, bar: Any = None,
                criterion: Callable[[torch.Tensor], torch.Tensor] | None = None) -> StepsResult:
    """Train ``steps`` optimizer steps (cycling ``loader``) at ``lr(step)`` (or a constant) times each
    group's ``lr_scale``; augmentation from ``config``. Randomness: torch's global RNG.

    ``criterion`` (DP-SGD, Opacus' wrapper): reduces the per-image losses to the loss that is
    backpropagated. A Poisson batch may then be empty; it still takes its noise-only step.
    """
    loss_fn = _loss_fn(config) if criterion is None else per_image_loss_fn(config)
    use_amp = config.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    model.train()
    started, done, scored_steps, loss_sum = time.perf_counter(), 0, 0, 0.0
    while done < steps:
        for imgs, target in loader:
            if done >= steps:
                break
            imgs, target = imgs.to(device, non_blocking=True), target.to(device, non_blocking=True)
            scored = imgs.shape[0] > 0
            if config.augment is not None and scored:
                imgs, masks = augment_batch(imgs, target if config.task == "seg" else None, config.augment)
                if config.task == "seg":
                    target = masks
            rate = lr(start_step + done) if callable(lr) else lr
            for group in optimizer.param_groups:
                group["lr"] = rate * group.get("lr_scale", 1.0)
            with autocast():
                loss = loss_fn(model(imgs), target)
                if criterion is not None:
                    loss = criterion(loss)
            value = loss.item() if scored else math.nan
            if scored and not math.isfinite(value):
                raise NonFiniteLossError(start_step + done, value)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if scored:
                loss_sum, scored_steps = loss_sum + value, scored_steps + 1
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{value:.4f}", refresh=False)
    return StepsResult(num_samples=len(loader.dataset), steps=done, mean_loss=loss_sum / max(scored_steps, 1),
                       seconds=time.perf_counter() - started)


def fit(model: nn.Module, *, train: Dataset, config: FinetuneConfig,
        validate: Callable[[nn.Module], float], metric_name: str, device: str | torch.device | None = None,
        checkpoint_dir: str | Path | None = None, progress: bool = True) -> FitResult:
    """Fine-tune ``model`` on ``train``; keep the state with the best ``validate(model)`` (higher is better).

    Args:
        validate: scores the model on the validation split (e.g. macro AUROC); NaN counts as worst.
        checkpoint_dir: with it, a checkpoint after every validation pass; a rerun continues there.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # A forked, seeded RNG: the run is reproducible and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(config.seed)
        return _fit(model, train=train, config=config, validate=validate, metric_name=metric_name, device=device,
                    checkpoint_dir=checkpoint_dir, progress=progress)


def _fit(model, *, train, config, validate, metric_name, device, checkpoint_dir, progress) -> FitResult:
    model.to(device)
    optimizer = build_optimizer(model, config)
    loader = make_loader(train, config, seed=config.seed)
    per_epoch = len(loader.batch_sampler)
    total = max(config.epochs * per_epoch, config.min_steps)
    schedule = WarmupCosineLr(peak_lr=config.lr, total_steps=total,
                              warmup_steps=min(total, round(config.warmup_epochs * per_epoch)), min_lr=0.0)
    eval_every = max(per_epoch, math.ceil(total / config.max_evals))
    step, best_metric, best_step, history = 0, -math.inf, -1, []
    best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    ckpt = Path(checkpoint_dir) / CHECKPOINT_FILE if checkpoint_dir is not None else None
    if ckpt is not None and ckpt.is_file():
        state = torch.load(ckpt, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"])
        loader.batch_sampler.epoch = int(state["sampler_epoch"])
        step, best_metric, best_step = int(state["step"]), float(state["best_metric"]), int(state["best_step"])
        best_state, history = state["best_state"], list(state["history"])
        _logger.info("resuming fine-tuning from %s at step %d/%d", ckpt, step, total)
    started = time.perf_counter()
    bar = tqdm(total=total, initial=step, desc=f"finetune {config.task}", unit="step", disable=not progress,
               dynamic_ncols=True)
    try:
        while step < total:
            chunk = min(eval_every, total - step)
            result = train_steps(model, loader, optimizer, config, steps=chunk, lr=schedule, start_step=step,
                                 device=device, bar=bar)
            step += result.steps
            metric = validate(model)
            score = metric if math.isfinite(metric) else -math.inf
            history.append({"step": step, "train_loss": result.mean_loss, metric_name: metric})
            if score > best_metric:
                best_metric, best_step = score, step
                best_state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
            if ckpt is not None:
                atomic_torch_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                                   "rng": torch.get_rng_state(), "sampler_epoch": loader.batch_sampler.epoch,
                                   "best_metric": best_metric, "best_step": best_step, "best_state": best_state,
                                   "history": history}, ckpt)
            _logger.debug("step %d: train loss %.4f, val %s %.4f", step, result.mean_loss, metric_name, metric)
    finally:
        bar.close()
    return FitResult(best_state=best_state, best_step=best_step, best_metric=best_metric, metric_name=metric_name,
                     total_steps=total, history=history, seconds=time.perf_counter() - started)

