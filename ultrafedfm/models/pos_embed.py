"""Fixed 2-D sine-cosine position embeddings (MAE, He et al. 2022; after Vaswani et al. 2017).

Half of the channels encode the patch row, half the patch column; each half is a bank of
sines and cosines at geometrically spaced frequencies. The embeddings are not learned, so the
model registers them as buffers: they never appear in an optimizer or in a federated delta.
"""
from __future__ import annotations

import logging

import torch

_logger = logging.getLogger(__name__)

__all__ = ["sincos_pos_embed_1d", "sincos_pos_embed_2d"]


def sincos_pos_embed_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """Sine-cosine embedding of 1-D ``positions``.

    Args:
        dim: output channels (even).
        positions: (M,) float positions.

    Returns:
        (M, dim): ``[sin(pos * w_k) ..., cos(pos * w_k) ...]`` with ``w_k = 10000^(-2k/dim)``.
    """
    if dim % 2:
        raise ValueError(f"sine-cosine embedding needs an even dimension, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    angles = positions.to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sincos_pos_embed_2d(dim: int, grid_size: int, *, cls_token: bool = True) -> torch.Tensor:
    """2-D sine-cosine embedding of a ``grid_size`` x ``grid_size`` patch grid.

    Args:
        dim: embedding width (a multiple of 4: sin and cos for each of two axes).
        grid_size: patches per side.
        cls_token: prepend an all-zero row for the class token (timm's ``pos_embed`` layout).

    Returns:
        (1, [1 +] grid_size**2, dim) float32, patches in row-major order.
    """
    if dim % 4:
        raise ValueError(f"2-D sine-cosine embedding needs a width divisible by 4, got {dim}")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    # Column (x) half first, then row (y) half, as the MAE reference orders them.
    emb = torch.cat(
        [sincos_pos_embed_1d(dim // 2, cols.reshape(-1)), sincos_pos_embed_1d(dim // 2, rows.reshape(-1))], dim=1
    )
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=emb.dtype), emb], dim=0)
    return emb.to(torch.float32).unsqueeze(0)
