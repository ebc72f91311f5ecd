"""The trainers' DP-SGD hook: ``privatize(model, optimizer, loader)`` and what it hands back.

Both local trainers (MAE pretraining and fine-tuning) call the hook once, after building their
model, optimizer and loader, and then drive whatever it returned. It returns either the three
objects, as Opacus' ``make_private`` does, or four, ``(model, optimizer, criterion, loader)``, as
``make_private`` does with ghost clipping (``ultrafedfm.privacy.dp.privatizer.DPPrivatizer`` always
returns four): the criterion then reduces per-image losses (N,) to the loss that is backpropagated.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

_logger = logging.getLogger(__name__)

__all__ = ["Privatize", "Privatized", "apply_privatize"]

Privatize = Callable[[nn.Module, Optimizer, DataLoader], tuple]


@dataclass
class Privatized:
    """What a training loop drives: the trainer's objects, or the ones ``privatize`` returned in their place.

    ``criterion`` (DP-SGD) reduces per-image losses to the loss that is backpropagated; ``None``: the
    trainer's own batch loss.
    """

    model: nn.Module
    optimizer: Optimizer
    loader: DataLoader
    criterion: Callable[[torch.Tensor], torch.Tensor] | None = None


def apply_privatize(privatize: Privatize | None, model: nn.Module, optimizer: Optimizer,
                    loader: DataLoader) -> Privatized:
    """Hand the objects to ``privatize`` (if any): 3 back as Opacus' ``make_private`` returns them, or 4."""
    if privatize is None:
        return Privatized(model, optimizer, loader)
    replaced = privatize(model, optimizer, loader)
    if len(replaced) == 4:  # Opacus' order with ghost clipping: module, optimizer, criterion, loader
        module, private_optimizer, criterion, private_loader = replaced
        return Privatized(module, private_optimizer, private_loader, criterion)
    return Privatized(*replaced)
