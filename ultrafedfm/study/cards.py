"""Model cards of the study's fine-tuned models (data, preset, training, test metrics with 95% CIs, privacy)."""
from __future__ import annotations

import logging
from typing import Any

from ultrafedfm.models.card import Metric, ModelCard

_logger = logging.getLogger(__name__)

__all__ = ["CITATIONS", "finetuned_card"]

CITATIONS = {
    "busi": "Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. Data in Brief 28:104863 "
            "(2020), doi:10.1016/j.dib.2019.104863",
    "ddti": "Pedraza L, Vargas C, Narvaez F, Duran O, Munoz E, Romero E. An open access thyroid ultrasound image "
            "database. Proc. SPIE 9287, 92870W (2015), doi:10.1117/12.2073532",
}

_ENCODER_PRIVACY = {
    "scratch": "no pretraining",
    "resnet18": "no pretraining (ResNet-18, random initialisation)",
    "central": "encoder pretrained centrally on pooled data (a study baseline; no privacy protection)",
    "central_no_thyroid": "encoder pretrained centrally on pooled data without the thyroid sets",
    "federated": "encoder pretrained federated with secure aggregation; no DP-SGD (epsilon = inf)",
}


def finetuned_card(*, unit: Any, run: Any, preset: Any, data_name: str) -> ModelCard:
    """The card of one fine-tuned study model (``unit``: the study unit, ``run``: its ``FinetuneRun``)."""
    test = run.test
    metrics = {}
    for name, (low, high) in test.intervals.items():
        value = test.metrics.get(name)
        if value is not None:
            metrics[name] = Metric(value=float(value), ci_low=low, ci_high=high, n=len(run.split.test),
                                   dataset=f"{data_name} test split")
    kind = "classifier" if run.spec.task == "cls" else "segmenter"
    backbone = "ResNet-18" if run.spec.arch == "resnet18" else f"ViT ({run.spec.preset}) from the {unit.arm} encoder"
    return ModelCard(
        title=f"UltraFedFM study: {unit.task} {kind}, {backbone}",
        kind=kind, preset=f"{run.spec.preset or run.spec.arch} at {run.spec.img_size} px",
        architecture={"arch": run.spec.arch, "mode": run.spec.mode, **({"blocks": list(run.spec.blocks)}
                                                                        if run.spec.blocks else {})},
        data=(f"{data_name}: {run.train_size} training images ({unit.fraction:.0%} of the training split), "
              f"{len(run.split.val)} validation (model selection), {len(run.split.test)} test; grouped split, "
              f"seed {preset.split_seed}",),
        training=f"fine-tuned ({run.spec.mode}) for {run.fit.total_steps} steps, seed {unit.seed}; kept the step "
                 f"with the best validation {run.fit.metric_name} ({run.fit.best_metric:.3f} at step "
                 f"{run.fit.best_step})",
        privacy=_ENCODER_PRIVACY.get(unit.arm, "not recorded") + "; fine-tuning was centralized on one data set",
        classes=tuple(run.spec.classes), metrics=metrics, citations=(CITATIONS[data_name],),
        notes=("Research use only; not a medical device.",
               f"Images are letterboxed to {run.spec.img_size} px after burned-in overlay suppression; "
               "feed images prepared the same way (ultrafedfm evaluate does)."),
    )
