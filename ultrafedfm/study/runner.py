"""The study as a list of units of work, each written to its own result file: a rerun continues.

Units, in order: prepare the data; pretrain (centralized, federated with secure aggregation,
centralized without the thyroid sites); then one fine-tuning cell per (arm, task, label
fraction, seed); then the report. A unit whose result file exists is skipped, so a killed
study resumes where it stopped (pretraining units also resume inside themselves from their
checkpoints). A unit that fails is logged and retried on the next run; units that need its
output wait: a unit never reports numbers it did not measure.

Layout under ``out``::

    results/<unit>.json      one per finished unit (metrics, intervals, shifts, predictions)
    pretrain/<arm>/          encoders (safetensors + card), checkpoints, the FLARE run
    models/<arm>/<task>/     fine-tuned models of seed 0 at 100 % labels (safetensors + card)
    examples/                segmentation example PNGs
    results.md, figures/     the report
    study.log                appended by ``ultrafedfm study``

Several processes may run one study folder at once (start the command twice): a process claims
a unit with an exclusive lock file (``results/<unit>.lock`` holding its PID) and the others skip
it; a lock whose process is gone is taken over. Data preparation runs under a folder lock.
"""
from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ultrafedfm.config import to_mapping
from ultrafedfm.fileio import append_line, atomic_write_json
from ultrafedfm.study.presets import StudyPreset

_logger = logging.getLogger(__name__)

__all__ = ["RUNNING_ELSEWHERE", "TASK_DEFS", "Unit", "plan_units", "run_study"]

# task -> (data set, cls|seg, binary AUROC pairs, headline metrics)
TASK_DEFS: dict[str, tuple[str, str, tuple[tuple[str, str], ...], tuple[str, ...]]] = {
    "busi_cls": ("busi", "cls", (("benign", "malignant"),), ("auroc/benign_vs_malignant", "auroc_macro")),
    "busi_seg": ("busi", "seg", (), ("dice",)),
    "ddti_seg": ("ddti", "seg", (), ("dice",)),
}
# The reason given for a unit another process sharing the study folder has claimed.
RUNNING_ELSEWHERE = "running in another process"
PRETRAIN_ARMS = ("central", "federated", "federated_dp", "central_no_thyroid")


@dataclass(frozen=True)
class Unit:
    """One piece of work; ``key`` names its result file."""

    kind: str  # pretrain | finetune
    arm: str
    task: str = ""
    fraction: float = 1.0
    seed: int = 0

    @property
    def key(self) -> str:
        if self.kind == "pretrain":
            return f"pretrain/{self.arm}"
        return f"finetune/{self.arm}/{self.task}/f{self.fraction:g}/s{self.seed}"


def plan_units(preset: StudyPreset) -> list[Unit]:
    """Every unit of ``preset``: pretraining, then fine-tuning seed by seed (a partial study has whole seeds).

    The DP arm pretrains after the first seed's cells (it is the slowest arm), so an interrupted
    study has every other arm's first seed.
    """
    first = [Unit("pretrain", arm) for arm in PRETRAIN_ARMS if arm in preset.arms and arm != "federated_dp"]
    cells = []
    for seed in preset.seeds:
        for task in preset.tasks:
            for arm in preset.arms:
                if arm == "central_no_thyroid" and task != "ddti_seg":
                    continue
                for fraction in preset.fractions:
                    cells.append(Unit("finetune", arm, task, fraction, seed))
    dp = [Unit("pretrain", "federated_dp")] if "federated_dp" in preset.arms else []
    first_seed = [u for u in cells if u.seed == preset.seeds[0] and u.arm != "federated_dp"]
    rest = [u for u in cells if u not in first_seed]
    return first + first_seed + dp + rest


def _result_path(out: Path, unit: Unit) -> Path:
    return out / "results" / f"{unit.key}.json"


def _claim(out: Path, unit: Unit) -> Path | None:
    """Take the unit's lock file (``None``: a live process holds it). A dead holder's lock is taken over."""
    lock = _result_path(out, unit).with_suffix(".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            try:
                holder = int(lock.read_text(encoding="ascii").strip() or 0)
                os.kill(holder, 0)
                return None  # alive: another process runs this unit
            except (ValueError, ProcessLookupError, FileNotFoundError):
                lock.unlink(missing_ok=True)  # its process is gone (killed mid-unit)
                continue
            except PermissionError:
                return None
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        return lock
    return None


@contextlib.contextmanager
def _folder_lock(path: Path):
    """An exclusive ``flock`` on ``path`` for the duration of the block (waits for other processes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="ascii") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return None if not np.isfinite(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


def _run_pretrain(unit: Unit, *, out: Path, preset: StudyPreset, data, progress: bool) -> dict[str, Any]:
    from ultrafedfm.study.data import THYROID_SETS
    from ultrafedfm.study.pretrain_arms import run_central_pretraining

    folder = out / "pretrain" / unit.arm
    started = time.perf_counter()
    if unit.arm == "central":
        path = run_central_pretraining(sites=data.sites, site_images=data.site_images, preset=preset, out=folder,
                                       title="UltraFedFM encoder, centralized MAE (study arm)", progress=progress)
        extra: dict[str, Any] = {"sites": list(data.sites)}
    elif unit.arm == "central_no_thyroid":
        sites = data.sites_without(THYROID_SETS)
        path = run_central_pretraining(sites=sites, site_images=data.site_images, preset=preset, out=folder,
                                       title="UltraFedFM encoder, centralized MAE without thyroid sites (study arm)",
                                       progress=progress)
        extra = {"sites": list(sites)}
    else:
        from ultrafedfm.study.federated_arm import run_federated_pretraining

        path, rows, privacy = run_federated_pretraining(sites=data.sites, site_images=data.site_images,
                                                        preset=preset, out=folder, dp=unit.arm == "federated_dp")
        extra = {"sites": list(data.sites), "rounds": len(rows), "applied_rounds": sum(bool(r.get("applied")) for r in rows),
                 "global_loss": [r.get("global_loss") for r in rows], "privacy": privacy,
                 "round_seconds": [r.get("duration_s") for r in rows]}
    return {"status": "done", "encoder": str(path), "seconds": time.perf_counter() - started,
            "image_epochs": preset.pretrain_epochs, **extra}


def _encoder_for(unit: Unit, *, out: Path, preset: StudyPreset):
    from ultrafedfm.models.downstream import load_encoder, scratch_encoder
    from ultrafedfm.study.pretrain_arms import ENCODER_FILE

    if unit.arm == "resnet18":
        return None
    if unit.arm == "scratch":
        return scratch_encoder(preset.model_preset, img_size=preset.img_size, seed=unit.seed)
    return load_encoder(out / "pretrain" / unit.arm / ENCODER_FILE)


def _run_finetune(unit: Unit, *, out: Path, preset: StudyPreset, data, progress: bool) -> dict[str, Any]:
    from ultrafedfm.downstream.evaluate import save_examples_png
    from ultrafedfm.downstream.experiment import run_finetune
    from ultrafedfm.study.cards import finetuned_card
    from ultrafedfm.models.downstream import save_downstream

    name, task, pairs, headline = TASK_DEFS[unit.task]
    started = time.perf_counter()
    run = run_finetune(
        data.downstream[name], data.splits[name], task=task,
        config=preset.finetune_cnn if unit.arm == "resnet18" else preset.finetune_vit,
        encoder=_encoder_for(unit, out=out, preset=preset), arch="resnet18" if unit.arm == "resnet18" else "vit",
        mode="full" if unit.arm == "resnet18" else preset.finetune_mode, label_fraction=unit.fraction,
        seed=unit.seed, shifts=preset.shifts, pairs=pairs, decoder_channels=preset.decoder_channels,
        n_boot=preset.n_boot, device=preset.device, progress=progress)
    preds = run.test.predictions
    result: dict[str, Any] = {
        "status": "done", "arm": unit.arm, "task": unit.task, "fraction": unit.fraction, "seed": unit.seed,
        "train_size": run.train_size, "val_size": len(run.split.val), "test_size": len(run.split.test),
        "best_val": run.fit.best_metric, "best_step": run.fit.best_step, "total_steps": run.fit.total_steps,
        "seconds": time.perf_counter() - started, "headline": list(headline), **run.test.to_mapping(),
        "groups": preds.groups,
    }
    if task == "cls":
        result["labels"], result["probs"] = preds.labels, np.round(preds.probs, 5)
        result["classes"] = list(run.spec.classes)
    else:
        from ultrafedfm.downstream.metrics import segmentation_case_metrics

        result["case_dice"] = segmentation_case_metrics(preds.pred_masks.float(), preds.masks.float())["dice"]
    if unit.seed == preset.seeds[0] and unit.fraction == max(preset.fractions):
        folder = out / "models" / unit.arm / unit.task
        save_downstream(run.model, run.spec, folder, card=finetuned_card(unit=unit, run=run, preset=preset,
                                                                          data_name=name))
        result["model"] = str(folder)
        if task == "seg":
            view = data.downstream[name].view(run.split.test, task="seg")
            result["examples_png"] = str(save_examples_png(view, preds, out / "examples" /
                                                           f"{unit.arm}_{unit.task}.png"))
    return result


def run_study(*, out: str | Path, preset: StudyPreset, data_root: str | Path, progress: bool = True,
              stop_after: int | None = None) -> dict[str, Any]:
    """Run every unit not yet done, then write the report. Returns a summary (counts, failures, report path).

    Args:
        stop_after: run at most this many units this time (tests use it to check resuming).
    """
    from ultrafedfm.study.data import prepare_data
    from ultrafedfm.study.report import write_report

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "preset.json", to_mapping(preset))
    started = time.perf_counter()
    with _folder_lock(out / ".prepare.lock"):  # two processes must not ingest into one cache at once
        data = prepare_data(data_root, out, preset, progress=progress)
    units = plan_units(preset)
    failures: dict[str, str] = {}
    ran = skipped = 0
    for pass_index in range(2):  # a second pass runs units that waited for a pretraining unit of the first
        ran_before = ran
        for index, unit in enumerate(units, 1):
            path = _result_path(out, unit)
            if path.is_file():
                skipped += pass_index == 0
                continue
            if stop_after is not None and ran >= stop_after:
                break
            needs = f"pretrain/{unit.arm}"
            if unit.kind == "finetune" and unit.arm in PRETRAIN_ARMS and not (out / "results" / f"{needs}.json").is_file():
                failures[unit.key] = f"waiting for {needs}"
                continue
            lock = _claim(out, unit)
            if lock is None or path.is_file():  # another process runs it, or just finished it
                if lock is not None:
                    lock.unlink(missing_ok=True)
                failures[unit.key] = RUNNING_ELSEWHERE
                continue
            _logger.info("[%d/%d] %s", index, len(units), unit.key)
            try:
                runner = _run_pretrain if unit.kind == "pretrain" else _run_finetune
                result = runner(unit, out=out, preset=preset, data=data, progress=progress)
            except Exception as exc:  # one failed unit must not stop the study; the rerun retries it
                failures[unit.key] = f"{type(exc).__name__}: {exc}"
                _logger.error("unit %s failed: %s\n%s", unit.key, exc, traceback.format_exc())
                append_line(out / "failures.log",
                            f"{time.strftime('%Y-%m-%d %H:%M:%S')} {unit.key}: {failures[unit.key]}")
                continue
            else:
                atomic_write_json(path, _jsonable({"unit": unit.key, **result}))
                failures.pop(unit.key, None)
                ran += 1
            finally:
                lock.unlink(missing_ok=True)
        if ran == ran_before or (stop_after is not None and ran >= stop_after):
            break
    remaining = [u.key for u in units if not _result_path(out, u).is_file()]
    # A unit another process claimed and has finished since is done, not a failure of this run.
    elsewhere = sum(1 for key in failures if key not in remaining)
    failures = {key: reason for key, reason in failures.items() if key in remaining}
    report = write_report(out, preset=preset, units=units)
    summary = {"units": len(units), "ran": ran, "skipped_done": skipped, "done_elsewhere": elsewhere,
               "remaining": remaining, "failures": failures, "report": str(report),
               "seconds": time.perf_counter() - started}
    atomic_write_json(out / "status.json", summary)
    return summary
