"""Local MAE pretraining: "train E epochs or S steps from these weights", centrally or as a federated client.

One function, :func:`train_local`, serves both uses. Centrally (``lr=None``) it warms the
learning rate up and then decays it along a half cosine over the call's steps; a federated
client passes ``lr=`` (the server schedules it across rounds) and gets a constant rate. AdamW
(betas 0.9/0.95, weight decay 0.05 except on biases, norms and tokens), effective learning rate
``base_lr * batch_size / 256`` (MAE), bf16 autocast on GPU, fp32 on CPU, checkpoints that
continue a run exactly, and a loud stop on a non-finite loss. DP-SGD plugs in through
``privatize`` (e.g. Opacus ``make_private``); this module knows nothing of FLARE or Opacus.

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
from ultrafedfm.train.checkpoint import (
    CHECKPOINT_NAME, capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint,
)
from ultrafedfm.train.schedule import ConstantLr, WarmupCosineLr

_logger = logging.getLogger(__name__)

__all__ = ["NonFiniteLossError", "PretrainConfig", "TrainResult", "build_model", "param_groups", "train_local"]

Privatize = Callable[[nn.Module, Optimizer, DataLoader], tuple[nn.Module, Optimizer, DataLoader]]


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
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) % 2**63)
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
            a checkpoint loaded); returns replacements, e.g. Opacus ``make_private``. A replaced
            loader cannot be positioned mid-epoch, so a DP run resumes at its epoch's start order.
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


def _run(*, model, dataset, config, epochs, steps, lr, device, checkpoint_dir, resume, privatize, seed, progress,
         started) -> TrainResult:
    num_samples = len(dataset)
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    sampler = _EpochSampler(num_samples, seed)
    loader = DataLoader(
        dataset, batch_size=config.batch_size, sampler=sampler, num_workers=config.num_workers,
        collate_fn=_stack_images, pin_memory=device.type == "cuda", persistent_workers=config.num_workers > 0,
        # An own generator: worker seeding must not draw from the global RNG (resume would diverge).
        generator=torch.Generator().manual_seed(seed),
    )
    start_step, loss_sum, last_loss = 0, 0.0, math.nan
    ckpt_path = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    state = None
    if ckpt_path is not None and resume and ckpt_path.is_file():
        state = load_checkpoint(ckpt_path, map_location=device)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng_state(state["rng"], device)
        start_step, loss_sum, last_loss = state["step"], state["loss_sum"], state["last_loss"]

    train_model, train_optimizer, train_loader = model, optimizer, loader
    if privatize is not None:
        train_model, train_optimizer, train_loader = privatize(model, optimizer, loader)
    steps_per_epoch = len(train_loader)
    total = steps if steps is not None else (epochs or config.epochs) * steps_per_epoch
    if lr is None:
        warmup = min(total, round(config.warmup_epochs * steps_per_epoch))
        schedule = WarmupCosineLr(peak_lr=config.lr, total_steps=total, warmup_steps=warmup, min_lr=config.min_lr)
    else:
        schedule = ConstantLr(lr)
    if state is not None:
        if state["total_steps"] != total or state["steps_per_epoch"] != steps_per_epoch:
            _logger.warning("resuming %s from step %d of a run planned as %d steps x %d per epoch; now %d x %d",
                            ckpt_path, start_step, state["total_steps"], state["steps_per_epoch"], total,
                            steps_per_epoch)
        _logger.info("resuming from %s at step %d/%d", ckpt_path, start_step, total)
    img_size = model.preset.img_size
    _logger.info("pretraining %s MAE on %d images, %d steps (%d per epoch), batch %d, peak lr %.3g, device %s",
                 model.preset.name, num_samples, total, steps_per_epoch, config.batch_size,
                 config.lr if lr is None else lr, device)

    use_amp = config.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    params = [p for p in model.parameters() if p.requires_grad]

    def checkpoint(step: int) -> None:
        save_checkpoint(ckpt_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "total_steps": total,
            "steps_per_epoch": steps_per_epoch, "seed": seed, "loss_sum": loss_sum, "last_loss": last_loss,
            "rng": capture_rng_state(device), "config": to_mapping(config),
        })

    step = start_step
    bar = tqdm(total=total, initial=start_step, disable=not progress, desc=f"pretrain {model.preset.name}",
               unit="step", dynamic_ncols=True)
    try:
        while step < total:
            epoch, offset = divmod(step, steps_per_epoch)
            sampler.set_epoch(epoch, offset * config.batch_size)
            batches_left = steps_per_epoch - offset
            for index, imgs in enumerate(train_loader):
                if index >= batches_left or step >= total:
                    break
                if imgs.shape[1:] != (1, img_size, img_size):
                    raise ValueError(f"the dataset yields images of shape {tuple(imgs.shape[1:])}; the "
                                     f"{model.preset.name} model needs (1, {img_size}, {img_size}): build the cache "
                                     "at that size or set pretrain.img_size")
                lr_now = schedule(step)
                for group in train_optimizer.param_groups:
                    group["lr"] = lr_now
                imgs = imgs.to(device, non_blocking=True)
                with autocast():
                    loss, _, _ = train_model(imgs, mask_ratio=config.mask_ratio)
                loss_value = loss.item()
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(step, loss_value)
                train_optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if config.grad_clip is not None:
                    torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
                train_optimizer.step()
                step += 1
                loss_sum += loss_value
                last_loss = loss_value
                bar.update(1)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr_now:.2e}", refresh=False)
                if ckpt_path is not None and step % config.checkpoint_every == 0 and step < total:
                    checkpoint(step)
    finally:
        bar.close()
    if ckpt_path is not None:
        checkpoint(step)
    seconds = time.perf_counter() - started
    result = TrainResult(num_samples=num_samples, steps=step, epochs_completed=step // steps_per_epoch,
                         mean_loss=loss_sum / step if step else math.nan, last_loss=last_loss, seconds=seconds,
                         resumed_from_step=start_step)
    _logger.info("pretraining done: %d steps, mean loss %.4f, last loss %.4f, %.1f s",
                 result.steps, result.mean_loss, result.last_loss, seconds)
    return result
