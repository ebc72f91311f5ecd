"""Masked autoencoder (MAE, He et al. 2022) around timm's ``VisionTransformer``, for 1-channel ultrasound.

The encoder is a timm ViT (patch embedding, blocks, final norm) that sees only the ~25 %
visible patches; a light decoder fills in mask tokens and regresses the pixels of the masked
patches. As in UltraFedFM (Jiang et al. 2025) the encoder may see a degraded image (blur,
salt-and-pepper, speckle) while the loss targets the clean one.

Built for Opacus (DP-SGD) by construction: the top module :class:`MaskedAutoencoder` owns no
parameters and holds all the randomness (masking noise, degradations); every module that owns
parameters (timm layers, :class:`ClassToken`, :class:`MaskTokens`) is a deterministic function
of its single input, so per-sample gradients can be recomputed from captured activations.
Position embeddings are fixed 2-D sine-cosine buffers, outside ``state_dict`` (they never change
and never travel in a federated update).

Example::

    mae = build_mae("tiny")
    loss, pred, mask = mae(imgs)          # imgs: (N, 1, 32, 32) in [0, 1]
    loss.backward()
"""
from __future__ import annotations

import logging
from functools import partial
from typing import Literal

import torch
import torch.nn as nn
from timm.models.vision_transformer import Block, VisionTransformer

from ultrafedfm.models.degradations import DegradationConfig, apply_degradations
from ultrafedfm.models.pos_embed import sincos_pos_embed_2d
from ultrafedfm.models.presets import MaePreset, PresetName, get_preset

_logger = logging.getLogger(__name__)

__all__ = ["ClassToken", "LossReduction", "MaeDecoder", "MaskTokens", "MaskedAutoencoder", "build_mae"]

LossReduction = Literal["mean", "none"]

# timm's ViT uses LayerNorm(eps=1e-6); plain nn.LayerNorm keeps Opacus on its fast grad sampler.
_norm_layer = partial(nn.LayerNorm, eps=1e-6)


class ClassToken(nn.Module):
    """A learned class token prepended to a token sequence: (N, L, D) -> (N, 1 + L, D)."""

    def __init__(self, dim: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.token.expand(x.shape[0], -1, -1), x], dim=1)


class MaskTokens(nn.Module):
    """Appends learned mask tokens up to ``1 + num_patches`` tokens: (N, 1 + L_keep, D) -> (N, 1 + L, D)."""

    def __init__(self, dim: int, num_patches: int):
        super().__init__()
        self.num_patches = num_patches
        self.token = nn.Parameter(torch.zeros(1, 1, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_masked = self.num_patches + 1 - x.shape[1]
        return torch.cat([x, self.token.expand(x.shape[0], num_masked, -1)], dim=1)


class MaeDecoder(nn.Module):
    """MAE decoder: embeds the visible latent, restores patch order with mask tokens, predicts pixels.

    Owns no parameters itself (only submodules) and no randomness.
    """

    def __init__(self, *, preset: MaePreset, in_chans: int):
        super().__init__()
        grid = preset.img_size // preset.patch_size
        dim = preset.decoder_embed_dim
        self.embed = nn.Linear(preset.embed_dim, dim)
        self.mask_token = MaskTokens(dim, grid * grid)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(dim, grid, cls_token=True), persistent=False)
        self.blocks = nn.Sequential(*[
            Block(dim, preset.decoder_num_heads, mlp_ratio=preset.mlp_ratio, qkv_bias=True, norm_layer=_norm_layer)
            for _ in range(preset.decoder_depth)
        ])
        self.norm = _norm_layer(dim)
        self.pred = nn.Linear(dim, preset.patch_size**2 * in_chans)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent: (N, 1 + L_keep, D), ids_restore: (N, L) -> pixel predictions (N, L, p*p*C)."""
        x = self.mask_token(self.embed(latent))  # (N, 1 + L, Dd), patches still in shuffled order
        index = ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2])
        patches = torch.gather(x[:, 1:], dim=1, index=index)  # unshuffle
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.pred(x)[:, 1:]  # drop the class token


class MaskedAutoencoder(nn.Module):
    """ViT masked autoencoder with a timm encoder (``self.encoder``) and a light decoder.

    Args:
        preset: architecture (see :mod:`ultrafedfm.models.presets`).
        mask_ratio: fraction of patches hidden from the encoder (default for ``forward``).
        norm_pix_loss: regress per-patch normalised pixels (mean 0, variance 1), as MAE does.
        degradations: encoder-input degradations applied in training mode; ``None`` for none.
    """

    def __init__(
        self,
        *,
        preset: MaePreset,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        degradations: DegradationConfig | None = None,
    ):
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must lie in [0, 1), got {mask_ratio}")
        self.preset = preset
        self.in_chans = 1
        self.patch_size = preset.patch_size
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.degradations = degradations
        # timm ViT without its own class token and learned pos_embed: those would be raw
        # parameters on the ViT module itself; here the token is a ClassToken and the
        # position embedding a fixed buffer.
        self.encoder = VisionTransformer(
            img_size=preset.img_size, patch_size=preset.patch_size, in_chans=self.in_chans, num_classes=0,
            global_pool="", class_token=False, pos_embed="none", embed_dim=preset.embed_dim, depth=preset.depth,
            num_heads=preset.num_heads, mlp_ratio=preset.mlp_ratio, qkv_bias=True, norm_layer=_norm_layer,
            weight_init="skip",
        )
        self.num_patches = self.encoder.patch_embed.num_patches
        grid = preset.img_size // preset.patch_size
        self.cls_token = ClassToken(preset.embed_dim)
        self.register_buffer("pos_embed", sincos_pos_embed_2d(preset.embed_dim, grid, cls_token=True), persistent=False)
        self.decoder = MaeDecoder(preset=preset, in_chans=self.in_chans)
        self._init_weights()

    def _init_weights(self) -> None:
        # MAE's initialisation: the patch projection like a Linear, xavier Linears, small tokens.
        proj = self.encoder.patch_embed.proj.weight
        nn.init.xavier_uniform_(proj.data.view(proj.shape[0], -1))
        nn.init.normal_(self.cls_token.token, std=0.02)
        nn.init.normal_(self.decoder.mask_token.token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides biases and norms (the learned tokens)."""
        return {"cls_token.token", "decoder.mask_token.token"}

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: (N, C, H, W) -> patches (N, L, p*p*C), row-major patch order."""
        p = self.patch_size
        n, c, h, w = imgs.shape
        x = imgs.reshape(n, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(n, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """patches (N, L, p*p*C) -> imgs (N, C, H, W) (square images)."""
        p, c = self.patch_size, self.in_chans
        n, num, _ = x.shape
        side = int(round(num**0.5))
        x = x.reshape(n, side, side, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(n, c, side * p, side * p)

    def random_masking(
        self, x: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keep a random subset of tokens per sample.

        Args:
            x: (N, L, D) patch tokens.

        Returns:
            kept tokens (N, L_keep, D); mask (N, L) with 0 = kept, 1 = removed; ids_restore (N, L).
        """
        n, length, dim = x.shape
        len_keep = int(length * (1 - mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        # Sorting the noise shuffles each row: the first len_keep indices are kept, the rest
        # removed, and argsort of the shuffle is the permutation that undoes it.
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        kept = torch.gather(x, dim=1, index=ids_keep.unsqueeze(-1).expand(-1, -1, dim))
        mask = torch.ones(n, length, device=x.device)
        mask[:, :len_keep] = 0
        mask = torch.gather(mask, dim=1, index=ids_restore)
        return kept, mask, ids_restore

    def _encode_tokens(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder.norm_pre(self.cls_token(x))
        return self.encoder.norm(self.encoder.blocks(x))

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        """Unmasked encoder features, as timm's ``forward_features``: (N, 1, H, W) -> (N, 1 + L, D)."""
        x = self.encoder.patch_embed(imgs) + self.pos_embed[:, 1:]
        return self._encode_tokens(x)

    def forward_encoder(
        self, imgs: torch.Tensor, mask_ratio: float
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (N, 1, H, W) -> latent (N, 1 + L_keep, D), mask (N, L), ids_restore (N, L)."""
        x = self.encoder.patch_embed(imgs) + self.pos_embed[:, 1:]
        x, mask, ids_restore = self.random_masking(x, mask_ratio)
        # The class slot of pos_embed is zero (timm layout), so the token needs no position term.
        return self._encode_tokens(x), mask, ids_restore

    def forward_decoder(self, latent: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """latent (N, 1 + L_keep, D), ids_restore (N, L) -> predicted patches (N, L, p*p*C)."""
        return self.decoder(latent, ids_restore)

    def forward_loss(
        self, target: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, *, reduction: LossReduction = "mean"
    ) -> torch.Tensor:
        """Mean squared error on the masked patches only.

        Args:
            target: (N, 1, H, W) clean images.
            pred: (N, L, p*p*C) predictions.
            mask: (N, L), 1 = masked (scored), 0 = visible.
            reduction: "mean" for the batch loss, "none" for one loss per image (DP-SGD clips
                each image's gradient, so it needs each image's loss).

        Returns:
            "mean": scalar float32 loss (0 when no patch is masked); "none": (N,) float32, each
            image's mean over its own masked patches. Every image masks the same number of
            patches, so the mean of the "none" losses equals the "mean" loss.
        """
        if reduction not in ("mean", "none"):
            raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
        target = self.patchify(target).float()
        if self.norm_pix_loss and target.shape[0] > 0:  # an empty (DP Poisson) batch has nothing to normalise
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        per_patch = ((pred.float() - target) ** 2).mean(dim=-1)  # (N, L)
        if reduction == "none":
            return (per_patch * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1.0)
        return (per_patch * mask).sum() / mask.sum().clamp_min(1.0)

    def forward(
        self, imgs: torch.Tensor, *, mask_ratio: float | None = None, reduction: LossReduction = "mean"
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: (N, 1, H, W) in [0, 1] -> (loss, pred (N, L, p*p*C), mask (N, L)).

        In training mode the encoder sees degraded images (when configured); the loss always
        targets the clean ``imgs``. ``reduction="none"`` gives one loss per image, shape (N,).
        """
        ratio = self.mask_ratio if mask_ratio is None else mask_ratio
        encoder_input = imgs
        # An empty batch (DP-SGD's Poisson sampling) has nothing to degrade; the blur kernels need >= 1 image.
        if self.training and self.degradations is not None and self.degradations.active and imgs.shape[0] > 0:
            encoder_input = apply_degradations(imgs, self.degradations)
        latent, mask, ids_restore = self.forward_encoder(encoder_input, ratio)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask, reduction=reduction)
        return loss, pred, mask


def build_mae(
    preset: PresetName,
    *,
    img_size: int | None = None,
    mask_ratio: float = 0.75,
    norm_pix_loss: bool = True,
    degradations: DegradationConfig | None = None,
) -> MaskedAutoencoder:
    """Build an MAE of size ``preset`` ("tiny", "small" or "base"), optionally at another image size.

    Seed torch (``torch.manual_seed``) beforehand for reproducible initial weights.
    """
    return MaskedAutoencoder(
        preset=get_preset(preset, img_size=img_size),
        mask_ratio=mask_ratio,
        norm_pix_loss=norm_pix_loss,
        degradations=degradations,
    )
