"""The empirical privacy audit: what an attacker can actually learn, beside what the accountant guarantees.

Two attacks on small, CPU-sized runs of the real code paths:

1. **Canary membership inference, one training run** (Steinke, Nasr and Jagielski 2023;
   :mod:`.onerun`). A site's cache gets ``m`` canary images (uniform noise, unlike any training
   image), each inserted independently with probability 1/2 (:func:`build_site_cache` writes a
   real site cache). The tiny MAE trains on it once -- with the site's DP-SGD (its own
   ``SiteDP`` plan, ledger charge and Opacus privatizer, exactly the site's round) and without.
   The attacker scores each canary by the final model's reconstruction error (mean over fixed
   random masks; lower error = "was in training"), guesses the extremes, and the number of
   correct guesses becomes an epsilon lower bound at 95 % confidence. With DP on it must sit
   below the accountant's epsilon (read from the site's ledger); with DP off it shows the attack
   has teeth.
2. **Gradient inversion on one upload** (:mod:`.inversion`): the analytic first-layer attack
   recovers a training image exactly from the plain delta of a tiny model's one-image step, and
   recovers nothing better than chance from the same site's masked secure-aggregation upload.

Deterministic for a given seed (torch and numpy seeded; DP noise and Poisson sampling seeded;
one CPU thread), except the secure-aggregation keys and masks, which are fresh by design.

    ultrafedfm audit --empirical --out audit-empirical           # the full run (about 3-6 min on 2 cores)
    ultrafedfm audit --empirical --quick --out audit-smoke       # a smoke test (well under a minute)
"""
from __future__ import annotations

import dataclasses
import logging
import math
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm

from ultrafedfm.data.cache import CacheDataset, CacheEntry, ManifestWriter, image_relpath, init_cache, salted_key, write_png
from ultrafedfm.privacy.audit.common import envelope, source_entry
from ultrafedfm.privacy.audit.findings import Finding, sort_findings
from ultrafedfm.privacy.audit.inversion import (
    first_layer_inversion, masked_upload, one_step_delta, similarity_against_chance, tiny_autoencoder,
)
from ultrafedfm.privacy.audit.onerun import audit_scores
from ultrafedfm.privacy.audit.render import ReportFiles, write_report
from ultrafedfm.privacy.dp import DPConfig, SiteDP, site_ledger_path
from ultrafedfm.privacy.policy import PrivacyPolicy
from ultrafedfm.seeds import mix_seed
from ultrafedfm.train.pretrain import PretrainConfig, build_model, train_local

_logger = logging.getLogger(__name__)

__all__ = ["EmpiricalConfig", "QUICK", "build_site_cache", "canary_run", "empirical_report", "inversion_attacks",
           "run_empirical_audit"]

SITE = "audit-site"


@dataclass(frozen=True)
class EmpiricalConfig:
    """Sizes of the empirical audit (defaults: the full run; :data:`QUICK`: the smoke test).

    Args:
        canaries: ``m``; each is inserted with probability 1/2.
        base_images: the site's own (non-canary) images.
        img_size: image side (the tiny MAE preset's patch is 8 px).
        epochs / batch_size / base_lr: the local training of the audited run.
        target_epsilon / max_grad_norm / accountant: the DP-SGD run's settings (the site plans the noise).
        noise_multiplier: give the noise instead of a target epsilon (the smoke test: no calibration).
        score_masks: random MAE masks each canary's reconstruction error is averaged over.
        guess_counts: the ``k`` guesses each way tried (Bonferroni over them).
        confidence: of the lower bound.
        inversion_targets / inversion_decoys / inversion_lr: the gradient-inversion attack.
        threads: torch CPU threads (1 keeps runs reproducible and the machine responsive).
    """

    canaries: int = 128
    base_images: int = 32
    img_size: int = 32
    epochs: int = 100
    batch_size: int = 16
    base_lr: float = 1.5e-2
    target_epsilon: float = 8.0
    max_grad_norm: float = 1.0
    accountant: str = "rdp"
    noise_multiplier: float | None = None
    score_masks: int = 8
    guess_counts: tuple[int, ...] = (10, 20, 30)
    confidence: float = 0.95
    inversion_targets: int = 5
    inversion_decoys: int = 63
    inversion_lr: float = 0.1
    threads: int = 1


QUICK = EmpiricalConfig(canaries=32, base_images=16, epochs=3, guess_counts=(4, 8), score_masks=4, noise_multiplier=1.0,
                        inversion_targets=3, inversion_decoys=31)


def _smooth_images(rng: np.random.Generator, n: int, size: int) -> list[np.ndarray]:
    """Smooth, low-contrast images (the site's own data): sinusoidal gratings plus a little noise."""
    yy, xx = np.mgrid[0:size, 0:size] / size
    images = []
    for _ in range(n):
        fx, fy, phase = rng.uniform(1, 3), rng.uniform(1, 3), rng.uniform(0, 2 * math.pi)
        img = 0.5 + 0.3 * np.sin(2 * math.pi * (fx * xx + fy * yy) + phase) + 0.05 * rng.standard_normal((size, size))
        images.append(np.clip(img, 0, 1))
    return images


def _canaries(rng: np.random.Generator, m: int, size: int) -> list[np.ndarray]:
    """Uniform-noise canaries: nothing in the site's data predicts them, so a low error means memorised."""
    return [rng.uniform(0, 1, (size, size)) for _ in range(m)]


def _u8(image: np.ndarray) -> np.ndarray:
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def build_site_cache(root: Path, *, base: list[np.ndarray], canaries: list[np.ndarray], included: np.ndarray,
                     size: int) -> Path:
    """A real site cache (the ingest format) holding the site's images and the included canaries."""
    salt = init_cache(root, image_size=size)
    with ManifestWriter(root) as manifest:
        items = [("image", i, img) for i, img in enumerate(base)]
        items += [("canary", i, img) for i, (img, inc) in enumerate(zip(canaries, included)) if inc]
        for kind, i, img in items:
            key = salted_key(salt, "empirical-audit", kind, i)
            write_png(root, image_relpath(key), _u8(img))
            manifest.add(CacheEntry(key=key, instance=key, image=image_relpath(key), source="image"))
    return root


@dataclass
class CanaryRun:
    """One audited training run and what the attack made of it."""

    label: str
    dp: bool
    epsilon_accountant: float | None
    delta: float
    accountant: str | None
    noise_multiplier: float | None
    epsilon_lower_bound: float
    confidence: float
    canaries: int
    inserted: int
    k: int
    guesses: int
    correct: int
    auc: float | None
    steps: int
    seconds: float
    scores: list[float] = field(repr=False, default_factory=list)
    included: list[bool] = field(repr=False, default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data.pop("scores")
        data.pop("included")
        return data


def _pretrain_config(config: EmpiricalConfig, seed: int) -> PretrainConfig:
    return PretrainConfig(preset="tiny", img_size=config.img_size, batch_size=config.batch_size,
                          base_lr=config.base_lr, warmup_epochs=0, epochs=config.epochs, degradations=None,
                          num_workers=0, amp=False, weight_decay=0.0, seed=seed)


def _canary_losses(model, canaries: torch.Tensor, *, masks: int, seed: int) -> np.ndarray:
    """Each canary's reconstruction error under the same ``masks`` random masks (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    total = torch.zeros(canaries.shape[0])
    with torch.no_grad(), torch.random.fork_rng():
        for k in range(masks):
            torch.manual_seed(mix_seed(seed, "score-mask", k, bits=31))
            loss, _, _ = model(canaries, reduction="none")
            total += loss
    model.train(was_training)
    return (total / masks).numpy()


def _auc(scores: np.ndarray, included: np.ndarray) -> float | None:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(included, scores)) if 0 < included.sum() < len(included) else None


def canary_run(work_dir: Path, *, config: EmpiricalConfig, dp: bool, seed: int) -> CanaryRun:
    """Insert canaries into a site cache, train the tiny MAE once (DP-SGD on or off), attack, bound epsilon."""
    rng = np.random.default_rng(mix_seed(seed, "canary-data", bits=63))
    base = _smooth_images(rng, config.base_images, config.img_size)
    canaries = _canaries(rng, config.canaries, config.img_size)
    included = rng.random(config.canaries) < 0.5
    label = "DP-SGD on" if dp else "DP-SGD off"
    cache = build_site_cache(work_dir / ("cache-dp" if dp else "cache-plain"), base=base, canaries=canaries,
                             included=included, size=config.img_size)
    dataset = CacheDataset(cache)
    pretrain = _pretrain_config(config, seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = build_model(pretrain)
    # The attacker holds the canaries as the cache stores them (8 bits), inserted or not.
    canary_batch = torch.stack([torch.from_numpy(_u8(c).astype(np.float32) / 255.0)[None] for c in canaries])
    started = time.perf_counter()
    if dp:
        site_dp = SiteDP(site_name=SITE, policy=PrivacyPolicy(), ledger_path=site_ledger_path(cache))
        noise = {"noise_multiplier": config.noise_multiplier} if config.noise_multiplier is not None else {
            "target_epsilon": config.target_epsilon}
        plan = site_dp.plan(DPConfig(enabled=True, max_grad_norm=config.max_grad_norm, accountant=config.accountant,
                                     **noise),
                            job="empirical_audit", num_images=len(dataset), batch_size=config.batch_size, rounds=1,
                            local_epochs=config.epochs)
        with site_dp.begin_round(plan, job_id=f"empirical-{seed}", round_index=0,
                                 noise_seed=mix_seed(seed, "noise", bits=63),
                                 sampling_seed=mix_seed(seed, "sampling", bits=63)) as dp_round:
            result = train_local(model=model, dataset=dataset, config=pretrain, epochs=config.epochs, device="cpu",
                                 checkpoint_dir=None, resume=False, privatize=dp_round.privatize,
                                 generator_seed=seed, progress=False)
            dp_round.finish()  # the ledger records the round as completed, with the steps Opacus took
        spent = site_dp.spent(f"empirical-{seed}")  # the accountant's figure, from the site's own ledger
        epsilon, delta, accountant, noise = spent.epsilon, spent.delta, spent.accountant, plan.noise_multiplier
    else:
        result = train_local(model=model, dataset=dataset, config=pretrain, epochs=config.epochs, device="cpu",
                             checkpoint_dir=None, resume=False, generator_seed=seed, progress=False)
        epsilon, delta, accountant, noise = None, 1.0 / (10 * len(dataset)), None, None
    seconds = time.perf_counter() - started
    scores = -_canary_losses(model, canary_batch, masks=config.score_masks, seed=seed)
    ks = [k for k in config.guess_counts if k <= config.canaries // 2]
    guess = audit_scores(scores, included, delta=delta, ks=ks, beta=1 - config.confidence)
    _logger.info("%s: %d steps in %.0f s; %d of %d guesses correct, epsilon lower bound %.3f (accountant %s)",
                 label, result.steps, seconds, guess.correct, guess.guesses, guess.epsilon_lower_bound,
                 "unbounded" if epsilon is None else f"{epsilon:.3f}")
    return CanaryRun(label=label, dp=dp, epsilon_accountant=epsilon, delta=delta, accountant=accountant,
                     noise_multiplier=noise, epsilon_lower_bound=guess.epsilon_lower_bound, confidence=config.confidence,
                     canaries=config.canaries, inserted=int(included.sum()), k=guess.k, guesses=guess.guesses,
                     correct=guess.correct, auc=_auc(scores, included), steps=int(result.steps), seconds=seconds,
                     scores=scores.tolist(), included=included.tolist())


def inversion_attacks(*, config: EmpiricalConfig, seed: int) -> list[dict[str, Any]]:
    """The analytic first-layer attack on plain and on masked uploads of one-image steps, against decoys."""
    rng = np.random.default_rng(mix_seed(seed, "inversion-data", bits=63))
    images = _smooth_images(rng, config.inversion_targets + config.inversion_decoys, config.img_size)
    targets, decoys = images[: config.inversion_targets], images[config.inversion_targets:]
    rows: dict[str, list] = {"plain": [], "masked": []}
    masked_bytes = 0
    for t, image in enumerate(targets):
        model = tiny_autoencoder(config.img_size, seed=mix_seed(seed, "inversion-model", t, bits=31))
        delta = one_step_delta(model, torch.from_numpy(image.astype(np.float32))[None], lr=config.inversion_lr)
        rows["plain"].append(similarity_against_chance(
            "plain", first_layer_inversion(delta, config.img_size), image, decoys))
        decoded, masked_bytes = masked_upload(delta, seed=seed + t)
        rows["masked"].append(similarity_against_chance(
            "masked", first_layer_inversion(decoded, config.img_size), image, decoys))
    labels = {"plain": "the plain delta of one upload (no secure aggregation)",
              "masked": "the same site's masked upload (secure aggregation)"}
    return [_summarise(labels[kind], results) for kind, results in rows.items()]


def _summarise(label: str, results: list) -> dict[str, Any]:
    """Mean similarity over the targets; the ranks' one-sided z-test against uniform ranks (chance)."""
    n = results[0].candidates
    ranks = np.array([r.rank for r in results], dtype=np.float64)
    mean_rank, var_rank = (n + 1) / 2, (n * n - 1) / 12
    z = (mean_rank * len(ranks) - ranks.sum()) / math.sqrt(var_rank * len(ranks))
    return {"label": label, "targets": len(results), "similarity": float(np.mean([r.similarity for r in results])),
            "chance_mean": float(np.mean([r.chance_mean for r in results])),
            "chance_sd": float(np.mean([r.chance_sd for r in results])), "rank": float(ranks.mean()),
            "candidates": n, "p_value": float(norm.sf(z)), "per_target": [r.to_json() for r in results]}


_CANARY_METHOD = (
    "Canary membership inference from one training run (Steinke, Nasr and Jagielski, NeurIPS 2023): {m} uniform-noise "
    "canary images, each inserted into the site's cache with probability 1/2; the tiny MAE trained once on the cache "
    "({epochs} local epochs, batch {batch}); each canary scored by the final model's reconstruction error over {masks} "
    "fixed random masks (lower error: guess 'in'). The attacker guesses 'in' for the k best and 'out' for the k worst "
    "scores (k in {ks}, Bonferroni) and the count of correct guesses gives a {conf:.0%} lower bound on epsilon at the "
    "run's delta. DP-SGD on: the site's own plan for target epsilon {target:g}, its ledger charge and the Opacus "
    "privatizer; the accountant's epsilon is read back from that ledger.")
_NOISE_GIVEN = " (Smoke run: noise multiplier {noise:g} given, not calibrated to the target.)"
_INVERSION_METHOD = (
    "Analytic gradient inversion (the first-layer attack of Phong et al. 2017; see Geiping et al. 2020): a tiny "
    "fully connected autoencoder takes one SGD step on one image; the attacker divides the first layer's weight "
    "update by its bias update. Run on the plain delta, and on the same delta masked by a real 3-site "
    "secure-aggregation round (the server decodes the masked vector as it would a plain encoding). Similarity: "
    "Pearson correlation with the true image and with {decoys} decoy images of the same kind; rank 1 = the true image "
    "is the closest; p-value: one-sided test of the ranks over {targets} targets against chance.")


def empirical_report(runs: list[CanaryRun], attacks: list[dict[str, Any]], *, config: EmpiricalConfig, seed: int,
                     quick: bool, sources: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The empirical audit as a report mapping (schema kind ``empirical``), findings first."""
    findings = []
    for run in runs:
        if run.dp and run.epsilon_accountant is not None and run.epsilon_lower_bound > run.epsilon_accountant:
            findings.append(Finding("critical", "lower_bound_above_accountant",
                                    f"{run.label}: the attack proves epsilon >= {run.epsilon_lower_bound:.3f}, above the "
                                    f"accountant's {run.epsilon_accountant:.3f}: DP-SGD or its accounting is broken."))
        if not run.dp and run.epsilon_lower_bound == 0.0:
            findings.append(Finding("info", "attack_without_power",
                                    f"{run.label}: the canary attack proved nothing even without DP (lower bound 0); "
                                    "a longer run (more epochs, more canaries) is needed to show the attack's power."))
    plain = next(a for a in attacks if "plain" in a["label"])
    masked = next(a for a in attacks if "masked" in a["label"])
    # Both a rank test and a similarity far above the decoys': chance alone (fresh masks) almost never gives both.
    if masked["p_value"] < 1e-3 and masked["similarity"] > masked["chance_mean"] + 4 * masked["chance_sd"]:
        findings.append(Finding("critical", "masked_upload_leaks",
                                f"Gradient inversion on the masked upload did better than chance (p = "
                                f"{masked['p_value']:.3g}): the masking is not hiding the update."))
    if plain["p_value"] >= 0.05:
        findings.append(Finding("info", "inversion_without_power",
                                "Gradient inversion did not beat chance even on the plain delta: this run cannot "
                                "show what the masking hides."))
    report = envelope("empirical")
    report["subject"] = {"what": "empirical privacy audit (canaries; gradient inversion)", "seed": seed,
                         "quick": quick, "settings": dataclasses.asdict(config)}
    report["canary_audit"] = {
        "method": _CANARY_METHOD.format(m=config.canaries, epochs=config.epochs, batch=config.batch_size,
                                        masks=config.score_masks, ks=list(config.guess_counts), conf=config.confidence,
                                        target=config.target_epsilon)
        + (_NOISE_GIVEN.format(noise=config.noise_multiplier) if config.noise_multiplier is not None else ""),
        "runs": [r.to_json() for r in runs]}
    report["inversion"] = {"method": _INVERSION_METHOD.format(decoys=config.inversion_decoys,
                                                              targets=config.inversion_targets),
                           "attacks": attacks}
    report["findings"] = [f.to_json() for f in sort_findings(findings)]
    report["sources"] = sources or []
    return {"schema": report.pop("schema"), "schema_version": report.pop("schema_version"), "kind": report.pop("kind"),
            "findings": report.pop("findings"), **report}


def run_empirical_audit(*, out_dir: str | Path, quick: bool = False, seed: int = 0,
                        config: EmpiricalConfig | None = None, work_dir: str | Path | None = None) -> ReportFiles:
    """Run both attacks (DP on and off for the canaries) and write ``report.json`` / ``report.html``."""
    config = config or (QUICK if quick else EmpiricalConfig())
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        with tempfile.TemporaryDirectory(prefix="ufm-empirical-") as tmp:
            work = Path(work_dir) if work_dir is not None else Path(tmp)
            runs = [canary_run(work, config=config, dp=True, seed=seed),
                    canary_run(work, config=config, dp=False, seed=seed)]
            ledger = site_ledger_path(work / "cache-dp")
            sources = [source_entry(ledger, role="the audited run's DP ledger", name="privacy/" + ledger.name)]
            attacks = inversion_attacks(config=config, seed=seed)
    finally:
        torch.set_num_threads(threads)
    return write_report(empirical_report(runs, attacks, config=config, seed=seed, quick=quick, sources=sources),
                        out_dir)
