"""Downstream heads on the MAE's ViT encoder: classification and a pyramid U-Net for segmentation.

Classification (He et al. 2022, MAE): average-pooled patch tokens into a linear head.
``linear`` probing freezes the encoder and puts a parameter-free BatchNorm before the linear
layer (MAE's linear-probe head); ``full`` fine-tuning trains everything (layer-wise learning
rate decay lives in the trainer).

Segmentation (UltraFedFM, after BEiT/UPerNet-style ViT adapters): the token maps of four encoder
blocks -- [3, 5, 7, 11] for the 12-block ViT-B, spread evenly over shallower presets (block
indices may repeat for a 2-block encoder) -- are resampled to four scales (x4, x2, x1, x0.5
of the patch grid) and fused coarse-to-fine by a light U-Net decoder.

``dp_compatible`` builds the same heads for DP-SGD: no operation that mixes images of a batch
(BatchNorm becomes GroupNorm in the decoder and the pyramid, and the probe's feature whitening a
per-image LayerNorm), and every learned layer one Opacus has a per-sample rule for (a 2x2,
stride-2 transposed convolution becomes a 1x1 convolution into 4x the channels and a pixel
shuffle, which computes every map such a transposed convolution can).

Example::

    seg = ViTSegmenter(vit=create_vit(weights, ..., num_classes=0), blocks=pyramid_blocks(12))
    logits = seg(imgs)          # (N, 1, S, S)
"""
from __future__ import annotations

import logging
from typing import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

__all__ = ["PixelShuffle2x", "UNetDecoder", "ViTSegmenter", "linear_probe_head", "pyramid_blocks"]

_PAPER_BLOCKS_12 = (3, 5, 7, 11)


def pyramid_blocks(depth: int) -> tuple[int, int, int, int]:
    """Four encoder block indices (0-based) for the feature pyramid: the paper's [3, 5, 7, 11] at depth 12,
    else spread evenly up to the last block (depth 2: [0, 0, 1, 1])."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if depth == 12:
        return _PAPER_BLOCKS_12
    spread = np.rint(np.linspace(0, depth - 1, 4)).astype(int)
    return tuple(int(i) for i in spread)  # type: ignore[return-value]


def linear_probe_head(dim: int, num_classes: int, *, dp_compatible: bool = False) -> nn.Module:
    """MAE's linear-probe head: BatchNorm without affine parameters (feature whitening), then Linear.

    ``dp_compatible``: a per-image LayerNorm without parameters in place of the batch statistics.
    """
    whiten = (nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False) if dp_compatible
              else nn.BatchNorm1d(dim, affine=False, eps=1e-6))
    return nn.Sequential(whiten, nn.Linear(dim, num_classes))


def _norm2d(channels: int, dp_compatible: bool) -> nn.Module:
    if not dp_compatible:
        return nn.BatchNorm2d(channels)
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class PixelShuffle2x(nn.Module):
    """``nn.PixelShuffle(2)`` as views with every size given: torch's own fails backward on an empty batch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c4, h, w = x.shape
        c = c4 // 4
        return x.reshape(n, c, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(n, c, 2 * h, 2 * w)


def _upsample2x(cin: int, cout: int, dp_compatible: bool) -> nn.Module:
    """A learned 2x upsampling: ConvTranspose2d(k=2, s=2), or for DP-SGD a 1x1 conv + pixel shuffle (same maps)."""
    if not dp_compatible:
        return nn.ConvTranspose2d(cin, cout, 2, stride=2)
    return nn.Sequential(nn.Conv2d(cin, 4 * cout, 1), PixelShuffle2x())


def _conv_block(cin: int, cout: int, dp_compatible: bool = False) -> nn.Sequential:
    inplace = not dp_compatible  # Opacus' backward hooks forbid modifying a hooked module's output in place
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), _norm2d(cout, dp_compatible), nn.ReLU(inplace=inplace),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), _norm2d(cout, dp_compatible), nn.ReLU(inplace=inplace),
    )


class UNetDecoder(nn.Module):
    """Fuse four feature maps coarse-to-fine; returns logits at the finest map's resolution.

    Args:
        in_channels: channels of the four maps, finest first.
        channels: decoder widths per level, finest first.
        out_channels: output logits (1 for a binary mask).
        dp_compatible: GroupNorm in place of BatchNorm (DP-SGD).
    """

    def __init__(self, *, in_channels: Sequence[int], channels: Sequence[int], out_channels: int = 1,
                 dp_compatible: bool = False):
        super().__init__()
        if len(in_channels) != 4 or len(channels) != 4:
            raise ValueError("UNetDecoder takes exactly four levels")
        self.lateral = nn.ModuleList(nn.Conv2d(c, d, 1) for c, d in zip(in_channels, channels))
        self.fuse = nn.ModuleList(_conv_block(channels[i] + channels[i + 1], channels[i], dp_compatible)
                                  for i in range(3))
        self.head = nn.Conv2d(channels[0], out_channels, 1)

    def forward(self, features: Sequence[torch.Tensor]) -> torch.Tensor:
        """features: four (N, C_i, H_i, W_i), finest first -> (N, out, H_0, W_0)."""
        x = self.lateral[3](features[3])
        for i in (2, 1, 0):
            skip = self.lateral[i](features[i])
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self.fuse[i](torch.cat([skip, x], dim=1))
        return self.head(x)


class ViTSegmenter(nn.Module):
    """A timm ViT encoder, a four-scale feature pyramid and a U-Net decoder.

    Args:
        vit: timm ``VisionTransformer`` (its head is unused).
        blocks: four block indices whose outputs feed the pyramid (see :func:`pyramid_blocks`).
        decoder_channels: U-Net widths, finest first.
        out_channels: logits per pixel (1: binary lesion mask).
        dp_compatible: heads built for DP-SGD (module docstring).
    """

    def __init__(self, *, vit: nn.Module, blocks: Sequence[int], decoder_channels: Sequence[int] = (32, 48, 64, 96),
                 out_channels: int = 1, dp_compatible: bool = False):
        super().__init__()
        if len(blocks) != 4:
            raise ValueError(f"the pyramid needs four block indices, got {list(blocks)}")
        depth = len(vit.blocks)
        if not all(0 <= b < depth for b in blocks):
            raise ValueError(f"block indices {list(blocks)} out of range for a {depth}-block encoder")
        self.encoder = vit
        self.blocks = tuple(int(b) for b in blocks)
        dim = vit.embed_dim
        half = max(dim // 2, 16)
        # x4, x2, x1 and x0.5 of the patch grid (BEiT's fpn1..fpn4).
        self.pyramid = nn.ModuleList([
            nn.Sequential(_upsample2x(dim, half, dp_compatible), _norm2d(half, dp_compatible), nn.GELU(),
                          _upsample2x(half, half, dp_compatible)),
            _upsample2x(dim, dim, dp_compatible),
            nn.Identity(),
            nn.MaxPool2d(2, ceil_mode=True),
        ])
        self.decoder = UNetDecoder(in_channels=(half, dim, dim, dim), channels=decoder_channels,
                                   out_channels=out_channels, dp_compatible=dp_compatible)
        if dp_compatible:  # the pyramid reads blocks before the final norm; Opacus needs a gradient for every
            for param in vit.norm.parameters():  # trainable parameter, so the unused norm is frozen
                param.requires_grad = False

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs (N, 1, S, S) -> logits (N, out, S, S)."""
        wanted = sorted(set(self.blocks))
        tokens = self.encoder.forward_intermediates(imgs, indices=wanted, intermediates_only=True, output_fmt="NLC")
        # Reshaped here with every size given: timm's NCHW reshape infers one and fails on an empty batch
        # (DP-SGD's Poisson sampling draws those).
        grid_h, grid_w = self.encoder.patch_embed.dynamic_feat_size(tuple(imgs.shape[-2:]))
        maps = [t.reshape(t.shape[0], grid_h, grid_w, t.shape[-1]).permute(0, 3, 1, 2).contiguous() for t in tokens]
        by_block = dict(zip(wanted, maps))
        features = [level(by_block[b]) for level, b in zip(self.pyramid, self.blocks)]
        logits = self.decoder(features)
        return F.interpolate(logits, size=imgs.shape[-2:], mode="bilinear", align_corners=False)
