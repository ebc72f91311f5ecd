"""``ultrafedfm finetune``: fine-tune the encoder (or a baseline) on a labelled folder or cache.

    ultrafedfm finetune --data ../shared/data/busi --task cls --encoder runs/x/encoder.safetensors --out ft/busi
    ultrafedfm finetune --data ../shared/data/ddti --task seg --scratch --preset tiny --img-size 64 --out ft/ddti
    ultrafedfm finetune --cache site-cache --task cls --encoder enc.safetensors --mode linear --label-fraction 0.1

The data are split train/val/test by ``group`` (near-duplicate groups when the folder has no
such column), stratified by label, from ``--split-seed``; the model kept is the best on
validation; the test split is scored once. Writes ``OUT/model.safetensors`` + ``model.json`` +
``MODEL_CARD.md``, ``OUT/metrics.json`` and ``OUT/split.json``. Rerunning with the same
``--out`` continues an interrupted run.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a classifier or segmenter on a labelled folder or cache",
        description="Fine-tune on an image folder with labels.csv (file,label,mask,width,height[,group]) or a site "
        "cache: grouped stratified train/val/test split, selection on validation, test metrics with 95% intervals.")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="image folder with labels.csv")
    source.add_argument("--cache", type=Path, help="site cache with labels or masks (ultrafedfm ingest --images)")
    parser.add_argument("--task", choices=["cls", "seg"], required=True, help="classification or segmentation")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    start = parser.add_mutually_exclusive_group(required=True)
    start.add_argument("--encoder", type=Path, help="encoder.safetensors / encoder.pth / final_model.pt to start from")
    start.add_argument("--scratch", action="store_true", help="a randomly initialised ViT (--preset, --img-size)")
    start.add_argument("--resnet18", action="store_true", help="the ResNet-18 from-scratch baseline")
    parser.add_argument("--mode", choices=["linear", "full"], default="full",
                        help="linear probe (frozen encoder) or full fine-tuning with layer decay (default full)")
    parser.add_argument("--preset", choices=["tiny", "small", "base"], default="base", help="ViT size for --scratch")
    parser.add_argument("--img-size", type=int, help="image side for --scratch / --resnet18 (default: the preset's)")
    parser.add_argument("--label-fraction", type=float, default=1.0, help="share of training labels used (0, 1]")
    parser.add_argument("--seed", type=int, default=0, help="label subset, initialisation, data order")
    parser.add_argument("--split-seed", type=int, default=0, help="the train/val/test split")
    parser.add_argument("--config", type=Path, help="YAML with a `finetune:` section (FinetuneConfig)")
    parser.add_argument("--epochs", type=int, help="epochs (overrides the config)")
    parser.add_argument("--min-steps", type=int, help="at least this many steps, whatever the epochs (overrides the config)")
    parser.add_argument("--batch-size", type=int, help="images per step (overrides the config)")
    parser.add_argument("--base-lr", type=float, help="learning rate per 256 images (overrides the config)")
    parser.add_argument("--positive", help="positive class of the binary AUROC when two classes are evaluated")
    parser.add_argument("--device", help="torch device (default: cuda when available)")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ultrafedfm.config import load_config, to_mapping
    from ultrafedfm.data.labelled import LabelledDataError
    from ultrafedfm.downstream.experiment import run_finetune
    from ultrafedfm.downstream.splits import grouped_split
    from ultrafedfm.fileio import atomic_write_json
    from ultrafedfm.models.downstream import save_downstream
    from ultrafedfm.train.finetune import FinetuneConfig

    if not 0 < args.label_fraction <= 1:
        _logger.error("--label-fraction must lie in (0, 1], got %s", args.label_fraction)
        return 2
    config = load_config(FinetuneConfig, args.config, section="finetune") if args.config else FinetuneConfig()
    overrides = {k: v for k, v in {"epochs": args.epochs, "batch_size": args.batch_size, "base_lr": args.base_lr,
                                   "min_steps": args.min_steps, "task": args.task}.items() if v is not None}
    config = dataclasses.replace(config, **overrides)
    progress = not args.no_progress
    try:
        encoder, data = _encoder_and_data(args, progress=progress)
    except (LabelledDataError, FileNotFoundError, ValueError) as exc:
        _logger.error("%s", exc)
        return 2
    labels = data.labels.numpy() if (args.task == "cls" and data.classes) else None
    split = grouped_split(data.groups, labels, seed=args.split_seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "split.json", {"seed": args.split_seed, "groups_derived": data.groups_derived,
                                           **split.to_mapping()})
    run_ = run_finetune(data, split, task=args.task, config=config, encoder=encoder,
                        arch="resnet18" if args.resnet18 else "vit", mode="full" if args.resnet18 else args.mode,
                        label_fraction=args.label_fraction, seed=args.seed, device=args.device,
                        checkpoint_dir=out / "checkpoint", progress=progress)
    test = run_.test
    if args.positive and args.task == "cls":
        from ultrafedfm.downstream.evaluate import evaluate_split

        test = evaluate_split(run_.model, data.view(run_.split.test, task="cls"), classes=run_.spec.classes,
                              positive=args.positive, device=args.device)
    save_downstream(run_.model, run_.spec, out, card=_model_card(args, data=data, run_=run_, test=test, encoder=encoder))
    atomic_write_json(out / "metrics.json", {"test": test.to_mapping(), "val": {run_.fit.metric_name: run_.fit.best_metric},
                                             "history": run_.fit.history, "config": to_mapping(config),
                                             "train_size": run_.train_size})
    headline = "auroc_macro" if args.task == "cls" else "dice"
    lo, hi = test.intervals.get(headline, (float("nan"), float("nan")))
    print(f"test {headline}: {test.metrics[headline]:.3f} (95% CI {lo:.3f}-{hi:.3f}), n={len(run_.split.test)}")
    print(f"model: {out / 'model.safetensors'} (card: {out / 'MODEL_CARD.md'}); metrics: {out / 'metrics.json'}")
    return 0


def _encoder_and_data(args: argparse.Namespace, *, progress: bool):
    """The encoder (``None`` for the ResNet-18) and the labelled images at its input size."""
    from ultrafedfm.data.labelled import load_labelled_cache, load_labelled_folder
    from ultrafedfm.models.downstream import load_encoder, scratch_encoder
    from ultrafedfm.models.presets import get_preset

    encoder = None
    if args.encoder:
        encoder = load_encoder(args.encoder)
        size = encoder.img_size
    elif args.scratch:
        size = args.img_size or get_preset(args.preset).img_size
        encoder = scratch_encoder(args.preset, img_size=size, seed=args.seed)
    else:
        size = args.img_size or 224
    require = "label" if args.task == "cls" else "mask"
    data = (load_labelled_folder(args.data, image_size=size, require=require, progress=progress) if args.data
            else load_labelled_cache(args.cache, image_size=size, require=require, progress=progress))
    return encoder, data


def _model_card(args: argparse.Namespace, *, data, run_, test, encoder):
    """The fine-tuned model's card: data, recipe, test metrics with their 95% intervals."""
    from ultrafedfm.models.card import Metric, ModelCard

    metrics = {name: Metric(value=float(test.metrics[name]), ci_low=lo, ci_high=hi, n=len(run_.split.test),
                            dataset=f"{Path(data.source).name} test split")
               for name, (lo, hi) in test.intervals.items() if name in test.metrics}
    source = "ResNet-18 from scratch" if args.resnet18 else (encoder.source if encoder else "")
    return ModelCard(
        title=f"{'classifier' if args.task == 'cls' else 'segmenter'} fine-tuned on {Path(data.source).name}",
        kind="classifier" if args.task == "cls" else "segmenter", preset=f"{run_.spec.preset or run_.spec.arch} at "
        f"{run_.spec.img_size} px", classes=tuple(run_.spec.classes), metrics=metrics,
        data=(f"{data.source}: {run_.train_size} training images ({args.label_fraction:.0%} of the training split), "
              f"{len(run_.split.val)} validation, {len(run_.split.test)} test",),
        training=f"{args.mode if not args.resnet18 else 'full'} fine-tuning from {source}, {run_.fit.total_steps} "
                 f"steps; best validation {run_.fit.metric_name} {run_.fit.best_metric:.3f} at step {run_.fit.best_step}",
        privacy="fine-tuned centrally on this data; the encoder's own privacy is on its card")
