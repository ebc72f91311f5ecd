"""Model sizes of the ultrasound MAE: ``tiny`` (tests), ``small`` (ViT-S/16) and ``base`` (the paper, ViT-B/16).

A preset fixes the encoder (matching a timm ``vit_*_patch16_224`` architecture, so the
exported encoder loads into ``timm.create_model``) and the lightweight MAE decoder.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

_logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "MaePreset", "PresetName", "get_preset"]

PresetName = Literal["tiny", "small", "base"]


@dataclass(frozen=True)
class MaePreset:
    """Architecture of one MAE size.

    Args:
        name: preset name.
        timm_name: the timm model whose encoder architecture this matches.
        img_size: input side in pixels (square, one channel).
        patch_size: patch side in pixels.
        embed_dim / depth / num_heads: encoder width, blocks, attention heads.
        decoder_embed_dim / decoder_depth / decoder_num_heads: the MAE decoder.
        mlp_ratio: MLP hidden width / embedding width (encoder and decoder).
    """

    name: str
    timm_name: str
    img_size: int
    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    decoder_embed_dim: int
    decoder_depth: int
    decoder_num_heads: int
    mlp_ratio: float = 4.0


PRESETS: dict[str, MaePreset] = {
    "tiny": MaePreset(
        name="tiny", timm_name="vit_tiny_patch16_224", img_size=32, patch_size=8,
        embed_dim=64, depth=2, num_heads=2, decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=2,
    ),
    "small": MaePreset(
        name="small", timm_name="vit_small_patch16_224", img_size=224, patch_size=16,
        embed_dim=384, depth=12, num_heads=6, decoder_embed_dim=256, decoder_depth=4, decoder_num_heads=8,
    ),
    # He et al. 2022 / UltraFedFM: ViT-B/16 encoder, 512-d x 8-block decoder with 16 heads.
    "base": MaePreset(
        name="base", timm_name="vit_base_patch16_224", img_size=224, patch_size=16,
        embed_dim=768, depth=12, num_heads=12, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16,
    ),
}


def get_preset(name: str, *, img_size: int | None = None) -> MaePreset:
    """The preset ``name``, optionally at another (patch-divisible) image size."""
    if name not in PRESETS:
        raise ValueError(f"unknown MAE preset {name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[name]
    if img_size is None:
        return preset
    if img_size <= 0 or img_size % preset.patch_size:
        raise ValueError(
            f"img_size {img_size} must be a positive multiple of the {name} preset's patch size {preset.patch_size}"
        )
    return replace(preset, img_size=img_size)
