"""Where a downstream model's ViT encoder comes from: an exported encoder, a full MAE, or nothing (scratch).

All three give the same thing, :class:`EncoderWeights`: a timm ``VisionTransformer`` state dict
and the timm name and kwargs that build its architecture. "Scratch" is the MAE's own
initialisation under a seed (xavier weights, fixed sine-cosine position embedding), so the
only difference between the scratch arm and a pretrained arm is the pretraining.

Example::

    weights = load_encoder("runs/central/encoder.safetensors")   # or final_model.pt, checkpoint.pt
    weights = scratch_encoder("tiny", img_size=64, seed=0)
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ultrafedfm.models.export import export_encoder, load_encoder_file, timm_model_kwargs, timm_model_name
from ultrafedfm.models.mae import build_mae
from ultrafedfm.models.presets import PRESETS

_logger = logging.getLogger(__name__)

__all__ = ["EncoderWeights", "create_vit", "load_encoder", "scratch_encoder"]


@dataclass
class EncoderWeights:
    """A timm ViT encoder: weights (timm names, no ``head.*``), architecture and where it came from."""

    state: dict[str, torch.Tensor]
    timm_model: str
    timm_kwargs: dict[str, Any]
    preset: str
    source: str

    @property
    def img_size(self) -> int:
        return int(self.timm_kwargs["img_size"])


def create_vit(weights: EncoderWeights | None, *, timm_model: str, timm_kwargs: dict[str, Any], num_classes: int,
               drop_path: float = 0.0, dp_compatible: bool = False) -> torch.nn.Module:
    """A 1-channel timm ViT (average-pooled, final norm kept), loaded with ``weights`` when given.

    ``global_pool="avg"`` with ``fc_norm=False`` keeps the encoder's final ``norm`` (which the
    export carries) and averages the normed patch tokens, so every exported weight is used.

    ``dp_compatible``: built for DP-SGD (same weights, same state_dict keys): plain
    ``nn.LayerNorm`` layers (timm's subclass has no Opacus per-sample rule and would fall to
    functorch, which fails on an empty Poisson batch), and the class token and position embedding
    frozen (raw parameters of the top module have no per-sample rule either; MAE's position
    embedding is a fixed sine-cosine table anyway).
    """
    import timm

    extra: dict[str, Any] = {"norm_layer": partial(torch.nn.LayerNorm, eps=1e-6)} if dp_compatible else {}
    vit = timm.create_model(timm_model, pretrained=False, in_chans=1, num_classes=num_classes, global_pool="avg",
                            fc_norm=False, drop_path_rate=drop_path, **timm_kwargs, **extra)
    if weights is not None:
        result = vit.load_state_dict(weights.state, strict=False)
        unexpected = list(result.unexpected_keys)
        missing = [k for k in result.missing_keys if not k.startswith("head.")]
        if unexpected or missing:
            raise ValueError(f"encoder from {weights.source} does not fit {timm_model} {timm_kwargs}: "
                             f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    if dp_compatible:
        for name in ("cls_token", "pos_embed", "reg_token"):
            if isinstance(getattr(vit, name, None), torch.nn.Parameter):
                getattr(vit, name).requires_grad = False
    return vit


def scratch_encoder(preset: str, *, img_size: int | None = None, seed: int = 0) -> EncoderWeights:
    """A randomly initialised encoder (the MAE's initialisation under ``seed``)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mae = build_mae(preset, img_size=img_size)
    return EncoderWeights(state=export_encoder(mae), timm_model=timm_model_name(mae),
                          timm_kwargs=timm_model_kwargs(mae), preset=preset, source=f"scratch (seed {seed})")


def _preset_from_state(state: dict[str, torch.Tensor], where: Path) -> str:
    proj = state["encoder.patch_embed.proj.weight"]
    dim, patch = int(proj.shape[0]), int(proj.shape[-1])
    depth = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.blocks."))
    for name, p in PRESETS.items():
        if (p.embed_dim, p.patch_size, p.depth) == (dim, patch, depth):
            return name
    raise ValueError(f"{where}: an MAE with width {dim}, patch {patch}, depth {depth} matches no preset "
                     f"({', '.join(PRESETS)})")


def load_encoder(path: str | Path, *, img_size: int | None = None) -> EncoderWeights:
    """The encoder in ``path``: an exported encoder (``.safetensors``/``.pth`` + ``.json``), a full MAE
    state_dict (``final_model.pt`` of a federated run) or a pretraining checkpoint (``checkpoint.pt``).

    ``img_size`` is needed only for a bare MAE state_dict without an ``encoder.json`` beside it
    (the MAE's position embedding is a buffer, not in its state_dict).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder file {path} does not exist; pass an encoder.safetensors / encoder.pth "
                                "(from `ultrafedfm pretrain` or a federated run), a final_model.pt, or --scratch")
    if path.suffix == ".safetensors":
        state, meta = load_encoder_file(path)
        return EncoderWeights(state=state, timm_model=meta["timm_model"], timm_kwargs=dict(meta["timm_kwargs"]),
                              preset=meta.get("preset", "unknown"), source=str(path))
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(blob, dict) and "pos_embed" in blob:
        state, meta = load_encoder_file(path)
        return EncoderWeights(state=state, timm_model=meta["timm_model"], timm_kwargs=dict(meta["timm_kwargs"]),
                              preset=meta.get("preset", "unknown"), source=str(path))
    config = {}
    if isinstance(blob, dict) and "model" in blob and isinstance(blob["model"], dict):  # pretraining checkpoint
        config, blob = blob.get("config") or {}, blob["model"]
    if not isinstance(blob, dict) or "encoder.patch_embed.proj.weight" not in blob:
        raise ValueError(f"{path} is neither an exported encoder nor an MAE state_dict / checkpoint")
    preset = _preset_from_state(blob, path)
    size = img_size or config.get("img_size")
    sidecar = path.with_name("encoder.json")
    if size is None and sidecar.is_file():
        import json

        size = json.loads(sidecar.read_text(encoding="utf-8"))["timm_kwargs"]["img_size"]
    if size is None:
        raise ValueError(f"{path}: the MAE state_dict does not record its image size; pass img_size "
                         "(or keep the encoder.json written beside it)")
    mae = build_mae(preset, img_size=int(size))
    mae.load_state_dict(blob, strict=True)
    return EncoderWeights(state=export_encoder(mae), timm_model=timm_model_name(mae),
                          timm_kwargs=timm_model_kwargs(mae), preset=preset, source=str(path))
