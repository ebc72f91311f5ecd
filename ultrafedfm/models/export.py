"""Export the MAE encoder as a timm ``VisionTransformer`` state dict (for fine-tuning).

The exported weights load into ``timm.create_model(timm_model_name(mae), pretrained=False,
in_chans=1, num_classes=K, **timm_model_kwargs(mae))`` with only the classification head
(``head.*``) missing: the class token and the fixed position embedding (with timm's zero
class slot) are written in timm's layout.

The file format follows the suffix of the path: ``.safetensors`` (recommended: no pickle, the
timm name and kwargs ride along in the file's metadata) or ``.pth`` (``torch.save``). Both get a
``.json`` sidecar with the timm name and kwargs, and a Markdown model card (``.md``) when a
:class:`~ultrafedfm.models.card.ModelCard` is given.

Example::

    save_encoder(mae, "out/encoder.safetensors", card=card)   # + out/encoder.json, out/encoder.md
    meta = json.load(open("out/encoder.json"))
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2,
                            **meta["timm_kwargs"])
    vit.load_state_dict(safetensors.torch.load_file("out/encoder.safetensors"), strict=False)
"""
from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import torch

from ultrafedfm.fileio import atomic_write_bytes, atomic_write_json
from ultrafedfm.models.card import ModelCard, write_card_markdown
from ultrafedfm.models.mae import MaskedAutoencoder
from ultrafedfm.models.presets import MaePreset, get_preset

_logger = logging.getLogger(__name__)

__all__ = [
    "SAFETENSORS_SUFFIX", "export_encoder", "load_encoder_file", "save_encoder", "timm_model_kwargs", "timm_model_name",
]

SAFETENSORS_SUFFIX = ".safetensors"


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


def _encoder_meta(mae: MaskedAutoencoder, weights: str) -> dict[str, Any]:
    return {
        "timm_model": timm_model_name(mae),
        "timm_kwargs": timm_model_kwargs(mae),
        "in_chans": mae.in_chans,
        "preset": mae.preset.name,
        "weights": weights,
    }


def save_encoder(mae: MaskedAutoencoder, path: str | Path, *, card: ModelCard | None = None) -> Path:
    """Write the exported encoder to ``path`` and its sidecars; returns ``path``.

    ``path`` ending in ``.safetensors`` writes safetensors (timm name and kwargs also in the
    file's metadata); any other suffix (``.pth``) writes ``torch.save``. Always writes ``path``
    with suffix ``.json`` (timm name + kwargs, and the card when given); with ``card`` also the
    Markdown card ``path`` with suffix ``.md``. Every file is written atomically.
    """
    path = Path(path)
    state = export_encoder(mae)
    meta = _encoder_meta(mae, path.name)
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors.torch import save as save_safetensors

        file_meta = {"format": "pt", **{k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()}}
        atomic_write_bytes(path, save_safetensors({k: v.contiguous() for k, v in state.items()}, metadata=file_meta),
                           mode=0o644)
    else:
        buffer = io.BytesIO()
        torch.save(state, buffer)
        atomic_write_bytes(path, buffer.getvalue(), mode=0o644)
    if card is not None:
        meta["card"] = card.to_mapping()
        write_card_markdown(card, path.with_suffix(".md"), weights_file=path.name)
    atomic_write_json(path.with_suffix(".json"), meta)
    _logger.info("wrote encoder %s (%s) and %s", path, meta["timm_model"], path.with_suffix(".json").name)
    return path


def load_encoder_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read an encoder written by :func:`save_encoder`: (timm state dict, metadata).

    The metadata comes from the ``.json`` sidecar, or from a safetensors file's own metadata
    when the sidecar is absent; it holds ``timm_model``, ``timm_kwargs`` and ``preset``.

    Raises:
        FileNotFoundError / ValueError: naming the file and what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file {path} does not exist; export one with `ultrafedfm pretrain` or a "
                                "federated run (encoder.safetensors / encoder.pth), or pass --scratch")
    sidecar = path.with_suffix(".json")
    meta: dict[str, Any] = json.loads(sidecar.read_text(encoding="utf-8")) if sidecar.is_file() else {}
    if path.suffix == SAFETENSORS_SUFFIX:
        from safetensors import safe_open
        from safetensors.torch import load_file

        state = load_file(str(path))
        if not meta:
            with safe_open(str(path), framework="pt") as f:
                raw = f.metadata() or {}
            meta = {k: (v if k in ("timm_model", "preset", "weights", "format") else json.loads(v))
                    for k, v in raw.items()}
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise ValueError(f"{path} is not an exported encoder (no pos_embed); pass a file written by save_encoder, "
                         "or a full MAE state_dict through ultrafedfm.models.downstream.load_encoder")
    if "timm_kwargs" not in meta:
        raise ValueError(f"{path}: no timm model description (missing {sidecar.name} and no metadata in the file); "
                         "copy the .json written next to the encoder")
    return state, meta
