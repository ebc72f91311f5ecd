"""DP-SGD in federated fine-tuning: what epsilon 8 costs in test AUROC / Dice and in time, side by side.

The sites and the rounds are the product's: a fine-tuning ``JobSpec`` (``finetune_cls`` /
``finetune_seg`` shrunk to the ``tiny`` preset) run by ``FederatedRun`` over in-process
``SiteSession``s (``LocalExchange``: the FLARE jobs' code without FLARE's transport). Each site
reads its own labelled folder, keeps its own validation and test groups out of training, and with
DP on plans its noise from its own training-split size and charges each round to its own ledger.

Data: a labelled folder (default ``../shared/data/busi``), split once by group and label with
``--split-seed`` exactly as ``ultrafedfm study`` splits it (seed 0: the study's BUSI test split,
whose images its pretraining arms never saw). The test split is held out of every site; the
rest is dealt to ``--sites`` sites by group. Arms, like for like (same sites, rounds, learning
rate, seeds, encoder): DP off, and DP-SGD at each ``--epsilon`` (target for the whole job, per
site; delta 1/(10 N); PRV; clip 1.0; ghost clipping). Secure aggregation is off in both arms (it
changes the mean delta by at most its quantisation bound, ~1e-5 here). The final global model
is scored on the held-out test split (scikit-learn AUROC / MONAI Dice); the table gives mean and
spread over seeds, the change from DP off, and the wall time per arm with its ratio.

Resumable: each (task, arm, seed) writes ``<out>/results/*.json``; rerun the same command.

    .venv/bin/python bench/bench_dp_finetune.py --encoder runs/study-cpu/pretrain/federated/encoder.safetensors
    .venv/bin/python bench/bench_dp_finetune.py --tasks cls --seeds 0 --rounds 5        # a few minutes
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from ultrafedfm.data.labelled import LabelledImages, load_labelled_folder
from ultrafedfm.downstream.evaluate import evaluate_split
from ultrafedfm.downstream.splits import grouped_split
from ultrafedfm.fileio import atomic_write_json
from ultrafedfm.federation.aggregation import make_aggregation
from ultrafedfm.federation.job_spec import JOB_SPECS, JobSpec
from ultrafedfm.federation.local import LocalExchange
from ultrafedfm.federation.model_io import FINETUNED_FOLDER
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.server import FederatedRun
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.federation.site_session import SiteSession
from ultrafedfm.models.downstream.spec import load_downstream
from ultrafedfm.privacy.dp import DPConfig, read_ledger, site_ledger_path

_logger = logging.getLogger("bench_dp_finetune")

DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "busi"
HEADLINE = {"cls": ("auroc/benign_vs_malignant", "auroc_macro"), "seg": ("dice", "iou")}


def _site_folders(data: LabelledImages, source: Path, train_pool: np.ndarray, *, sites: int, seed: int,
                  out: Path) -> list[Path]:
    """One labelled folder per site (a link to ``source`` and its own labels.csv), dealt by group."""
    groups = sorted({data.groups[i] for i in train_pool})
    order = np.random.default_rng(seed).permutation(len(groups))
    site_of = {groups[g]: k % sites for k, g in enumerate(order)}
    with open(source / "labels.csv", newline="", encoding="utf-8") as f:
        rows = {row["file"].strip(): row for row in csv.DictReader(f)}
    folders = []
    for k in range(sites):
        folder = out / "sites" / f"site-{k + 1}" / "labelled"
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / "data").exists():
            (folder / "data").symlink_to(source.resolve(), target_is_directory=True)
        with open(folder / "labels.csv", "w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label", "mask", "group"])
            for i in train_pool:
                if site_of[data.groups[i]] == k:
                    row = rows[data.files[i]]
                    mask = (row.get("mask") or "").strip()
                    writer.writerow([f"data/{data.files[i]}", row["label"], f"data/{mask}" if mask else "",
                                     data.groups[i]])
        folders.append(folder)
    return folders


def _job(args, task: str, *, seed: int, epsilon: float | None, run_dir: Path) -> JobSpec:
    base = JOB_SPECS["finetune_cls" if task == "cls" else "finetune_seg"]
    settings = dataclasses.replace(base.finetune, mode=args.mode, val_fraction=0.05, test_fraction=0.05)
    dp = DPConfig() if epsilon is None else DPConfig(enabled=True, target_epsilon=epsilon, max_grad_norm=1.0)
    return dataclasses.replace(
        base, name=f"bench_{task}", preset=args.preset, img_size=args.img_size, num_rounds=args.rounds,
        warmup_rounds=min(2, args.rounds), batch_size=args.batch, base_lr=args.base_lr, seed=seed, min_sites=args.sites,
        round_timeout_s=0, secure_aggregation=False, finetune=settings, dp=dp, init_encoder=args.encoder,
        run_name="run", run_state_dir=str(run_dir), export_encoder=False)


def _run_arm(args, task: str, folders: list[Path], *, seed: int, epsilon: float | None, arm_dir: Path) -> dict:
    spec = _job(args, task, seed=seed, epsilon=epsilon, run_dir=arm_dir / "server")
    sessions = {}
    for k, folder in enumerate(folders):
        name = f"site-{k + 1}"
        kit, cache = arm_dir / "kits" / name, arm_dir / "caches" / name  # a fresh ledger per arm
        (kit / "local").mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        (kit / "local" / "site.yaml").write_text(yaml.safe_dump({
            "cache": str(cache), "labelled": str(folder), "num_workers": 0, "num_threads": args.threads,
            "device": args.device, "privacy": {"require_secure_aggregation": False}}))
        sessions[name] = SiteSession(site_name=name, job_id=f"bench-{task}-{seed}", start_dir=kit)
    exchange = LocalExchange(sessions)
    run = FederatedRun(job=spec, state=RunState(spec.run_state_dir, spec.run_name),
                       aggregation=make_aggregation(spec, members=lambda: None), exchange=exchange,
                       job_id=f"bench-{task}-{seed}")
    started = time.perf_counter()
    finished = run.run(connected_sites=exchange.connected_sites, aborted=lambda: False)
    seconds = time.perf_counter() - started
    rounds = run.state.read_rounds()
    if not finished or len(rounds) != args.rounds or not all(r["applied"] for r in rounds):
        raise RuntimeError(f"the federated run in {arm_dir} did not apply all {args.rounds} rounds; see "
                           f"{run.state.dir}/rounds.jsonl")
    caches = [arm_dir / "caches" / f"site-{k + 1}" for k in range(len(folders))]
    epsilons = [read_ledger(site_ledger_path(c)).spent(None).epsilon for c in caches] if epsilon is not None else []
    # Each site's own record of its rounds: the seconds spent training, apart from planning and accounting.
    train_seconds = sum(f.train_seconds for c in caches for f in read_site_figures(site_figures_path(c)))
    return {"seconds": seconds, "train_seconds": train_seconds, "model": str(run.state.dir / FINETUNED_FOLDER),
            "site_epsilons": epsilons}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--encoder", default=None, help="a pretrained encoder.safetensors (default: random init)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-dp-finetune"))
    parser.add_argument("--tasks", nargs="+", default=["cls", "seg"], choices=["cls", "seg"])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[8.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sites", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--base-lr", type=float, default=0.02, help="per 256 images (the study's cpu preset's)")
    parser.add_argument("--mode", default="full", choices=["full", "linear"],
                        help="full fine-tuning, or a frozen encoder (linear probe / decoder only)")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--img-size", type=int, default=64)
    parser.add_argument("--split-seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    args.out = args.out.resolve()  # site.yaml paths are relative to each kit, so every path given is absolute
    args.data = args.data.resolve()
    args.encoder = str(Path(args.encoder).resolve()) if args.encoder else None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("ultrafedfm", "opacus"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if not (args.data / "labels.csv").is_file():
        print(f"DP fine-tuning benchmark skipped: no labelled folder at {args.data} (labels.csv); pass --data DIR")
        return 0
    data = load_labelled_folder(args.data, image_size=args.img_size, cache_dir=args.out / "data", progress=False)
    split = grouped_split(data.groups, data.labels.numpy() if data.classes else None, seed=args.split_seed)
    pool = np.concatenate([split.train, split.val])
    folders = _site_folders(data, args.data, pool, sites=args.sites, seed=args.split_seed, out=args.out)
    arms: list[float | None] = [None, *args.epsilon]
    rows = []
    for task in args.tasks:
        test = data.view(split.test if task == "cls" else np.intersect1d(split.test, data.require("mask")), task=task)
        for seed in args.seeds:
            for epsilon in arms:
                arm = "no-dp" if epsilon is None else f"eps{epsilon:g}"
                tag = task if args.mode == "full" else f"{task}-{args.mode}"
                result_file = args.out / "results" / f"{tag}-{arm}-s{seed}.json"
                if not result_file.is_file():
                    _logger.info("%s %s seed %d: %d rounds over %d sites", task, arm, seed, args.rounds, args.sites)
                    ran = _run_arm(args, task, folders, seed=seed, epsilon=epsilon,
                                   arm_dir=args.out / "runs" / f"{tag}-{arm}-s{seed}")
                    model, _ = load_downstream(ran["model"])
                    metrics = evaluate_split(model, test, classes=data.classes if task == "cls" else (),
                                             pairs=(("benign", "malignant"),) if task == "cls" else (),
                                             n_boot=0).metrics
                    atomic_write_json(result_file, {
                        **ran, "task": task, "mode": args.mode, "arm": arm, "seed": seed, "metrics": metrics,
                        "test_images": len(test), "encoder": args.encoder or "random init"})
                rows.append(json.loads(result_file.read_text()))
    _report(rows, args)
    return 0


def _mean_sd(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def _report(rows: list[dict], args) -> None:
    print(f"\nDP-SGD in federated fine-tuning ({args.mode}): {args.sites} sites, {args.rounds} rounds, "
          f"{args.preset} ViT at {args.img_size} px, encoder {args.encoder or 'random init'}, seeds {args.seeds}; "
          f"test split of {args.data.name} (split seed {args.split_seed}), mean ± sd over seeds; "
          f"{os.cpu_count()} CPU cores, {args.threads} thread(s), device {args.device}")
    print("| task | arm | metric | test (mean ± sd) | change vs no DP | site epsilon (max) | wall s / run "
          "| wall ratio | training s / run | training ratio |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for task in args.tasks:
        by_arm: dict[str, list[dict]] = {}
        for row in rows:
            if row["task"] == task:
                by_arm.setdefault(row["arm"], []).append(row)
        base = by_arm.get("no-dp", [])
        base_seconds = statistics.mean(r["seconds"] for r in base) if base else math.nan
        base_train = statistics.mean(r.get("train_seconds", math.nan) for r in base) if base else math.nan
        for arm, arm_rows in by_arm.items():
            seconds = statistics.mean(r["seconds"] for r in arm_rows)
            train = statistics.mean(r.get("train_seconds", math.nan) for r in arm_rows)
            eps = max((e for r in arm_rows for e in r["site_epsilons"]), default=None)
            for metric in HEADLINE[task]:
                values = [r["metrics"][metric] for r in arm_rows]
                base_mean = statistics.mean(r["metrics"][metric] for r in base) if base else math.nan
                change = "" if arm == "no-dp" else f"{statistics.mean(values) - base_mean:+.3f}"
                print(f"| {task} | {arm} | {metric} | {_mean_sd(values)} | {change} | "
                      f"{'' if eps is None else f'{eps:.3f}'} | {seconds:.0f} | {seconds / base_seconds:.2f}x | "
                      f"{train:.0f} | {train / base_train:.2f}x |")


if __name__ == "__main__":
    raise SystemExit(main())
