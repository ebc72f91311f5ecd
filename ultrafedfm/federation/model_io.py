"""The global model as it travels and as it is saved (no FLARE).

Weights travel as ``dict[str, numpy.ndarray]`` (the MAE's full ``state_dict``: parameters and
buffers); these helpers convert between that and the torch model, and write a run's final
artefacts: :data:`FINAL_MODEL_FILE` (a plain state_dict for ``build_mae``) and the
timm-loadable encoder :data:`ENCODER_FILE` (safetensors, ``ultrafedfm.models.export.save_encoder``)
with its JSON sidecar and Markdown model card.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np
import torch

from ultrafedfm.federation.contract import TrainingContract
from ultrafedfm.fileio import atomic_torch_save

if TYPE_CHECKING:
    from ultrafedfm.models.card import ModelCard

_logger = logging.getLogger(__name__)

__all__ = ["ENCODER_FILE", "FINAL_MODEL_FILE", "FINETUNED_FOLDER", "export_final_model", "load_params", "model_params"]

FINAL_MODEL_FILE = "final_model.pt"
ENCODER_FILE = "encoder.safetensors"
FINETUNED_FOLDER = "finetuned"


def model_params(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """The model's state_dict as numpy arrays (copies, safe to keep)."""
    return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def load_params(model: torch.nn.Module, params: Mapping[str, Any]) -> None:
    """Load numpy arrays or tensors into ``model``; every key must match."""
    state = {k: torch.as_tensor(np.asarray(v)) if not torch.is_tensor(v) else v for k, v in params.items()}
    model.load_state_dict(state, strict=True)


def export_final_model(
    params: Mapping[str, np.ndarray], *, contract: TrainingContract, out_dir: str | Path, export_encoder: bool = True,
    card: "ModelCard | None" = None,
) -> list[Path]:
    """Write :data:`FINAL_MODEL_FILE` (and the encoder with its sidecar and ``card``) into ``out_dir``; the paths.

    A fine-tuning job writes the fine-tuned model instead: :data:`FINETUNED_FOLDER` with
    ``model.safetensors``, ``model.json`` (its spec) and the card (``ultrafedfm.models.downstream``).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = contract.initial_model()
    load_params(model, params)
    if contract.finetune is not None:
        from ultrafedfm.federation.finetune import downstream_spec
        from ultrafedfm.models.downstream.spec import save_downstream

        spec = downstream_spec(contract.finetune, preset=contract.preset, img_size=contract.img_size,
                               dp_compatible=contract.dp.enabled)
        save_downstream(model, spec, out_dir / FINETUNED_FOLDER, card=card)
        return sorted((out_dir / FINETUNED_FOLDER).iterdir())
    final = atomic_torch_save(model.state_dict(), out_dir / FINAL_MODEL_FILE)
    paths = [final]
    if export_encoder:
        from ultrafedfm.models.export import save_encoder

        save_encoder(model, out_dir / ENCODER_FILE, card=card)
        # save_encoder may write a sidecar (timm model name and kwargs) next to the weights.
        paths.extend(sorted(out_dir.glob(Path(ENCODER_FILE).stem + ".*")))
    return paths
