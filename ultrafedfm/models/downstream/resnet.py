"""From-scratch CNN baselines: torchvision ResNet-18 (``weights=None``, nothing downloaded), one channel.

The classifier is torchvision's ResNet-18 with a 1-channel stem. The segmenter feeds the four
residual stages (strides 4, 8, 16, 32) into the same U-Net decoder as the ViT segmenter, so
"above scratch" is measured against a strong convolutional model on the same splits.
"""
from __future__ import annotations

import logging
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ultrafedfm.models.downstream.heads import UNetDecoder

_logger = logging.getLogger(__name__)

__all__ = ["ResNetSegmenter", "resnet18_classifier"]


def _resnet18(num_classes: int) -> nn.Module:
    from torchvision.models import resnet18

    net = resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    return net


def resnet18_classifier(num_classes: int) -> nn.Module:
    """ResNet-18 from random initialisation for (N, 1, S, S) images."""
    return _resnet18(num_classes)


class ResNetSegmenter(nn.Module):
    """ResNet-18 encoder (random init) + U-Net decoder; (N, 1, S, S) -> logits (N, out, S, S)."""

    def __init__(self, *, decoder_channels: Sequence[int] = (32, 48, 64, 96), out_channels: int = 1):
        super().__init__()
        self.encoder = _resnet18(num_classes=1)
        self.encoder.fc = nn.Identity()
        self.decoder = UNetDecoder(in_channels=(64, 128, 256, 512), channels=decoder_channels,
                                   out_channels=out_channels)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        e = self.encoder
        x = e.maxpool(e.relu(e.bn1(e.conv1(imgs))))
        f1 = e.layer1(x)
        f2 = e.layer2(f1)
        f3 = e.layer3(f2)
        f4 = e.layer4(f3)
        logits = self.decoder([f1, f2, f3, f4])
        return F.interpolate(logits, size=imgs.shape[-2:], mode="bilinear", align_corners=False)
