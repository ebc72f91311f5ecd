"""The centralized pretraining arms: MAE on the pooled site caches (all sites, or all but the thyroid sites).

Centralized pretraining pools every site's cache into one dataset and runs the project's
trainer (:func:`ultrafedfm.train.pretrain.train_local`) for the preset's image-epochs, with
checkpoints (a killed run continues). The encoder is exported as safetensors with a model card.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch
from torch.utils.data import ConcatDataset

from ultrafedfm.models.card import ModelCard
from ultrafedfm.models.export import save_encoder
from ultrafedfm.study.presets import StudyPreset

_logger = logging.getLogger(__name__)

__all__ = ["ENCODER_FILE", "encoder_card", "pretrain_config", "run_central_pretraining"]

ENCODER_FILE = "encoder.safetensors"


def pretrain_config(preset: StudyPreset):
    """The MAE trainer's config for ``preset`` (the federated arm uses the same numbers)."""
    from ultrafedfm.train.pretrain import PretrainConfig

    return PretrainConfig(preset=preset.model_preset, img_size=preset.img_size, batch_size=preset.pretrain_batch,
                          base_lr=preset.pretrain_base_lr, warmup_epochs=float(preset.pretrain_warmup),
                          epochs=preset.pretrain_epochs, num_workers=preset.pretrain_num_workers, seed=0,
                          checkpoint_every=200)


def encoder_card(*, title: str, preset: StudyPreset, sites: Mapping[str, int], training: str, rounds: int | None,
                 privacy: str) -> ModelCard:
    return ModelCard(
        title=title, kind="encoder", preset=f"{preset.model_preset} at {preset.img_size} px", training=training,
        rounds=rounds, epochs=float(preset.pretrain_epochs), privacy=privacy,
        data=tuple(f"{name}: {count} images (pixels only; downstream test splits left out)"
                   for name, count in sites.items()),
        notes=("MAE pretraining only; fine-tune before use (see docs/finetuning.md).",
               "Research use; see ../shared/data/README.md for each data set's licence."),
    )


def run_central_pretraining(*, sites: Mapping[str, Path], site_images: Mapping[str, int], preset: StudyPreset,
                            out: Path, title: str, progress: bool = True) -> Path:
    """Pretrain on the pooled ``sites``; returns ``out/encoder.safetensors`` (resumes from ``out/checkpoint``)."""
    from ultrafedfm.data.cache import CacheDataset
    from ultrafedfm.train.pretrain import build_model, train_local

    config = pretrain_config(preset)
    dataset = ConcatDataset([CacheDataset(Path(cache), image_size=preset.img_size) for cache in sites.values()])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)  # initial weights; a resumed run loads its own
        model = build_model(config)
    result = train_local(model=model, dataset=dataset, config=config, device=preset.device,
                         checkpoint_dir=out / "checkpoint", progress=progress)
    _logger.info("%s: %d steps on %d pooled images, mean loss %.4f", title, result.steps, len(dataset),
                 result.mean_loss)
    card = encoder_card(title=title, preset=preset, sites={k: site_images[k] for k in sites},
                        training=f"centralized MAE on the pooled sites, {result.steps} steps, last loss "
                                 f"{result.last_loss:.4f}", rounds=None,
                        privacy="none needed in the study (pooled data); no DP (epsilon = inf)")
    return save_encoder(model.cpu(), out / ENCODER_FILE, card=card)
