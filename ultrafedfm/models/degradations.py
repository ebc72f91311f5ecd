"""Ultrasound degradations for the MAE encoder input (after UltraFedFM, Jiang et al. 2025).

UltraFedFM feeds the encoder a degraded copy of each image while the reconstruction loss
targets the clean one, so the encoder learns to see through the artefacts of real scanners:
probe motion (motion blur), defocus (Gaussian blur), dropped or saturated pixels
(salt-and-pepper) and multiplicative speckle. Each degradation hits each image of a batch
independently with its own probability and random strength.

Everything runs batched on the images' device and draws from torch's global RNG, so the
caller controls reproducibility with ``torch.manual_seed``. The randomness lives here and in
the parameter-free top module of the MAE, never in a module that owns parameters (Opacus
recomputes per-sample gradients of parameter-owning modules and needs them deterministic).

Example::

    cfg = DegradationConfig(speckle_p=0.5)
    noisy = apply_degradations(imgs, cfg)   # imgs: (N, 1, H, W) in [0, 1]
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ultrafedfm.config import check

_logger = logging.getLogger(__name__)

__all__ = ["DegradationConfig", "apply_degradations", "gaussian_blur", "motion_blur", "salt_and_pepper", "speckle"]


@dataclass(frozen=True)
class DegradationConfig:
    """Probabilities and strengths of the encoder-input degradations (YAML section ``degradations``).

    Args:
        motion_blur_p: probability that an image gets motion blur.
        motion_blur_max_length: longest blur streak in pixels (odd, >= 3); each image draws an
            odd length in ``[3, max]`` and a direction in ``[0, pi)``.
        gaussian_blur_p: probability of Gaussian blur.
        gaussian_blur_sigma: ``(min, max)`` standard deviation in pixels, drawn uniformly.
        salt_pepper_p: probability of salt-and-pepper noise.
        salt_pepper_amount: largest fraction of pixels set to 0 or 1 (drawn uniformly up to it).
        speckle_p: probability of multiplicative speckle.
        speckle_sigma: largest standard deviation of the multiplicative noise ``1 + sigma * n``.
    """

    motion_blur_p: float = 0.25
    motion_blur_max_length: int = 9
    gaussian_blur_p: float = 0.25
    gaussian_blur_sigma: tuple[float, float] = (0.1, 2.0)
    salt_pepper_p: float = 0.25
    salt_pepper_amount: float = 0.05
    speckle_p: float = 0.25
    speckle_sigma: float = 0.3

    def __post_init__(self) -> None:
        for key in ("motion_blur_p", "gaussian_blur_p", "salt_pepper_p", "speckle_p"):
            value = getattr(self, key)
            check(0.0 <= value <= 1.0, key, f"a probability must lie in [0, 1], got {value}")
        length = self.motion_blur_max_length
        check(length >= 3 and length % 2 == 1, "motion_blur_max_length", f"must be an odd integer >= 3, got {length}")
        lo, hi = self.gaussian_blur_sigma
        check(0.0 < lo <= hi, "gaussian_blur_sigma", f"must be (min, max) with 0 < min <= max, got {(lo, hi)}")
        check(0.0 <= self.salt_pepper_amount <= 0.5, "salt_pepper_amount", "must lie in [0, 0.5]")
        check(0.0 <= self.speckle_sigma <= 2.0, "speckle_sigma", "must lie in [0, 2]")

    @property
    def active(self) -> bool:
        """Whether any degradation can fire."""
        return any(p > 0 for p in (self.motion_blur_p, self.gaussian_blur_p, self.salt_pepper_p, self.speckle_p))


def apply_degradations(imgs: torch.Tensor, config: DegradationConfig) -> torch.Tensor:
    """Degrade a batch, each image and degradation independently with its probability.

    Args:
        imgs: (N, C, H, W) clean images in [0, 1].
        config: probabilities and strengths.

    Returns:
        (N, C, H, W) degraded images in [0, 1] (a new tensor; ``imgs`` is untouched).
    """
    out = imgs
    steps = (
        (config.motion_blur_p, lambda x: motion_blur(x, max_length=config.motion_blur_max_length)),
        (config.gaussian_blur_p, lambda x: gaussian_blur(x, sigma_range=config.gaussian_blur_sigma)),
        (config.speckle_p, lambda x: speckle(x, max_sigma=config.speckle_sigma)),
        (config.salt_pepper_p, lambda x: salt_and_pepper(x, max_amount=config.salt_pepper_amount)),
    )
    for probability, degrade in steps:
        if probability <= 0:
            continue
        hit = torch.rand(imgs.shape[0], 1, 1, 1, device=imgs.device) < probability
        out = torch.where(hit, degrade(out), out)
    return out


def _per_image_conv(imgs: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """Convolve image n with kernel n: imgs (N, C, H, W), kernels (N, k, k) -> (N, C, H, W)."""
    n, c, h, w = imgs.shape
    k = kernels.shape[-1]
    # One group per (image, channel): a single grouped conv applies N different kernels at once.
    weight = kernels.to(imgs.dtype).repeat_interleave(c, dim=0).unsqueeze(1)  # (N*C, 1, k, k)
    padded = F.pad(imgs.reshape(1, n * c, h, w), (k // 2,) * 4, mode="replicate")
    return F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)


def gaussian_blur(imgs: torch.Tensor, *, sigma_range: tuple[float, float]) -> torch.Tensor:
    """Blur each image with its own sigma drawn uniformly from ``sigma_range``; (N, C, H, W) -> same."""
    n = imgs.shape[0]
    lo, hi = sigma_range
    sigma = lo + (hi - lo) * torch.rand(n, device=imgs.device)
    radius = max(1, math.ceil(3 * hi))
    radius = min(radius, (min(imgs.shape[-2:]) - 1) // 2)
    offsets = torch.arange(-radius, radius + 1, device=imgs.device, dtype=torch.float32)
    g = torch.exp(-0.5 * (offsets[None, :] / sigma[:, None]) ** 2)
    g = g / g.sum(dim=1, keepdim=True)
    return _per_image_conv(imgs, g[:, :, None] * g[:, None, :])


def motion_blur(imgs: torch.Tensor, *, max_length: int) -> torch.Tensor:
    """Streak each image along a random direction over a random odd length in [3, max_length]."""
    n = imgs.shape[0]
    size = min(max_length, (min(imgs.shape[-2:]) // 2) * 2 - 1)
    half = size // 2
    device = imgs.device
    max_half = torch.randint(1, half + 1, (n,), device=device).float()  # streak half-length
    angle = torch.rand(n, device=device) * math.pi
    coords = torch.arange(-half, half + 1, device=device, dtype=torch.float32)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    along = xx * cos + yy * sin  # position along the streak
    across = -xx * sin + yy * cos  # distance from the streak's centre line
    # Anti-aliased line: weight falls off linearly within one pixel of the centre line.
    kernel = (1 - across.abs()).clamp_min(0) * (along.abs() <= max_half[:, None, None] + 0.5)
    kernel = kernel / kernel.sum(dim=(1, 2), keepdim=True)
    return _per_image_conv(imgs, kernel)


def salt_and_pepper(imgs: torch.Tensor, *, max_amount: float) -> torch.Tensor:
    """Set a random fraction (up to ``max_amount``) of each image's pixels to 0 or 1, half each."""
    n = imgs.shape[0]
    amount = max_amount * torch.rand(n, 1, 1, 1, device=imgs.device)
    u = torch.rand_like(imgs)
    out = torch.where(u < amount / 2, torch.zeros_like(imgs), imgs)
    return torch.where(u > 1 - amount / 2, torch.ones_like(imgs), out)


def speckle(imgs: torch.Tensor, *, max_sigma: float) -> torch.Tensor:
    """Multiplicative speckle ``x * (1 + sigma * n)``, n ~ N(0, 1), sigma up to ``max_sigma``; clipped to [0, 1]."""
    n = imgs.shape[0]
    sigma = max_sigma * torch.rand(n, 1, 1, 1, device=imgs.device)
    return (imgs * (1 + sigma * torch.randn_like(imgs))).clamp(0.0, 1.0)
