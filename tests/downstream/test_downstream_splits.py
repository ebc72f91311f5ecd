"""Splits: grouped (no group on two sides), stratified, reproducible; label fractions; near-duplicate groups."""
from __future__ import annotations

import numpy as np

from ultrafedfm.data.labelled import load_labelled_folder, mean_hash, near_duplicate_groups
from ultrafedfm.downstream.splits import grouped_split, label_fraction_subset


def _dataset(seed: int = 0, n_groups: int = 120):
    rng = np.random.default_rng(seed)
    groups, labels = [], []
    for g in range(n_groups):
        label = int(rng.choice(3, p=[0.55, 0.3, 0.15]))
        for _ in range(int(rng.integers(1, 4))):
            groups.append(f"g{g}")
            labels.append(label)
    return groups, np.asarray(labels)


def test_split_keeps_every_group_on_one_side_and_covers_everything():
    groups, labels = _dataset()
    split = grouped_split(groups, labels, seed=3)
    sides = [set(np.asarray(groups)[s]) for s in (split.train, split.val, split.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])
    assert sorted(np.concatenate([split.train, split.val, split.test]).tolist()) == list(range(len(groups)))


def test_split_is_stratified_by_label():
    groups, labels = _dataset(n_groups=300)
    split = grouped_split(groups, labels, seed=0)
    overall = np.bincount(labels, minlength=3) / len(labels)
    for side in (split.train, split.val, split.test):
        share = np.bincount(labels[side], minlength=3) / len(side)
        assert np.abs(share - overall).max() < 0.06, (share, overall)
    assert 0.1 < len(split.test) / len(labels) < 0.2 and 0.1 < len(split.val) / len(labels) < 0.2


def test_split_is_reproducible_from_its_seed():
    groups, labels = _dataset()
    a, b = grouped_split(groups, labels, seed=5), grouped_split(groups, labels, seed=5)
    c = grouped_split(groups, labels, seed=6)
    assert a.to_mapping() == b.to_mapping()
    assert a.to_mapping() != c.to_mapping()


def test_split_without_labels_is_still_grouped():
    groups, _ = _dataset()
    split = grouped_split(groups, None, seed=1)
    g = np.asarray(groups)
    assert not set(g[split.train]) & set(g[split.test])


def test_label_fraction_takes_whole_groups_and_keeps_every_class():
    groups, labels = _dataset(n_groups=200)
    split = grouped_split(groups, labels, seed=0)
    subset = label_fraction_subset(split.train, groups, labels, fraction=0.1, seed=2)
    g = np.asarray(groups)
    chosen = set(g[subset])
    whole = [i for i in split.train if g[i] in chosen]
    assert sorted(whole) == subset.tolist()  # a chosen group comes with all its images
    assert set(labels[subset]) == set(labels[split.train])
    assert 0.07 < len(subset) / len(split.train) < 0.2
    assert label_fraction_subset(split.train, groups, labels, fraction=0.1, seed=2).tolist() == subset.tolist()
    assert label_fraction_subset(split.train, groups, labels, fraction=1.0, seed=2).tolist() == split.train.tolist()


def test_near_duplicates_share_a_group_and_distinct_images_do_not():
    rng = np.random.default_rng(0)
    base = [rng.integers(0, 255, (48, 48), dtype=np.uint8) for _ in range(4)]
    copy = np.clip(base[0].astype(int) + 3, 0, 255).astype(np.uint8)  # a brighter re-export
    hashes = np.stack([mean_hash(img) for img in [*base, copy]])
    groups = near_duplicate_groups(hashes)
    assert groups[4] == groups[0]
    assert len(set(groups[:4])) == 4


def test_folder_without_group_column_gets_near_duplicate_groups(lesion_folder):
    data = load_labelled_folder(lesion_folder, image_size=32, progress=False)
    # The generated folder exports every frame twice: 72 images, 36 near-duplicate pairs.
    assert data.groups_derived is False  # it has a group column...
    derived = load_labelled_folder(_without_group(lesion_folder), image_size=32, progress=False)
    assert derived.groups_derived and len(set(derived.groups)) == 36
    split = grouped_split(derived.groups, derived.labels.numpy(), seed=0)
    assert not set(np.asarray(derived.groups)[split.train]) & set(np.asarray(derived.groups)[split.test])


def _without_group(folder):
    import csv

    out = folder.parent / (folder.name + "_nogroup")
    if not out.exists():
        out.mkdir()
        (out / "images").symlink_to(folder / "images")
        with open(folder / "labels.csv", newline="") as f, open(out / "labels.csv", "w", newline="") as g:
            reader = csv.DictReader(f)
            writer = csv.DictWriter(g, fieldnames=[c for c in reader.fieldnames if c != "group"])
            writer.writeheader()
            for row in reader:
                writer.writerow({k: v for k, v in row.items() if k != "group"})
    return out


def test_busi_groups_are_derived_and_split_without_crossing(busi):
    data = load_labelled_folder(busi, image_size=32, progress=False)
    assert data.groups_derived
    assert 400 < len(set(data.groups)) < len(data)  # near-duplicates exist in BUSI and are merged
    split = grouped_split(data.groups, data.labels.numpy(), seed=0)
    g = np.asarray(data.groups)
    assert not set(g[split.train]) & (set(g[split.val]) | set(g[split.test]))
