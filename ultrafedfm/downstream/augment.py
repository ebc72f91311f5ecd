"""Fine-tuning augmentation built for cross-institution robustness, and the test-time shifts we measure.

A new hospital brings another scanner: other gain and contrast settings and grey maps, another
resolution (probe frequency, depth, export size), more or less blur and speckle. Training
sees all of these at random (:func:`augment_batch`), and the study measures each at a fixed
strength on the test set (:func:`apply_shift`), reported as the drop from the clean figure.
Geometric changes (flip, zoom, shift, small rotation) move masks with their images.

Batched torch on the images' device; randomness from torch's global RNG (seed it, or run
inside ``torch.random.fork_rng``). Blur and speckle reuse :mod:`ultrafedfm.models.degradations`.

Example::

    imgs, masks = augment_batch(imgs, masks, AugmentConfig())   # imgs (N, 1, S, S) in [0, 1]
    shifted = apply_shift(imgs, "resolution")
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ultrafedfm.config import check
from ultrafedfm.models.degradations import gaussian_blur, speckle

_logger = logging.getLogger(__name__)

__all__ = ["SHIFTS", "AugmentConfig", "Shift", "apply_shift", "augment_batch"]

Shift = Literal["speckle", "blur", "gain_contrast", "resolution"]
SHIFTS: tuple[str, ...] = ("speckle", "blur", "gain_contrast", "resolution")


@dataclass(frozen=True)
class AugmentConfig:
    """Random training augmentation (YAML section ``augment``).

    Args:
        flip_p: horizontal flip probability.
        zoom: (min, max) scale of the crop window; below 1 zooms in.
        shift: largest translation as a fraction of the image side.
        rotate_deg: largest rotation in degrees.
        intensity_p: probability of a gain / contrast / gamma change (each drawn independently).
        gain: (min, max) multiplicative gain. ``contrast``: (min, max) around the image mean.
        gamma: (min, max) grey-map exponent.
        resolution_p / resolution: probability and (min, max) factor of a down-then-up resampling.
        blur_p / blur_sigma: Gaussian blur probability and sigma range, in pixels at 64 px
            (scaled with the image side).
        speckle_p / speckle_sigma: multiplicative speckle probability and largest sigma.
    """

    flip_p: float = 0.5
    zoom: tuple[float, float] = (0.75, 1.0)
    shift: float = 0.08
    rotate_deg: float = 10.0
    intensity_p: float = 0.8
    gain: tuple[float, float] = (0.6, 1.4)
    contrast: tuple[float, float] = (0.6, 1.4)
    gamma: tuple[float, float] = (0.7, 1.5)
    resolution_p: float = 0.3
    resolution: tuple[float, float] = (0.35, 0.8)
    blur_p: float = 0.3
    blur_sigma: tuple[float, float] = (0.1, 1.2)
    speckle_p: float = 0.3
    speckle_sigma: float = 0.3

    def __post_init__(self) -> None:
        for key in ("flip_p", "intensity_p", "resolution_p", "blur_p", "speckle_p"):
            check(0.0 <= getattr(self, key) <= 1.0, key, "a probability must lie in [0, 1]")
        for key in ("zoom", "gain", "contrast", "gamma", "resolution", "blur_sigma"):
            lo, hi = getattr(self, key)
            check(0.0 < lo <= hi, key, f"must be (min, max) with 0 < min <= max, got {(lo, hi)}")
        check(self.zoom[1] <= 1.0 and self.resolution[1] <= 1.0, "zoom", "zoom and resolution factors must be <= 1")
        check(0.0 <= self.shift <= 0.5 and 0.0 <= self.rotate_deg <= 180.0, "shift", "shift in [0, 0.5], rotate_deg in [0, 180]")
        check(0.0 <= self.speckle_sigma <= 2.0, "speckle_sigma", "must lie in [0, 2]")


def _uniform(n: int, bounds: tuple[float, float], device: torch.device) -> torch.Tensor:
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, device=device)


def _geometric(imgs: torch.Tensor, masks: torch.Tensor | None, cfg: AugmentConfig
               ) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, device = imgs.shape[0], imgs.device
    scale = _uniform(n, cfg.zoom, device)
    angle = (torch.rand(n, device=device) * 2 - 1) * math.radians(cfg.rotate_deg)
    flip = torch.where(torch.rand(n, device=device) < cfg.flip_p, -1.0, 1.0)
    tx, ty = [(torch.rand(n, device=device) * 2 - 1) * cfg.shift * 2 for _ in range(2)]
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(imgs.shape), align_corners=False)
    out = F.grid_sample(imgs, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        masks = F.grid_sample(masks, grid, mode="nearest", padding_mode="zeros", align_corners=False)
    return out, masks


def _intensity(imgs: torch.Tensor, gain: torch.Tensor, contrast: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per-image gain, contrast around the mean and grey-map gamma; (N,) parameters."""
    mean = imgs.mean(dim=(1, 2, 3), keepdim=True)
    out = (imgs - mean) * contrast.view(-1, 1, 1, 1) + mean
    out = (out * gain.view(-1, 1, 1, 1)).clamp(0.0, 1.0)
    return out.clamp_min(1e-6) ** gamma.view(-1, 1, 1, 1)


def _resample(imgs: torch.Tensor, factor: float) -> torch.Tensor:
    """Down-sample by ``factor`` (area) and back up (bilinear): a coarser scanner or export."""
    side = imgs.shape[-1]
    small = max(4, round(side * factor))
    down = F.interpolate(imgs, size=(small, small), mode="area")
    return F.interpolate(down, size=imgs.shape[-2:], mode="bilinear", align_corners=False)


def augment_batch(imgs: torch.Tensor, masks: torch.Tensor | None, cfg: AugmentConfig
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch: imgs (N, 1, S, S) in [0, 1], masks (N, 1, S, S) in {0, 1} or ``None``."""
    n, device = imgs.shape[0], imgs.device
    out, masks = _geometric(imgs, masks, cfg)

    def hit(p: float) -> torch.Tensor:
        return (torch.rand(n, 1, 1, 1, device=device) < p)

    if cfg.intensity_p > 0:
        changed = _intensity(out, _uniform(n, cfg.gain, device), _uniform(n, cfg.contrast, device),
                             _uniform(n, cfg.gamma, device))
        out = torch.where(hit(cfg.intensity_p), changed, out)
    if cfg.resolution_p > 0:
        factor = float(_uniform(1, cfg.resolution, device))  # one factor per batch: one resize call
        out = torch.where(hit(cfg.resolution_p), _resample(out, factor), out)
    if cfg.blur_p > 0:
        scale = imgs.shape[-1] / 64.0
        sigma = (cfg.blur_sigma[0] * scale, cfg.blur_sigma[1] * scale)
        out = torch.where(hit(cfg.blur_p), gaussian_blur(out, sigma_range=sigma), out)
    if cfg.speckle_p > 0:
        out = torch.where(hit(cfg.speckle_p), speckle(out, max_sigma=cfg.speckle_sigma), out)
    return out.clamp(0.0, 1.0), masks


def apply_shift(imgs: torch.Tensor, kind: Shift, *, seed: int = 0) -> torch.Tensor:
    """One test-time shift at a fixed strength (the same for every model), imgs (N, 1, S, S) in [0, 1].

    - ``speckle``: ``x * (1 + 0.3 n)``, n ~ N(0, 1) (seeded);
    - ``blur``: Gaussian blur, sigma = 1.5 % of the image side (1 px at 64, 3.4 px at 224);
    - ``gain_contrast``: contrast x0.6 around the mean, gain x0.7, gamma 1.3 (a darker, flatter scanner);
    - ``resolution``: area down-sampling to half the side and bilinear back up.
    """
    n = imgs.shape[0]
    if kind == "speckle":
        generator = torch.Generator(device=imgs.device).manual_seed(seed)
        noise = torch.randn(imgs.shape, generator=generator, device=imgs.device, dtype=imgs.dtype)
        return (imgs * (1 + 0.3 * noise)).clamp(0.0, 1.0)
    if kind == "blur":
        sigma = 0.015 * imgs.shape[-1]
        return gaussian_blur(imgs, sigma_range=(sigma, sigma))
    if kind == "gain_contrast":
        full = lambda v: torch.full((n,), v, device=imgs.device)  # noqa: E731
        return _intensity(imgs, full(0.7), full(0.6), full(1.3))
    if kind == "resolution":
        return _resample(imgs, 0.5).clamp(0.0, 1.0)
    raise ValueError(f"unknown shift {kind!r}; choose one of {', '.join(SHIFTS)}")
