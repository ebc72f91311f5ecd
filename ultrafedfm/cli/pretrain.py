"""``ultrafedfm pretrain``: centralized MAE pretraining on one site cache.

    ultrafedfm pretrain --cache site-cache --out runs/central --preset tiny --epochs 5
    ultrafedfm pretrain --cache site-cache --out runs/central --config pretrain.yaml

Writes ``OUT/checkpoint/checkpoint.pt`` (continued when the command is re-run with the same
``--out``), ``OUT/encoder.safetensors`` + ``OUT/encoder.json`` (the encoder for ``timm.create_model``)
and ``OUT/pretrain.yaml`` (the configuration used).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

import torch
import yaml

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="pretrain the MAE centrally on one site cache (resumes when re-run)",
        description="Centralized MAE pretraining on a site cache built by `ultrafedfm ingest`. Re-running with "
        "the same --out continues from the last checkpoint.",
    )
    parser.add_argument("--cache", type=Path, required=True, help="site cache folder (from `ultrafedfm ingest`)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: checkpoint, encoder, config")
    parser.add_argument("--config", type=Path, help="YAML file with a `pretrain:` section (PretrainConfig)")
    parser.add_argument("--preset", choices=["tiny", "small", "base"], help="model size (overrides the config)")
    parser.add_argument("--epochs", type=int, help="epochs (overrides the config)")
    parser.add_argument("--batch-size", type=int, help="images per step (overrides the config)")
    parser.add_argument("--device", help="torch device, e.g. cpu or cuda:0 (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultrafedfm.config import load_config, to_mapping
    from ultrafedfm.data.cache import CacheDataset, CacheNotFoundError
    from ultrafedfm.models.export import save_encoder
    from ultrafedfm.train.pretrain import PretrainConfig, build_model, train_local

    config = load_config(PretrainConfig, args.config, section="pretrain") if args.config else PretrainConfig()
    overrides = {k: v for k, v in
                 {"preset": args.preset, "epochs": args.epochs, "batch_size": args.batch_size}.items() if v is not None}
    if overrides:
        config = dataclasses.replace(config, **overrides)  # re-validates
    try:
        dataset = CacheDataset(args.cache, image_size=config.img_size or _preset_size(config.preset))
    except CacheNotFoundError as exc:
        _logger.error("%s", exc)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pretrain.yaml").write_text(yaml.safe_dump({"pretrain": to_mapping(config)}, sort_keys=False),
                                       encoding="utf-8")
    torch.manual_seed(config.seed)  # initial weights; a resumed run loads its own
    model = build_model(config)
    result = train_local(model=model, dataset=dataset, config=config, device=args.device,
                         checkpoint_dir=out / "checkpoint", progress=not args.no_progress)
    save_encoder(model, out / "encoder.safetensors")
    _logger.info("trained %d steps on %d images (mean loss %.4f); encoder in %s",
                 result.steps, result.num_samples, result.mean_loss, out / "encoder.safetensors")
    return 0


def _preset_size(preset: str) -> int:
    from ultrafedfm.models.presets import PRESETS

    return PRESETS[preset].img_size
