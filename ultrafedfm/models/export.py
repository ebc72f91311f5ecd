"""Export the MAE encoder as a timm ``VisionTransformer`` state dict (for fine-tuning).

The exported weights load into ``timm.create_model(timm_model_name(mae), pretrained=False,
in_chans=1, num_classes=K, **timm_model_kwargs(mae))`` with only the classification head
(``head.*``) missing: the class token and the fixed position embedding (with timm's zero
class slot) are written in timm's layout.

Example::

    save_encoder(mae, "out/encoder.pth")          # also writes out/encoder.json
    vit = timm.create_model("vit_base_patch16_224", pretrained=False, in_chans=1, num_classes=2,
                            **timm_model_kwargs(mae))
    vit.load_state_dict(torch.load("out/encoder.pth"), strict=False)
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from ultrafedfm.models.mae import MaskedAutoencoder
from ultrafedfm.models.presets import MaePreset, get_preset

_logger = logging.getLogger(__name__)

__all__ = ["export_encoder", "save_encoder", "timm_model_kwargs", "timm_model_name"]


def _preset_of(mae_or_preset: MaskedAutoencoder | MaePreset | str) -> MaePreset:
    if isinstance(mae_or_preset, MaskedAutoencoder):
        return mae_or_preset.preset
    if isinstance(mae_or_preset, MaePreset):
        return mae_or_preset
    return get_preset(mae_or_preset)


def timm_model_name(mae_or_preset: MaskedAutoencoder | MaePreset | str) -> str:
    """The timm model name whose architecture the encoder matches, e.g. ``"vit_base_patch16_224"``."""
    return _preset_of(mae_or_preset).timm_name


def timm_model_kwargs(mae_or_preset: MaskedAutoencoder | MaePreset | str) -> dict[str, Any]:
    """Architecture keyword arguments for ``timm.create_model`` (without ``in_chans``/``num_classes``).

    All architecture fields are given explicitly, so the same kwargs also describe the
    ``tiny`` preset (which overrides ``vit_tiny_patch16_224``) and non-default image sizes.
    """
    p = _preset_of(mae_or_preset)
    return {
        "img_size": p.img_size,
        "patch_size": p.patch_size,
        "embed_dim": p.embed_dim,
        "depth": p.depth,
        "num_heads": p.num_heads,
        "mlp_ratio": p.mlp_ratio,
    }


def export_encoder(mae: MaskedAutoencoder) -> dict[str, torch.Tensor]:
    """The encoder's weights under timm ``VisionTransformer`` names (CPU, detached copies).

    Returns keys ``cls_token`` (1, 1, D), ``pos_embed`` (1, 1 + L, D), ``patch_embed.*``,
    ``blocks.*`` and ``norm.*``; no ``head.*``.
    """
    state = {name: t.detach().cpu().clone() for name, t in mae.encoder.state_dict().items()}
    state["cls_token"] = mae.cls_token.token.detach().cpu().clone()
    state["pos_embed"] = mae.pos_embed.detach().cpu().clone()
    return state


def save_encoder(mae: MaskedAutoencoder, path: str | Path) -> Path:
    """Write the exported encoder to ``path`` (.pth) and ``path`` with suffix .json (timm name + kwargs).

    Both files are written atomically (temporary file, then rename). Returns ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(export_encoder(mae), tmp)
    os.replace(tmp, path)
    meta = {
        "timm_model": timm_model_name(mae),
        "timm_kwargs": timm_model_kwargs(mae),
        "in_chans": mae.in_chans,
        "preset": mae.preset.name,
        "weights": path.name,
    }
    meta_path = path.with_suffix(".json")
    tmp_meta = meta_path.with_name(meta_path.name + ".tmp")
    tmp_meta.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp_meta, meta_path)
    _logger.info("wrote encoder %s (%s) and %s", path, meta["timm_model"], meta_path.name)
    return path
