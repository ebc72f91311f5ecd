"""``ultrafedfm evaluate``: score a fine-tuned model on any labelled folder or cache (e.g. another hospital).

    ultrafedfm evaluate --model ft/busi --data /data/other_hospital_breast --out eval/other
    ultrafedfm evaluate --model ft/busi --data ../shared/data/busi --split test --out eval/busi-test
    ultrafedfm evaluate --model ft/ddti --data ../shared/data/ddti --shifts speckle,blur --out eval/ddti

The folder may hold only some of the model's classes (benign/malignant without normal): the
AUROC of the classes present is reported, and with two classes the binary AUROC from the
model's probabilities renormalised over them. Writes ``OUT/metrics.json`` (metrics, 95%
intervals, shifts) and, for segmentation, ``OUT/examples.png``.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", help="score a fine-tuned model on a labelled folder or cache",
        description="Evaluate a model written by `ultrafedfm finetune` on a folder in the same format "
        "(labels.csv with file,label,mask,width,height[,group]) or a cache; writes metrics JSON with 95% intervals.")
    parser.add_argument("--model", type=Path, required=True, help="folder written by `ultrafedfm finetune`")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", type=Path, help="image folder with labels.csv")
    source.add_argument("--cache", type=Path, help="site cache")
    parser.add_argument("--out", type=Path, required=True, help="output folder (metrics.json, examples.png)")
    parser.add_argument("--split", choices=["all", "test"], default="all",
                        help="all images (another institution; default) or the test split made by --split-seed")
    parser.add_argument("--split-seed", type=int, default=0, help="split seed used by finetune (with --split test)")
    parser.add_argument("--positive", help="positive class of the binary AUROC when two classes are present")
    parser.add_argument("--shifts", default="", help="comma-separated test-time shifts: speckle,blur,gain_contrast,"
                        "resolution")
    parser.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for the 95%% intervals")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-progress", action="store_true")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ultrafedfm.data.labelled import LabelledDataError, load_labelled_cache, load_labelled_folder
    from ultrafedfm.downstream.augment import SHIFTS
    from ultrafedfm.downstream.evaluate import evaluate_split, map_labels, save_examples_png
    from ultrafedfm.downstream.splits import grouped_split
    from ultrafedfm.fileio import atomic_write_json
    from ultrafedfm.models.downstream import load_downstream

    shifts = [s for s in args.shifts.split(",") if s]
    unknown = sorted(set(shifts) - set(SHIFTS))
    if unknown:
        _logger.error("unknown shifts %s; choose from %s", unknown, ", ".join(SHIFTS))
        return 2
    try:
        model, spec = load_downstream(args.model)
        require = "label" if spec.task == "cls" else "mask"
        progress = not args.no_progress
        data = (load_labelled_folder(args.data, image_size=spec.img_size, require=require, progress=progress)
                if args.data else load_labelled_cache(args.cache, image_size=spec.img_size, require=require,
                                                      progress=progress))
        if spec.task == "cls":
            data = map_labels(data, spec.classes)
        usable = data.require(require)
    except (LabelledDataError, FileNotFoundError, ValueError) as exc:
        _logger.error("%s", exc)
        return 2
    if args.split == "test":
        labels = data.labels.numpy() if spec.task == "cls" else None
        test = set(grouped_split(data.groups, labels, seed=args.split_seed).test.tolist())
        usable = np.asarray([i for i in usable if i in test], dtype=np.int64)
    view = data.view(usable, task=spec.task)
    result = evaluate_split(model, view, classes=spec.classes, shifts=shifts, positive=args.positive,
                            n_boot=args.n_boot, device=args.device)
    out = Path(args.out)
    payload = {"model": str(args.model), "data": data.source, "split": args.split, "n": len(view),
               "classes_present": sorted({spec.classes[i] for i in view.labels.tolist()}) if spec.task == "cls" else [],
               **result.to_mapping()}
    atomic_write_json(out / "metrics.json", payload)
    if spec.task == "seg":
        save_examples_png(view, result.predictions, out / "examples.png")
    for name, (lo, hi) in result.intervals.items():
        value = result.metrics.get(name)
        if value is not None and np.isfinite(value):
            print(f"{name}: {value:.3f} (95% CI {lo:.3f}-{hi:.3f})")
    print(f"n={len(view)}; metrics: {out / 'metrics.json'}" + (f"; examples: {out / 'examples.png'}"
                                                              if spec.task == "seg" else ""))
    return 0
