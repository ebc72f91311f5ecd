"""What an encoder is worth, in one number: a linear probe on held-out generated lesions, beside a random encoder.

Both encoders (the one in ``encoder_file`` and a randomly initialised one of the same
architecture) are frozen; their average-pooled features of generated benign and malignant
B-mode frames -- from scanner profiles and a seed the demo's pretraining sites never used --
feed a logistic regression (scikit-learn) fitted on one half and scored (AUROC, bootstrap 95%
interval) on the other. A pretrained encoder earns its keep if its probe beats the random one.

Example (the end of ``ultrafedfm demo``)::

    result = linear_probe_comparison(run_dir / "encoder.safetensors")
    print(format_probe_comparison(result))
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrafedfm.downstream.metrics import bootstrap_ci, rank_auroc
from ultrafedfm.downstream.synthetic import render_lesions
from ultrafedfm.models.downstream.encoder import EncoderWeights, create_vit, load_encoder, scratch_encoder

_logger = logging.getLogger(__name__)

__all__ = ["encoder_features", "format_probe_comparison", "linear_probe_comparison"]

# Scanner profiles and scenes of the probe come from this seed offset: never the demo's sites (seeds 0..).
_HELD_OUT_SEED = 7_919


@torch.no_grad()
def encoder_features(weights: EncoderWeights, images: np.ndarray, *, batch_size: int = 64) -> np.ndarray:
    """Average-pooled (final-normed) token features (N, D) of uint8 images (N, S, S)."""
    vit = create_vit(weights, timm_model=weights.timm_model, timm_kwargs=weights.timm_kwargs, num_classes=0).eval()
    feats = []
    for start in range(0, len(images), batch_size):
        batch = torch.from_numpy(images[start:start + batch_size]).float().div_(255.0).unsqueeze(1)
        feats.append(vit(batch))
    return torch.cat(feats).numpy()


def _probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *, seed: int
           ) -> dict[str, Any]:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=5000, C=0.1))
    clf.fit(train_x, train_y)
    score = clf.predict_proba(test_x)[:, 1]
    positive = test_y == 1
    low, high = bootstrap_ci(lambda idx: rank_auroc(positive[idx], score[idx]), len(test_y), n_boot=1000, seed=seed)
    return {"auroc": float(roc_auc_score(positive, score)), "ci95": [low, high]}


def linear_probe_comparison(encoder_file: str | Path, *, n_train: int = 240, n_test: int = 240, seed: int = 0,
                            n_sites: int = 3) -> dict[str, Any]:
    """Linear-probe AUROC (benign vs malignant, generated, held-out scanners) of ``encoder_file`` and of a
    randomly initialised encoder of the same architecture.

    Args:
        encoder_file: ``encoder.safetensors`` / ``encoder.pth`` (+ its ``.json``) or ``final_model.pt``.
        n_train / n_test: generated frames to fit / score the probe (half benign, half malignant).
        seed: which held-out lesions, and the random encoder's initialisation.

    Returns:
        ``{"pretrained": {"auroc", "ci95"}, "random_init": {...}, "gain": pretrained - random,
        "n_train", "n_test", "task", "encoder"}``.
    """
    weights = load_encoder(encoder_file)
    size = weights.img_size
    images, _, labels, _ = render_lesions(n=n_train + n_test, seed=_HELD_OUT_SEED + seed, n_sites=n_sites, size=size)
    y = np.asarray([1 if name == "malignant" else 0 for name in labels])
    order = np.random.default_rng(seed).permutation(len(y))
    train, test = order[:n_train], order[n_train:]
    random_weights = scratch_encoder(weights.preset, img_size=size, seed=_HELD_OUT_SEED + seed)
    result: dict[str, Any] = {"task": "benign vs malignant, generated lesions from held-out scanner profiles",
                              "encoder": str(encoder_file), "n_train": int(n_train), "n_test": int(n_test)}
    for name, w in (("pretrained", weights), ("random_init", random_weights)):
        feats = encoder_features(w, images)
        result[name] = _probe(feats[train], y[train], feats[test], y[test], seed=seed)
    result["gain"] = result["pretrained"]["auroc"] - result["random_init"]["auroc"]
    _logger.info("linear probe AUROC: pretrained %.3f, random init %.3f", result["pretrained"]["auroc"],
                 result["random_init"]["auroc"])
    return result


def format_probe_comparison(result: dict[str, Any]) -> str:
    """Three lines for a terminal."""
    def line(name: str, label: str) -> str:
        r = result[name]
        return f"  {label:<22} AUROC {r['auroc']:.3f}  (95% CI {r['ci95'][0]:.3f}-{r['ci95'][1]:.3f})"

    return "\n".join([
        f"linear probe, {result['task']} ({result['n_train']} train / {result['n_test']} test):",
        line("pretrained", "federated encoder"),
        line("random_init", "random-init encoder"),
    ])
