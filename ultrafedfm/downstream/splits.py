"""Train / validation / test splits grouped by patient-like groups, stratified by label, from a seed.

No group ever lies on two sides of a split (near-duplicate frames of one lesion in train and
test would inflate every metric). Where labels exist the folds are stratified on them with
scikit-learn's ``StratifiedGroupKFold``; otherwise ``GroupKFold`` with shuffling. The same
(groups, labels, fractions, seed) always give the same split.

Example::

    split = grouped_split(data.groups, data.labels.numpy(), seed=0)
    subset = label_fraction_subset(split.train, data.groups, data.labels.numpy(), fraction=0.1, seed=3)
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from sklearn.model_selection import GroupKFold, StratifiedGroupKFold

_logger = logging.getLogger(__name__)

__all__ = ["Split", "grouped_split", "label_fraction_subset"]


@dataclass(frozen=True)
class Split:
    """Sorted index arrays of the three sides."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray

    def to_mapping(self) -> dict[str, list[int]]:
        return {"train": self.train.tolist(), "val": self.val.tolist(), "test": self.test.tolist()}


def _strata(labels: Sequence[int] | None, n: int) -> np.ndarray | None:
    """Labels to stratify on (-1 = unlabelled is a stratum of its own), or None when there are none."""
    if labels is None:
        return None
    strata = np.asarray(labels)
    return strata if len(set(strata.tolist()) - {-1}) >= 1 and len(strata) == n else None


def _one_fold(indices: np.ndarray, groups: np.ndarray, strata: np.ndarray | None, fraction: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``indices`` into (rest, held) with ``held`` about ``fraction`` of them, whole groups only."""
    n_groups = len(set(groups[indices].tolist()))
    n_splits = max(2, min(n_groups, round(1.0 / fraction)))
    if strata is not None:
        # StratifiedGroupKFold needs each stratum present in enough groups; fall back otherwise.
        counts = {s: len(set(groups[indices][strata[indices] == s].tolist())) for s in set(strata[indices].tolist())}
        if min(counts.values()) < 2:
            strata = None
    if strata is not None:
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % 2**32)
        rest, held = next(folds.split(indices, strata[indices], groups[indices]))
    else:
        folds = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed % 2**32)
        rest, held = next(folds.split(indices, groups=groups[indices]))
    return np.sort(indices[rest]), np.sort(indices[held])


def grouped_split(groups: Sequence[str], labels: Sequence[int] | None = None, *, val_fraction: float = 0.15,
                  test_fraction: float = 0.15, seed: int = 0) -> Split:
    """A grouped (and, with ``labels``, stratified) train/val/test split of ``len(groups)`` items.

    Args:
        groups: one group name per item.
        labels: class index per item (-1 = no label), or ``None`` for unstratified.
        val_fraction / test_fraction: approximate shares (whole groups move, so sizes vary).
        seed: fixes the split.
    """
    if not (0 < test_fraction < 1 and 0 < val_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in (0, 1) "
                         "and sum to less than 1")
    group_arr = np.asarray(list(groups))
    if len(set(group_arr.tolist())) < 3:
        raise ValueError(f"a train/val/test split needs at least 3 groups, got {len(set(group_arr.tolist()))}")
    strata = _strata(labels, len(group_arr))
    everything = np.arange(len(group_arr))
    rest, test = _one_fold(everything, group_arr, strata, test_fraction, seed)
    train, val = _one_fold(rest, group_arr, strata, val_fraction / (1.0 - test_fraction), seed + 1)
    return Split(train=train, val=val, test=test)


def label_fraction_subset(train: np.ndarray, groups: Sequence[str], labels: Sequence[int] | None, *,
                          fraction: float, seed: int) -> np.ndarray:
    """About ``fraction`` of the ``train`` items, taken as whole groups, stratified by each group's label.

    Every label present in ``train`` keeps at least one group, so a 10% subset of an
    imbalanced set still has every class. ``fraction == 1`` returns ``train``.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"label fraction must be in (0, 1], got {fraction}")
    if fraction >= 1:
        return np.sort(np.asarray(train))
    group_arr = np.asarray(list(groups))
    label_arr = np.asarray(labels) if labels is not None else np.full(len(group_arr), -1)
    members: dict[str, list[int]] = {}
    for i in train:
        members.setdefault(str(group_arr[i]), []).append(int(i))
    # A group's stratum is its most common label.
    stratum = {g: int(np.bincount(label_arr[idx] + 1).argmax()) - 1 for g, idx in members.items()}
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for s in sorted(set(stratum.values())):
        names = sorted(g for g in members if stratum[g] == s)
        rng.shuffle(names)
        target = max(1, math.ceil(fraction * sum(len(members[g]) for g in names)))
        taken = 0
        for g in names:
            if taken >= target:
                break
            chosen.extend(members[g])
            taken += len(members[g])
    return np.sort(np.asarray(chosen, dtype=np.int64))
