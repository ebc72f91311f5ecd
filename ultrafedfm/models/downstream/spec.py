"""One description of a fine-tuned model (:class:`DownstreamSpec`), and its weights as safetensors.

The spec is everything needed to rebuild the network before loading weights: task, backbone,
classes, image size, the ViT's timm name and kwargs, the probing mode and the pyramid blocks.
A saved model is a folder::

    model.safetensors   the state_dict (the spec is also in the file's metadata)
    model.json          {"spec": ..., "card": ...}
    MODEL_CARD.md       the card for people (data, preset, epochs, metrics with 95% CIs, privacy)

Example::

    model = build_downstream(spec, encoder=weights)
    save_downstream(model, spec, "out/model", card=card)
    model, spec = load_downstream("out/model")
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch.nn as nn

from ultrafedfm.config import check, from_mapping, to_mapping
from ultrafedfm.fileio import atomic_write_bytes, atomic_write_json
from ultrafedfm.models.card import ModelCard, write_card_markdown
from ultrafedfm.models.downstream.encoder import EncoderWeights, create_vit
from ultrafedfm.models.downstream.heads import ViTSegmenter, linear_probe_head, pyramid_blocks
from ultrafedfm.models.downstream.resnet import ResNetSegmenter, resnet18_classifier

_logger = logging.getLogger(__name__)

__all__ = ["DownstreamSpec", "build_downstream", "load_downstream", "save_downstream"]

WEIGHTS_FILE = "model.safetensors"
SPEC_FILE = "model.json"
CARD_FILE = "MODEL_CARD.md"


@dataclass(frozen=True)
class DownstreamSpec:
    """A fine-tuned model's architecture.

    Args:
        task: ``cls`` (image classification) or ``seg`` (binary lesion segmentation).
        arch: ``vit`` (our MAE encoder) or ``resnet18`` (the from-scratch CNN baseline).
        img_size: square input side.
        classes: class names in output order (``cls``); empty for ``seg``.
        mode: ``linear`` (frozen encoder) or ``full`` fine-tuning (``vit`` only; CNNs are full).
        timm_model / timm_kwargs / preset: the ViT encoder (``vit`` only).
        blocks: the four encoder blocks of the segmentation pyramid (``vit`` + ``seg``).
        decoder_channels: U-Net widths, finest first (``seg``).
        drop_path: stochastic depth of the ViT during fine-tuning.
        dp_compatible: built for DP-SGD (``vit`` only): no BatchNorm, only layers with an Opacus
            per-sample rule, the class token and position embedding frozen (``heads``, ``encoder``).
    """

    task: Literal["cls", "seg"]
    arch: Literal["vit", "resnet18"] = "vit"
    img_size: int = 224
    classes: tuple[str, ...] = ()
    mode: Literal["linear", "full"] = "full"
    timm_model: str = ""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    preset: str = ""
    blocks: tuple[int, ...] = ()
    decoder_channels: tuple[int, ...] = (32, 48, 64, 96)
    drop_path: float = 0.1
    dp_compatible: bool = False

    def __post_init__(self) -> None:
        check(self.task in ("cls", "seg"), "task", "must be cls or seg")
        check(self.arch in ("vit", "resnet18"), "arch", "must be vit or resnet18")
        check(self.task != "cls" or len(self.classes) >= 2, "classes", "classification needs at least two classes")
        check(self.arch == "vit" or self.mode == "full", "mode", "linear probing needs a pretrained ViT (arch vit)")
        check(self.arch != "vit" or bool(self.timm_model), "timm_model", "a ViT needs its timm model name")
        check(len(self.decoder_channels) == 4, "decoder_channels", "needs four widths (finest first)")
        check(0.0 <= self.drop_path < 1.0, "drop_path", "must lie in [0, 1)")
        check(self.arch == "vit" or not self.dp_compatible, "dp_compatible",
              "DP-SGD fine-tuning is built for the ViT (arch vit); the ResNet-18 baseline uses BatchNorm")

    @classmethod
    def for_encoder(cls, weights: EncoderWeights, *, task: Literal["cls", "seg"], classes: tuple[str, ...] = (),
                    mode: Literal["linear", "full"] = "full", **kwargs: Any) -> "DownstreamSpec":
        depth = int(weights.timm_kwargs["depth"])
        return cls(task=task, arch="vit", img_size=weights.img_size, classes=classes, mode=mode,
                   timm_model=weights.timm_model, timm_kwargs=dict(weights.timm_kwargs), preset=weights.preset,
                   blocks=pyramid_blocks(depth) if task == "seg" else (),
                   drop_path=0.0 if mode == "linear" else kwargs.pop("drop_path", 0.1), **kwargs)


def build_downstream(spec: DownstreamSpec, *, encoder: EncoderWeights | None = None) -> nn.Module:
    """The network ``spec`` describes; a ViT's encoder is loaded from ``encoder`` when given.

    In ``linear`` mode every encoder parameter is frozen (``requires_grad=False``).
    """
    if spec.arch == "resnet18":
        return resnet18_classifier(len(spec.classes)) if spec.task == "cls" else \
            ResNetSegmenter(decoder_channels=spec.decoder_channels)
    num_classes = len(spec.classes) if spec.task == "cls" else 0
    vit = create_vit(encoder, timm_model=spec.timm_model, timm_kwargs=spec.timm_kwargs, num_classes=num_classes,
                     drop_path=spec.drop_path, dp_compatible=spec.dp_compatible)
    if spec.task == "cls":
        if spec.mode == "linear":
            vit.head = linear_probe_head(vit.embed_dim, num_classes, dp_compatible=spec.dp_compatible)
            for name, param in vit.named_parameters():
                param.requires_grad = name.startswith("head.")
        else:
            nn.init.trunc_normal_(vit.head.weight, std=2e-5)  # MAE fine-tuning: a near-zero head at start
            nn.init.zeros_(vit.head.bias)
        return vit
    model = ViTSegmenter(vit=vit, blocks=spec.blocks, decoder_channels=spec.decoder_channels,
                         dp_compatible=spec.dp_compatible)
    if spec.mode == "linear":
        for param in model.encoder.parameters():
            param.requires_grad = False
    return model


def save_downstream(model: nn.Module, spec: DownstreamSpec, out_dir: str | Path, *,
                    card: ModelCard | None = None) -> Path:
    """Write ``model.safetensors``, ``model.json`` and (with ``card``) ``MODEL_CARD.md`` into ``out_dir``."""
    from safetensors.torch import save as save_safetensors

    out_dir = Path(out_dir)
    spec_map = to_mapping(spec)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_write_bytes(out_dir / WEIGHTS_FILE,
                       save_safetensors(state, metadata={"format": "pt", "spec": json.dumps(spec_map)}), mode=0o644)
    payload: dict[str, Any] = {"spec": spec_map, "weights": WEIGHTS_FILE}
    if card is not None:
        payload["card"] = card.to_mapping()
        write_card_markdown(card, out_dir / CARD_FILE, weights_file=WEIGHTS_FILE)
    atomic_write_json(out_dir / SPEC_FILE, payload)
    return out_dir / WEIGHTS_FILE


def load_downstream(path: str | Path) -> tuple[nn.Module, DownstreamSpec]:
    """A model saved by :func:`save_downstream` (the folder or its ``model.safetensors``), in eval mode."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(path)
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"no fine-tuned model at {path} (expected {WEIGHTS_FILE}); train one with "
                                "`ultrafedfm finetune --out DIR` and pass DIR")
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata() or {}
    if "spec" not in meta:
        raise ValueError(f"{weights} carries no model spec in its metadata; it was not written by ultrafedfm finetune")
    spec = from_mapping(DownstreamSpec, json.loads(meta["spec"]), source=weights)
    model = build_downstream(spec)
    model.load_state_dict(load_file(str(weights)), strict=True)
    return model.eval(), spec

