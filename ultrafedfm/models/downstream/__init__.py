"""Downstream models on the MAE encoder: encoders from files, classification and segmentation heads,
from-scratch CNN baselines, and the safetensors format of fine-tuned models."""
from __future__ import annotations

import logging

from ultrafedfm.models.downstream.encoder import EncoderWeights, create_vit, load_encoder, scratch_encoder
from ultrafedfm.models.downstream.heads import UNetDecoder, ViTSegmenter, linear_probe_head, pyramid_blocks
from ultrafedfm.models.downstream.resnet import ResNetSegmenter, resnet18_classifier
from ultrafedfm.models.downstream.spec import DownstreamSpec, build_downstream, load_downstream, save_downstream

_logger = logging.getLogger(__name__)

__all__ = [
    "DownstreamSpec", "EncoderWeights", "ResNetSegmenter", "UNetDecoder", "ViTSegmenter", "build_downstream",
    "create_vit", "linear_probe_head", "load_downstream", "load_encoder", "pyramid_blocks", "resnet18_classifier",
    "save_downstream", "scratch_encoder",
]
