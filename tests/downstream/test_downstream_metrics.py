"""Metrics against hand-computed values: AUROC, Dice/IoU, HD95, partial-class evaluation, intervals."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from ultrafedfm.downstream.metrics import (
    binary_auroc, bootstrap_ci, classification_metrics, rank_auroc, segmentation_case_metrics, summarise_segmentation,
)

CLASSES = ("benign", "malignant", "normal")


def test_auroc_of_a_small_case_matches_the_hand_count():
    # Pairs (positive, negative): (0.35 > 0.1), (0.35 < 0.4), (0.8 > 0.1), (0.8 > 0.4) -> 3 of 4 ordered right.
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1, 0.0], [0.6, 0.4, 0.0], [0.65, 0.35, 0.0], [0.2, 0.8, 0.0]])
    out = classification_metrics(y, probs, CLASSES)
    assert out["auroc/malignant"] == pytest.approx(0.75)
    assert out["auroc/benign"] == pytest.approx(0.75)
    assert out["auroc_binary"] == pytest.approx(0.75)  # two classes present: malignant vs benign
    assert out["accuracy"] == pytest.approx(0.75)  # argmax: benign, benign, benign, malignant
    assert out["sensitivity/malignant"] == pytest.approx(0.5) and out["specificity/malignant"] == pytest.approx(1.0)


def test_three_class_macro_auroc_is_the_mean_over_classes():
    y = np.array([0, 1, 2, 0, 1, 2])
    probs = np.array([[.8, .1, .1], [.3, .6, .1], [.2, .2, .6], [.4, .5, .1], [.5, .4, .1], [.1, .1, .8]])
    out = classification_metrics(y, probs, CLASSES)
    per_class = [roc_auc_score(y == k, probs[:, k]) for k in range(3)]
    assert out["auroc_macro"] == pytest.approx(np.mean(per_class))
    assert out["auroc/benign"] == pytest.approx(per_class[0])


def test_binary_auroc_uses_probabilities_renormalised_over_the_two_classes():
    # A 3-class model on a folder without normals: p(m) / (p(b) + p(m)) orders the cases, not p(m) alone.
    y = np.array([0, 1])
    probs = np.array([[0.10, 0.20, 0.70],   # m/(b+m) = 0.667
                      [0.45, 0.55, 0.00]])  # m/(b+m) = 0.55, yet larger raw p(m)
    assert binary_auroc(y, probs, negative=0, positive=1) == pytest.approx(0.0)
    out = classification_metrics(y, probs, CLASSES, pairs=[("benign", "malignant")])
    assert out["auroc/benign_vs_malignant"] == pytest.approx(0.0)
    assert "auroc/normal" not in out  # normal is absent from the folder


def test_rank_auroc_equals_scikit_learn_with_ties():
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    score = np.round(rng.random(200) + 0.3 * y, 1)  # many ties
    assert rank_auroc(y, score) == pytest.approx(roc_auc_score(y, score))


def _square(side: int, x0: int, y0: int, size: int = 40) -> torch.Tensor:
    mask = torch.zeros(1, 1, size, size)
    mask[..., y0:y0 + side, x0:x0 + side] = 1
    return mask


def test_dice_and_iou_of_identical_and_disjoint_masks():
    a = _square(6, 2, 2)
    disjoint = _square(6, 20, 20)
    same = segmentation_case_metrics(a, a)
    apart = segmentation_case_metrics(a, disjoint)
    assert same["dice"][0] == pytest.approx(1.0) and same["iou"][0] == pytest.approx(1.0)
    assert apart["dice"][0] == pytest.approx(0.0) and apart["iou"][0] == pytest.approx(0.0)


def test_dice_of_half_overlapping_squares():
    # 4x4 squares overlapping in 2 columns: |A n B| = 8, Dice = 2*8/32 = 0.5, IoU = 8/24.
    out = segmentation_case_metrics(_square(4, 0, 0), _square(4, 2, 0))
    assert out["dice"][0] == pytest.approx(0.5)
    assert out["iou"][0] == pytest.approx(8 / 24)


def test_hd95_of_squares_shifted_by_more_than_their_side_is_the_shift():
    # Every boundary pixel of one 5x5 square is 8..12 px from the other square's boundary along x;
    # the far column (12 px) holds more than 5 % of the boundary, so the 95th percentile is 12.
    out = segmentation_case_metrics(_square(5, 2, 10), _square(5, 14, 10))
    assert out["hd95"][0] == pytest.approx(12.0)
    assert segmentation_case_metrics(_square(5, 2, 10), _square(5, 2, 10))["hd95"][0] == pytest.approx(0.0)


def test_empty_reference_has_no_dice_and_empty_prediction_is_counted():
    empty = torch.zeros(1, 1, 40, 40)
    lesion = _square(6, 5, 5)
    cases = segmentation_case_metrics(torch.cat([empty, lesion]), torch.cat([lesion, empty]))
    assert cases["dice"][0] == pytest.approx(0.0) and math.isnan(cases["hd95"][0])
    assert math.isnan(cases["dice"][1])  # no reference lesion: Dice undefined
    summary = summarise_segmentation(cases)
    assert summary["n"] == 1 and summary["empty_predictions"] == 1


def test_bootstrap_interval_brackets_the_value_and_moves_whole_groups():
    values = np.array([0.0, 1.0, 1.0, 1.0, 0.0, 1.0])
    low, high = bootstrap_ci(lambda idx: float(values[idx].mean()), len(values), n_boot=500, seed=1)
    assert low <= values.mean() <= high and low < high
    # Two groups of identical values: every resample's mean is 0, 0.5 or 1.
    groups = ["a", "a", "a", "b", "b", "b"]
    vals = np.array([0, 0, 0, 1, 1, 1], dtype=float)
    seen = set()
    bootstrap_ci(lambda idx: seen.add(round(float(vals[idx].mean()), 6)) or 0.0, 6, groups=groups, n_boot=200)
    assert seen <= {0.0, 0.5, 1.0}
