"""``ultrafedfm study``: the multi-site downstream study, resumable (rerun the same command to continue).

    ultrafedfm study --preset cpu --out runs/study-cpu                 # about an hour on 2 CPU cores
    ultrafedfm study --preset gpu --out runs/study-gpu --data-root /data/shared

Arms: ViT from scratch, centralized MAE, federated MAE with secure aggregation (FLARE
simulator, same image-epochs), the DP arm (reported as not run until DP lands), a ResNet-18
from scratch, and centralized MAE without the thyroid sites (evaluated on DDTI). Downstream:
BUSI benign-vs-malignant and 3-class AUROC, BUSI lesion Dice, DDTI nodule Dice, at each label
fraction and seed, clean and under test-time shifts. Writes ``OUT/results.md`` and plots.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]

DEFAULT_DATA_ROOT = Path("../shared/data")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "study", help="the multi-site downstream study (resumable; rerun to continue)",
        description="Pretrain (scratch / centralized / federated with secure aggregation), fine-tune on BUSI and "
        "DDTI at several label fractions and seeds, and report metrics with intervals, shift drops and plots. "
        "Every unit of work is saved as it finishes: rerunning the same command continues.")
    parser.add_argument("--preset", choices=["cpu", "gpu", "smoke"], default="cpu", help="study size (default cpu)")
    parser.add_argument("--out", type=Path, required=True, help="study folder (results, models, report)")
    parser.add_argument("--data-root", type=Path, default=DEFAULT_DATA_ROOT,
                        help=f"folder holding busi/, ddti/ and the other shared sets (default {DEFAULT_DATA_ROOT})")
    parser.add_argument("--device", help="torch device for centralized work (default: cuda when available)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared machine OpenMP threads spin-wait for each other; "
                        "on a machine of your own use its cores, with OMP_WAIT_POLICY=PASSIVE if others share it)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from ultrafedfm.study.presets import get_study_preset
    from ultrafedfm.study.runner import RUNNING_ELSEWHERE, run_study

    import torch

    if args.threads < 1:
        _logger.error("--threads must be at least 1")
        return 2
    torch.set_num_threads(args.threads)
    preset = get_study_preset(args.preset)
    if args.device:
        preset = dataclasses.replace(preset, device=args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(out / "study.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("ultrafedfm").addHandler(handler)
    try:
        summary = run_study(out=out, preset=preset, data_root=args.data_root, progress=not args.no_progress)
    except FileNotFoundError as exc:
        _logger.error("%s", exc)
        return 2
    finally:
        logging.getLogger("ultrafedfm").removeHandler(handler)
        handler.close()
    print(f"units: {summary['units']} ({summary['ran']} run now, {summary['skipped_done']} already done, "
          f"{summary['done_elsewhere']} done by another process, {len(summary['remaining'])} remaining)")
    for key, reason in summary["failures"].items():
        print(f"  not done: {key}: {reason}")
    print(f"report: {summary['report']}")
    busy = [key for key, reason in summary["failures"].items() if reason == RUNNING_ELSEWHERE]
    if summary["remaining"] and len(busy) == len(summary["remaining"]):
        # Nothing failed here: the other process sharing this folder finishes these and rewrites the report.
        print(f"{len(busy)} unit(s) still running in another process sharing {out}; it writes the final report")
        return 0
    if summary["remaining"]:
        print(f"continue with: ultrafedfm study --preset {args.preset} --out {out}")
        return 1
    return 0
