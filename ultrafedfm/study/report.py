"""The study's report: tables (mean and spread over seeds, pooled 95% intervals), shift drops, plots.

Every number comes from ``results/*.json``. A cell's interval is a cluster bootstrap over test
groups of the seed-averaged metric (each resample scores every seed's predictions and averages
them), so it covers test-set sampling as well as seed spread. Missing cells are shown as
``-`` and listed, with the command that continues the study.
"""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ultrafedfm.downstream.metrics import binary_auroc, bootstrap_ci, macro_auroc
from ultrafedfm.fileio import atomic_write_text
from ultrafedfm.study.presets import StudyPreset

_logger = logging.getLogger(__name__)

__all__ = ["load_results", "pooled_interval", "write_report"]

ARM_LABELS = {
    "scratch": "ViT from scratch", "central": "ViT, centralized MAE", "federated": "ViT, federated MAE (SecAgg)",
    "federated_dp": "ViT, federated MAE + DP", "resnet18": "ResNet-18 from scratch",
    "central_no_thyroid": "ViT, centralized MAE without thyroid sites",
}


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    results = {}
    for path in sorted((out / "results").rglob("*.json")):
        data = json.loads(path.read_text(encoding="utf-8"))
        results[data["unit"]] = data
    return results


def _cell(results: dict[str, dict], arm: str, task: str, fraction: float) -> list[dict]:
    prefix = f"finetune/{arm}/{task}/f{fraction:g}/"
    return [r for k, r in sorted(results.items()) if k.startswith(prefix) and r.get("status") == "done"]


def pooled_interval(runs: Sequence[dict], metric: str, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float]:
    """Bootstrap (over test groups) interval of the seed-averaged ``metric`` of ``runs`` (same test set)."""
    groups = runs[0]["groups"]
    if "probs" in runs[0]:
        labels = np.asarray(runs[0]["labels"])
        probs = [np.asarray(r["probs"], dtype=np.float64) for r in runs]
        classes = runs[0]["classes"]
        if metric == "auroc_macro":
            stat = lambda idx: float(np.mean([macro_auroc(labels[idx], p[idx], fast=True) for p in probs]))  # noqa
        elif metric.startswith("auroc/") and "_vs_" in metric:
            a, b = metric.split("/", 1)[1].split("_vs_")
            neg, pos = classes.index(a), classes.index(b)
            stat = lambda idx: float(np.mean([binary_auroc(labels[idx], p[idx], negative=neg, positive=pos,  # noqa
                                                           fast=True) for p in probs]))
        else:
            return math.nan, math.nan
    else:
        if metric != "dice":
            return math.nan, math.nan
        dice = np.nanmean(np.asarray([[math.nan if v is None else v for v in r["case_dice"]] for r in runs],
                                     dtype=np.float64), axis=0)
        stat = lambda idx: float(np.nanmean(dice[idx])) if np.isfinite(dice[idx]).any() else math.nan  # noqa: E731
    return bootstrap_ci(stat, len(groups), groups=groups, n_boot=n_boot, seed=seed)


def _values(runs: Sequence[dict], metric: str, shift: str | None = None) -> np.ndarray:
    source = (lambda r: r["metrics"]) if shift is None else (lambda r: r["shifted"].get(shift, {}))
    vals = [source(r).get(metric) for r in runs]
    return np.asarray([v for v in vals if v is not None], dtype=np.float64)


def _fmt(values: np.ndarray, interval: tuple[float, float] | None = None) -> str:
    if values.size == 0:
        return "-"
    text = f"{values.mean():.3f} ± {values.std(ddof=1) if values.size > 1 else 0.0:.3f} (n={values.size})"
    if interval is not None and all(math.isfinite(v) for v in interval):
        text += f" [{interval[0]:.3f}, {interval[1]:.3f}]"
    return text


def _plot(out: Path, results: dict, preset: StudyPreset, arms: Sequence[str], task: str, metric: str) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    drawn = False
    for k, arm in enumerate(arms):
        xs, ys, es = [], [], []
        for fraction in preset.fractions:
            vals = _values(_cell(results, arm, task, fraction), metric)
            if vals.size:
                xs.append(fraction * 100 * (1 + 0.03 * (k - len(arms) / 2)))  # small offset: bars do not overlap
                ys.append(vals.mean())
                es.append(vals.std(ddof=1) if vals.size > 1 else 0.0)
        if xs:
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=ARM_LABELS.get(arm, arm))
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xscale("log")
    ax.set_xticks([f * 100 for f in preset.fractions], [f"{f:.0%}" for f in preset.fractions])
    ax.set_xlabel("training labels used")
    ax.set_ylabel(metric)
    ax.set_title(f"{task}: {metric} (mean ± sd over seeds)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    path = out / "figures" / f"{task}_{metric.replace('/', '_')}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(out: Path, *, preset: StudyPreset, units: Sequence[Any]) -> Path:
    """Write ``out/results.md`` (and ``out/figures/*.png``) from the result files present."""
    from ultrafedfm.study.runner import TASK_DEFS

    out = Path(out)
    results = load_results(out)
    lines = [f"# Study results (preset `{preset.name}`)", ""]
    missing = [u.key for u in units if u.key not in results]
    if missing:
        lines += [f"**Partial: {len(missing)} of {len(units)} units are not done yet** "
                  f"(continue with `ultrafedfm study --preset {preset.name} --out {out}`).", ""]
    lines += _pretraining_section(results, preset)
    for task in preset.tasks:
        headline = TASK_DEFS[task][3]
        task_arms = [a for a in preset.arms if a != "central_no_thyroid" or task == "ddti_seg"]
        for metric in headline:
            lines += _metric_section(out, results, preset, task_arms, task, metric)
        if preset.shifts:
            lines += _shift_section(results, preset, task_arms, task, headline[0])
    seconds = sum(r.get("seconds", 0.0) for r in results.values())
    lines += [f"Compute in finished units: {seconds / 60:.1f} min.", ""]
    if missing:
        lines += ["## Not done yet", ""] + [f"- {key}" for key in missing] + [""]
    path = out / "results.md"
    atomic_write_text(path, "\n".join(lines))
    return path


def _pretraining_section(results: dict[str, dict], preset: StudyPreset) -> list[str]:
    lines = ["## Pretraining arms", "", "| arm | status | sites | image-epochs | time (s) | notes |",
             "|---|---|---|---|---|---|"]
    for arm in ("central", "federated", "central_no_thyroid", "federated_dp"):
        if arm not in preset.arms:
            continue
        r = results.get(f"pretrain/{arm}")
        if r is None:
            lines.append(f"| {ARM_LABELS[arm]} | pending | | | | |")
            continue
        note = ""
        if arm.startswith("federated"):
            losses = [v for v in r.get("global_loss", []) if v is not None]
            note = (f"{r['applied_rounds']}/{r['rounds']} rounds applied; global loss "
                    f"{losses[0]:.3f} -> {losses[-1]:.3f}" if losses else "")
            note += f"; privacy: {r.get('privacy', 'not recorded')}"
        lines.append(f"| {ARM_LABELS[arm]} | done | {', '.join(r['sites'])} | {r['image_epochs']} | "
                     f"{r['seconds']:.0f} | {note} |")
    return lines + [""]


def _metric_section(out: Path, results: dict[str, dict], preset: StudyPreset, arms: Sequence[str], task: str,
                    metric: str) -> list[str]:
    """One metric's table (arm x label fraction) and its plot."""
    lines = [f"## {task}: {metric}", "",
             "mean ± sd over seeds (n) [95% CI of the seed mean, bootstrap over test groups]", "",
             "| arm | " + " | ".join(f"{f:.0%} labels" for f in preset.fractions) + " |",
             "|---|" + "---|" * len(preset.fractions)]
    for arm in arms:
        cells = []
        for fraction in preset.fractions:
            runs = _cell(results, arm, task, fraction)
            interval = pooled_interval(runs, metric, n_boot=preset.n_boot) if runs else None
            cells.append(_fmt(_values(runs, metric), interval))
        lines.append(f"| {ARM_LABELS.get(arm, arm)} | " + " | ".join(cells) + " |")
    lines.append("")
    figure = _plot(out, results, preset, arms, task, metric)
    if figure is not None:
        lines += [f"![{task} {metric}](figures/{figure.name})", ""]
    return lines


def _shift_section(results: dict[str, dict], preset: StudyPreset, arms: Sequence[str], task: str,
                   metric: str) -> list[str]:
    """The drop of ``metric`` under each test-time shift, at the largest label fraction."""
    fraction = max(preset.fractions)
    lines = [f"### {task}: drop of {metric} under test-time shifts ({fraction:.0%} labels; clean minus shifted, "
             "mean ± sd over seeds)", "",
             "| arm | clean | " + " | ".join(preset.shifts) + " |", "|---|---|" + "---|" * len(preset.shifts)]
    for arm in arms:
        runs = _cell(results, arm, task, fraction)
        clean = _values(runs, metric)
        cells = []
        for shift in preset.shifts:
            shifted = _values(runs, metric, shift)
            cells.append(_fmt(clean - shifted).split(" (n=")[0] if shifted.size == clean.size and clean.size
                         else "-")
        lines.append(f"| {ARM_LABELS.get(arm, arm)} | {_fmt(clean).split(' (n=')[0]} | " + " | ".join(cells) + " |")
    return lines + [""]
