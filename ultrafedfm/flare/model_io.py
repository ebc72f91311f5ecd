"""Global-model construction and export shared by the server workflow and the sites (no FLARE).

Weights travel as ``dict[str, numpy.ndarray]`` (the MAE's full ``state_dict``: parameters and
buffers); these helpers convert between that and the torch model, and write the run's final
artefacts: ``final_model.pt`` (a plain state_dict for ``build_mae``) and ``encoder.pth``
(loadable by ``timm.create_model``).
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

_logger = logging.getLogger(__name__)

__all__ = ["build_model", "export_final_model", "load_params", "model_params", "pretrain_config"]

FINAL_MODEL_FILE = "final_model.pt"
ENCODER_FILE = "encoder.pth"


def pretrain_config(training: Mapping[str, Any], *, num_workers: int = 0):
    """The trainer's ``PretrainConfig`` for a job's ``local_training()`` mapping.

    The schedule across rounds is the server's (``lr`` per call), so no warm-up here.
    """
    from ultrafedfm.models.degradations import DegradationConfig
    from ultrafedfm.train.pretrain import PretrainConfig

    return PretrainConfig(
        preset=training["preset"],
        img_size=training["img_size"],
        batch_size=training["batch_size"],
        base_lr=training["base_lr"],
        weight_decay=training["weight_decay"],
        warmup_epochs=0,
        epochs=training.get("local_epochs") or 1,
        mask_ratio=training["mask_ratio"],
        norm_pix_loss=training["norm_pix_loss"],
        degradations=DegradationConfig() if training["degradations"] else None,
        seed=training["seed"],
        num_workers=num_workers,
    )


def build_model(training: Mapping[str, Any]) -> torch.nn.Module:
    """The MAE described by a job's ``local_training()`` mapping, initialised from its seed."""
    from ultrafedfm.train import pretrain

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(training["seed"]))
        return pretrain.build_model(pretrain_config(training))


def model_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy arrays (copies, safe to keep)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_params(model: torch.nn.Module, params: Mapping[str, Any]) -> None:
    """Load numpy arrays or tensors into ``model``; every key must match."""
    state = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in params.items()}
    model.load_state_dict(state, strict=True)


def export_final_model(
    params: Mapping[str, np.ndarray], *, job: Any, out_dir: str | Path, export_encoder: bool = True
) -> list[Path]:
    """Write ``final_model.pt`` (and ``encoder.pth``) for ``job`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(job.local_training())
    load_params(model, params)
    final = out_dir / FINAL_MODEL_FILE
    torch.save(model.state_dict(), final)
    paths = [final]
    if export_encoder:
        from ultrafedfm.models.export import save_encoder

        save_encoder(model, out_dir / ENCODER_FILE)
        # save_encoder may write a sidecar (timm model name and kwargs) next to the weights.
        paths.extend(sorted(out_dir.glob(Path(ENCODER_FILE).stem + ".*")))
    return paths
