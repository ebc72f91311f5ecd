"""Training checkpoints: model, optimizer, schedule position, RNG states and step, written atomically.

A checkpoint holds everything needed to *continue* a run bit-for-bit on the same device
type: the step counter fixes the learning-rate schedule and the data order, and the saved RNG
states continue the masking and degradation noise where they stopped.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from ultrafedfm.fileio import atomic_torch_save

_logger = logging.getLogger(__name__)

__all__ = ["CHECKPOINT_NAME", "capture_rng_state", "load_checkpoint", "restore_rng_state", "save_checkpoint"]

CHECKPOINT_NAME = "checkpoint.pt"
_FORMAT = 1


def capture_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The global CPU RNG state, plus the CUDA one of ``device`` when it is a GPU."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    """Undo :func:`capture_rng_state` (the CUDA state only when resuming on a GPU)."""
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` (tensors, numbers, strings, lists, dicts) to ``path`` atomically and durably."""
    # Written beside the target, fsynced and renamed over it: an interruption (even SIGKILL or a
    # power cut) leaves the previous checkpoint intact.
    return atomic_torch_save({"format": _FORMAT, **state}, path)


def load_checkpoint(path: str | Path, *, map_location: torch.device | str = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint` (tensors only; no code is unpickled)."""
    path = Path(path)
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for damaged files
        raise RuntimeError(
            f"{path}: cannot read the checkpoint ({exc}); delete it to start over, or restore a backup"
        ) from exc
    if state.get("format") != _FORMAT:
        raise RuntimeError(
            f"{path}: checkpoint format {state.get('format')!r} is not {_FORMAT}; delete it to start over"
        )
    return state
