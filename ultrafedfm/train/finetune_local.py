"""One site's part of a federated fine-tuning round: global weights in, weight delta out (no FLARE).

Mirrors the MAE site trainer: the server schedules the learning rate across rounds and sends
it; the site trains ``epochs`` (or ``steps``) at that constant rate with the fine-tuning recipe
(layer-wise lr decay, augmentation, label smoothing) and returns ``local - global`` for every
floating-point entry of the state dict. Integer buffers (BatchNorm's ``num_batches_tracked``)
are not averaged by FedAvg; they come back separately in ``counters``. DP-SGD plugs in through
``privatize(model, optimizer, loader)`` (``ultrafedfm.privacy.dp.privatizer.DPPrivatizer``, as in pretraining):
the model must then be built ``dp_compatible`` (no BatchNorm), and the loss is taken per image.

Example (what a federated site calls each round)::

    update = finetune_local(model=model, global_state=params, dataset=site_train_view,
                            config=FinetuneConfig(task="cls"), lr=lr_from_server, epochs=1,
                            generator_seed=mix_seed(seed, round_index, site_name))
    send(update.delta, update.num_samples)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn as nn
from torch.utils.data import Dataset

from ultrafedfm.train.finetune import FinetuneConfig, build_optimizer, make_loader, train_steps
from ultrafedfm.train.privatize import Privatize, apply_privatize

_logger = logging.getLogger(__name__)

__all__ = ["FinetuneUpdate", "finetune_local"]


@dataclass
class FinetuneUpdate:
    """What a site sends after a round: deltas of float entries, integer counters, sample count, loss."""

    delta: dict[str, torch.Tensor]
    counters: dict[str, torch.Tensor]
    num_samples: int
    steps: int
    loss: float
    train_seconds: float


def finetune_local(
    *,
    model: nn.Module,
    global_state: Mapping[str, torch.Tensor],
    dataset: Dataset,
    config: FinetuneConfig,
    lr: float,
    epochs: int | None = None,
    steps: int | None = None,
    privatize: Privatize | None = None,
    generator_seed: int,
    device: str | torch.device | None = None,
) -> FinetuneUpdate:
    """Load ``global_state`` into ``model``, train at constant ``lr`` and return the update.

    Args:
        model: the downstream model (``build_downstream(spec)``), same architecture as the state.
        global_state: the global weights of this round (tensors or arrays; every key must match).
        dataset: the site's training items, ``(image, target)`` (e.g. ``LabelledImages.view``).
        lr: this round's rate (the server's schedule), times each group's ``lr_scale``.
        epochs / steps: work this round (exactly one; default one epoch).
        privatize: ``privatize(model, optimizer, loader) -> (model, optimizer, loader)``.
        generator_seed: data order and augmentation for this site and round.
    """
    if epochs is not None and steps is not None:
        raise ValueError("give epochs or steps, not both")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    state = {k: torch.as_tensor(v) for k, v in global_state.items()}
    model.load_state_dict(state, strict=True)
    model.to(device)
    start = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(generator_seed)
        optimizer = build_optimizer(model, config)
        loader = make_loader(dataset, config, seed=generator_seed, keep_single=privatize is not None)
        training = apply_privatize(privatize, model, optimizer, loader)
        total = steps if steps is not None else (epochs or 1) * len(training.loader)
        result = train_steps(training.model, training.loader, training.optimizer, config, steps=total, lr=lr,
                             device=device, criterion=training.criterion)
    model.to("cpu")
    end = model.state_dict()
    delta = {k: end[k].detach() - start[k] for k in start if start[k].is_floating_point()}
    counters = {k: end[k].detach().clone() for k in start if not start[k].is_floating_point()}
    return FinetuneUpdate(delta=delta, counters=counters, num_samples=len(dataset), steps=result.steps,
                          loss=result.mean_loss, train_seconds=result.seconds)
