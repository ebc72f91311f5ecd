"""Local MAE pretraining: "train E epochs or S steps from these weights", centrally or as a federated client.

One function, :func:`train_local`, serves both uses. Centrally (``lr=None``) it warms the
learning rate up and then decays it along a half cosine over the call's steps; a federated
client passes ``lr=`` (the server schedules it across rounds) and gets a constant rate. AdamW
(betas 0.9/0.95, weight decay 0.05 except on biases, norms and tokens), effective learning rate
``base_lr * batch_size / 256`` (MAE), bf16 autocast on GPU, fp32 on CPU, checkpoints that
continue a run exactly, and a loud stop on a non-finite loss. DP-SGD plugs in through
``privatize`` (``ultrafedfm.privacy.dp.privatizer.DPPrivatizer``, or Opacus ``make_private`` directly);
this module knows nothing of FLARE or Opacus.

A run is five steps: build (optimizer, sampler, loader), restore (a checkpoint), privatize,
plan (steps and learning-rate schedule), loop.

Example::

    config = PretrainConfig(preset="tiny", epochs=2, batch_size=16)
    model = build_model(config)
    result = train_local(model=model, dataset=images, config=config, checkpoint_dir=Path("run"))
"""
from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Literal, Sequence

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from ultrafedfm.config import check, to_mapping
from ultrafedfm.models.degradations import DegradationConfig
from ultrafedfm.models.mae import MaskedAutoencoder, build_mae
from ultrafedfm.models.presets import PRESETS
from ultrafedfm.seeds import mix_seed
from ultrafedfm.train.checkpoint import (
    CHECKPOINT_NAME, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
)
from ultrafedfm.train.privatize import Privatize, Privatized, apply_privatize
from ultrafedfm.train.schedule import ConstantLr, WarmupCosineLr

_logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "PretrainConfig", "TrainResult", "build_model", "param_groups", "train_local"]

@dataclass
class PretrainConfig:
    """MAE pretraining settings (YAML section ``pretrain``).

    Args:
        preset: model size, "tiny" (tests), "small" or "base" (the paper).
        img_size: image side in pixels; ``None`` uses the preset's (224; 32 for tiny).
        batch_size: images per optimizer step.
        base_lr: learning rate per 256 images; the optimizer uses ``base_lr * batch_size / 256``.
        min_lr: floor of the cosine decay.
        weight_decay: AdamW decoupled weight decay (not on biases, norms, tokens).
        betas: AdamW betas.
        warmup_epochs: linear warm-up length in epochs (fractions allowed).
        epochs: default length of a run.
        mask_ratio: fraction of patches hidden from the encoder.
        norm_pix_loss: regress per-patch normalised pixels.
        degradations: encoder-input degradations; ``null`` for none.
        seed: seeds data order, masking and degradations.
        num_workers: data-loader worker processes (0 = load in the training process).
        amp: bf16 mixed precision on a GPU (ignored on CPU, which trains in fp32).
        grad_clip: max global gradient norm, or ``None`` (must be ``None`` with DP-SGD).
        checkpoint_every: steps between checkpoints (one is also written at the end).
    """

    preset: Literal["tiny", "small", "base"] = "base"
    img_size: int | None = None
    batch_size: int = 64
    base_lr: float = 1.5e-4
    min_lr: float = 0.0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_epochs: float = 10.0
    epochs: int = 100
    mask_ratio: float = 0.75
    norm_pix_loss: bool = True
    degradations: DegradationConfig | None = field(default_factory=DegradationConfig)
    seed: int = 0
    num_workers: int = 2
    amp: bool = True
    grad_clip: float | None = None
    checkpoint_every: int = 500

    def __post_init__(self) -> None:
        check(self.preset in PRESETS, "preset", f"must be one of {', '.join(PRESETS)}")
        patch = PRESETS[self.preset].patch_size
        check(self.img_size is None or (self.img_size > 0 and self.img_size % patch == 0), "img_size",
              f"must be a positive multiple of the {self.preset} preset's patch size {patch}")
        check(self.batch_size >= 1, "batch_size", "must be at least 1")
        check(self.base_lr > 0 and math.isfinite(self.base_lr), "base_lr", "must be a positive number")
        check(0 <= self.min_lr <= self.base_lr * self.batch_size / 256, "min_lr",
              "must lie in [0, base_lr * batch_size / 256]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas", "must be two numbers in [0, 1)")
        check(self.warmup_epochs >= 0, "warmup_epochs", "must be >= 0")
        check(self.epochs >= 1, "epochs", "must be at least 1")
        check(0 <= self.mask_ratio < 1, "mask_ratio", "must lie in [0, 1)")
        check(self.seed >= 0, "seed", "must be >= 0")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")
        check(self.grad_clip is None or self.grad_clip > 0, "grad_clip", "must be positive, or null for no clipping")
        check(self.checkpoint_every >= 1, "checkpoint_every", "must be at least 1 step")

    @property
    def lr(self) -> float:
        """Effective peak learning rate, ``base_lr * batch_size / 256``."""
        return self.base_lr * self.batch_size / 256


@dataclass
class TrainResult:
    """What one :func:`train_local` run did (losses and steps cover resumed steps too)."""

    num_samples: int
    steps: int
    epochs_completed: int
    mean_loss: float
    last_loss: float
    seconds: float
    resumed_from_step: int = 0


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; training stopped at ``step``."""

    def __init__(self, step: int, loss: float):
        super().__init__(
            f"non-finite loss {loss} at step {step}; training stopped. Lower the learning rate, "
            "set grad_clip, or check the data for NaN/inf pixels"
        )
        self.step = step
        self.loss = loss


def build_model(config: PretrainConfig) -> MaskedAutoencoder:
    """The MAE that ``config`` describes (seed torch first for reproducible weights)."""
    return build_mae(config.preset, img_size=config.img_size, mask_ratio=config.mask_ratio,
                     norm_pix_loss=config.norm_pix_loss, degradations=config.degradations)


def param_groups(model: MaskedAutoencoder, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on 1-D parameters (biases, norms) and on ``model.no_weight_decay()``."""
    skip = model.no_weight_decay()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [{"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}]


class _EpochSampler(Sampler[int]):
    """A fresh permutation per epoch, fixed by (seed, epoch), that can start mid-epoch (resume)."""

    def __init__(self, num_samples: int, seed: int):
        self.num_samples = num_samples
        self.seed = seed
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self):
        generator = torch.Generator().manual_seed(mix_seed(self.seed, "epoch", self.epoch))
        return iter(torch.randperm(self.num_samples, generator=generator)[self.start:].tolist())

    def __len__(self) -> int:
        return self.num_samples - self.start


def _stack_images(items: Sequence) -> torch.Tensor:
    """Collate dataset items, tensors or (tensor, ...) tuples, into a (N, 1, S, S) batch."""
    return torch.stack([item[0] if isinstance(item, (tuple, list)) else item for item in items])


def _check_model_matches(model: MaskedAutoencoder, config: PretrainConfig) -> None:
    expected = {
        "preset": config.preset,
        "img_size": config.img_size or PRESETS[config.preset].img_size,
        "norm_pix_loss": config.norm_pix_loss,
        "degradations": config.degradations,
    }
    actual = {"preset": model.preset.name, "img_size": model.preset.img_size,
              "norm_pix_loss": model.norm_pix_loss, "degradations": model.degradations}
    wrong = [f"{k}: model {actual[k]!r}, config {expected[k]!r}" for k in expected if actual[k] != expected[k]]
    if wrong:
        raise ValueError("the model does not match the pretrain config (" + "; ".join(wrong)
                         + "); build it with build_model(config)")


def train_local(
    *,
    model: MaskedAutoencoder,
    dataset: Dataset,
    config: PretrainConfig,
    epochs: int | None = None,
    steps: int | None = None,
    lr: float | None = None,
    device: str | torch.device | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool = True,
    privatize: Privatize | None = None,
    generator_seed: int | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train ``model`` in place for ``epochs`` epochs or ``steps`` steps (default ``config.epochs``).

    Args:
        model: the MAE, built from ``config`` (its weights are the starting point).
        dataset: items are (1, S, S) float tensors in [0, 1], or tuples whose first element is.
        config: optimizer, schedule, batch and data-loading settings.
        epochs / steps: length of this call (at most one of them). An epoch is
            ``ceil(len(dataset) / batch_size)`` steps (the last batch may be smaller), each a
            fresh permutation fixed by (seed, epoch index within the call).
        lr: ``None`` for warm-up + cosine over this call's steps; a number for a constant rate.
        device: default CUDA when available, else CPU.
        checkpoint_dir: where ``checkpoint.pt`` is written every ``config.checkpoint_every``
            steps and at the end; with ``resume`` an existing one is continued, not restarted.
        privatize: called as ``privatize(model, optimizer, loader)`` after they are built (and
            a checkpoint loaded); returns replacements, e.g. Opacus ``make_private``, either
            ``(model, optimizer, loader)`` or ``(model, optimizer, criterion, loader)``; with a
            criterion the model gives per-image losses (``reduction="none"``) and the criterion
            reduces them (DP-SGD: :class:`ultrafedfm.privacy.dp.privatizer.DPPrivatizer`). Empty batches
            (Poisson sampling) still step and are left out of the losses. A replaced loader cannot
            be positioned mid-epoch, so a DP run resumes at its epoch's start order.
        generator_seed: seed for data order, masking and degradations (default ``config.seed``).
        progress: show a tqdm progress bar.

    Returns:
        :class:`TrainResult`. The caller's global RNG state is left untouched.

    Raises:
        NonFiniteLossError: the loss was NaN/inf (the step is named; no update is applied).
    """
    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise ValueError(f"epochs and steps must be >= 1, got epochs={epochs}, steps={steps}")
    if privatize is not None and config.grad_clip is not None:
        raise ValueError("grad_clip must be null with DP-SGD: the private optimizer clips per-sample gradients "
                         "itself and would silently overwrite a global clip")
    if generator_seed is not None and not 0 <= generator_seed < 2**63:
        raise ValueError(f"generator_seed must lie in [0, 2**63), got {generator_seed}")
    num_samples = len(dataset)
    if num_samples == 0:
        raise ValueError("the dataset is empty; ingest images into the site cache first")
    _check_model_matches(model, config)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    seed = config.seed if generator_seed is None else generator_seed
    started = time.perf_counter()
    # Seed a forked RNG: the run is reproducible and the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        return _run(model=model, dataset=dataset, config=config, epochs=epochs, steps=steps, lr=lr, device=device,
                    checkpoint_dir=checkpoint_dir, resume=resume, privatize=privatize, seed=seed,
                    progress=progress, started=started)


@dataclass
class _Progress:
    """Where a run stands; saved in checkpoints. ``loss_steps`` counts steps that had images to score."""

    step: int = 0
    loss_sum: float = 0.0
    last_loss: float = math.nan
    loss_steps: int = 0


@dataclass(frozen=True)
class _Plan:
    total: int
    steps_per_epoch: int
    schedule: Callable[[int], float]


def _run(*, model, dataset, config, epochs, steps, lr, device, checkpoint_dir, resume, privatize, seed, progress,
         started) -> TrainResult:
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    sampler = _EpochSampler(len(dataset), seed)
    loader = _build_loader(dataset, sampler, config, device, seed)
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state = _restore(ckpt_path, model, optimizer, device) if ckpt_path is not None and resume else None
    done = _Progress(state["step"], state["loss_sum"], state["last_loss"], state.get("loss_steps", state["step"])) \
        if state is not None else _Progress()
    training = apply_privatize(privatize, model, optimizer, loader)
    plan = _plan(config, epochs=epochs, steps=steps, lr=lr, steps_per_epoch=len(training.loader))
    if state is not None:
        if state["total_steps"] != plan.total or state["steps_per_epoch"] != plan.steps_per_epoch:
            _logger.warning("resuming %s from step %d of a run planned as %d steps x %d per epoch; now %d x %d",
                            ckpt_path, done.step, state["total_steps"], state["steps_per_epoch"], plan.total,
                            plan.steps_per_epoch)
        _logger.info("resuming from %s at step %d/%d", ckpt_path, done.step, plan.total)
    _logger.info("pretraining %s MAE on %d images, %d steps (%d per epoch), batch %d, peak lr %.3g, device %s",
                 model.preset.name, len(dataset), plan.total, plan.steps_per_epoch, config.batch_size,
                 config.lr if lr is None else lr, device)

    def checkpoint() -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": done.step,
            "total_steps": plan.total, "steps_per_epoch": plan.steps_per_epoch, "seed": seed,
            "loss_sum": done.loss_sum, "last_loss": done.last_loss, "loss_steps": done.loss_steps,
            "rng": capture_rng_state(device), "config": to_mapping(config),
        })

    start_step = done.step
    clipped = [p for p in model.parameters() if p.requires_grad] if config.grad_clip is not None else []
    _loop(training, sampler=sampler, plan=plan, done=done, config=config, img_size=model.preset.img_size,
          preset=model.preset.name, params=clipped, device=device, progress=progress,
          checkpoint=checkpoint if ckpt_path is not None else None)
    if ckpt_path is not None:
        checkpoint()
    seconds = time.perf_counter() - started
    result = TrainResult(num_samples=len(dataset), steps=done.step, epochs_completed=done.step // plan.steps_per_epoch,
                         mean_loss=done.loss_sum / done.loss_steps if done.loss_steps else math.nan,
                         last_loss=done.last_loss, seconds=seconds, resumed_from_step=start_step)
    _logger.info("pretraining done: %d steps, mean loss %.4f, last loss %.4f, %.1f s",
                 result.steps, result.mean_loss, result.last_loss, seconds)
    return result


def _build_loader(dataset: Dataset, sampler: _EpochSampler, config: PretrainConfig, device: torch.device,
                  seed: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
        collate_fn=_stack_images, pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0,
        # An own generator: worker seeding must not draw from the global RNG (resume would diverge).
        generator=torch.Generator().manual_seed(seed),
    )


def _restore(ckpt_path: Path, model: nn.Module, optimizer: Optimizer, device: torch.device) -> dict | None:
    """Load the checkpoint into ``model``, ``optimizer`` and the RNG when there is one; its state, or ``None``."""
    if not ckpt_path.is_file():
        return None
    state = load_checkpoint(ckpt_path, map_location=device)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    restore_rng_state(state["rng"], device)
    return state


def _plan(config: PretrainConfig, *, epochs: int | None, steps: int | None, lr: float | None,
          steps_per_epoch: int) -> _Plan:
    total = steps if steps is not None else (epochs or config.epochs) * steps_per_epoch
    if lr is None:
        warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
        schedule = WarmupCosineLr(peak_lr=config.lr, total_steps=total, warmup_steps=warmup, min_lr=config.min_lr)
    else:
        schedule = ConstantLr(lr)
    return _Plan(total=total, steps_per_epoch=steps_per_epoch, schedule=schedule)


def _loop(training: Privatized, *, sampler: _EpochSampler, plan: _Plan, done: _Progress, config: PretrainConfig,
          img_size: int, preset: str, params: list[nn.Parameter], device: torch.device, progress: bool,
          checkpoint: Callable[[], None] | None) -> None:
    """Run steps until ``plan.total``, updating ``done`` in place and checkpointing every ``checkpoint_every``."""
    use_amp = config.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    optimizer, criterion = training.optimizer, training.criterion
    # One refresh a second is plenty for training and keeps the bar off the step time of small models.
    bar = tqdm(total=plan.total, initial=done.step, disable=not progress, desc=f"pretrain {preset}", unit="step",
               dynamic_ncols=True, mininterval=1.0)
    try:
        while done.step < plan.total:
            epoch, offset = divmod(done.step, plan.steps_per_epoch)
            sampler.set_epoch(epoch, offset * config.batch_size)
            batches_left = plan.steps_per_epoch - offset
            for index, imgs in enumerate(training.loader):
                if index >= batches_left or done.step >= plan.total:
                    break
                imgs = _checked_batch(imgs, img_size=img_size, preset=preset)
                lr_now = plan.schedule(done.step)
                for group in optimizer.param_groups:
                    group["lr"] = lr_now
                imgs = imgs.to(device, non_blocking=True)
                with autocast():
                    if criterion is None:
                        loss, _, _ = training.model(imgs, mask_ratio=config.mask_ratio)
                    else:
                        per_image, _, _ = training.model(imgs, mask_ratio=config.mask_ratio, reduction="none")
                        loss = criterion(per_image)
                # A Poisson batch may be empty: it still takes its (noise-only) DP-SGD step, but has no loss.
                scored = imgs.shape[0] > 0
                loss_value = loss.item() if scored else math.nan
                if scored and not math.isfinite(loss_value):
                    raise NonFiniteLossError(done.step, loss_value)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                optimizer.step()
                done.step += 1
                if scored:
                    done.loss_sum += loss_value
                    done.loss_steps += 1
                    done.last_loss = loss_value
                bar.update(1)
                if progress:
                    bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", refresh=False)
                if checkpoint is not None and done.step % config.checkpoint_every == 0 and done.step < plan.total:
                    checkpoint()
    finally:
        bar.close()


def _checked_batch(imgs, *, img_size: int, preset: str) -> torch.Tensor:
    # An empty Poisson batch before any non-empty one comes from Opacus as a list of empty tensors
    # shaped after the dataset's first item; give it the model's shape.
    if isinstance(imgs, (list, tuple)) and all(isinstance(t, torch.Tensor) and t.shape[0] == 0 for t in imgs):
        return torch.zeros(0, 1, img_size, img_size)
    if imgs.shape[1:] != (1, img_size, img_size):
        if imgs.shape[0] == 0:
            return torch.zeros(0, 1, img_size, img_size)
        raise ValueError(f"the dataset yields images of shape {tuple(imgs.shape[1:])}; the {preset} model needs "
                         f"(1, {img_size}, {img_size}): build the cache at that size or set pretrain.img_size")
    return imgs
