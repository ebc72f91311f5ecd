"""The site cache as a torch Dataset, and image-folder ingest (labels and masks kept)."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ultrafedfm.data.cache import CacheDataset, CacheNotFoundError, open_cache
from ultrafedfm.data.ingest import ingest_image_folder
from ultrafedfm.data.ingest_config import IngestConfig

BUSI = Path(__file__).resolve().parents[3] / "shared" / "data" / "busi"


def _image_folder(root: Path) -> Path:
    """Three speckle PNGs (two with a square lesion mask) and a labels.csv in the BUSI format."""
    rng = np.random.default_rng(0)
    rows = []
    for i, (label, has_mask) in enumerate([("benign", True), ("malignant", True), ("normal", False)]):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        image = (rng.rayleigh(40, (60, 100)).clip(0, 255)).astype(np.uint8)
        Image.fromarray(image).save(folder / f"{label} ({i}).png")
        mask_rel = ""
        if has_mask:
            mask = np.zeros((60, 100), dtype=np.uint8)
            mask[20:40, 40:60] = 255
            Image.fromarray(mask).save(folder / f"{label} ({i})_mask.png")
            mask_rel = f"{label}/{label} ({i})_mask.png"
        rows.append({"file": f"{label}/{label} ({i}).png", "label": label, "mask": mask_rel, "width": 100, "height": 60})
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["file", "label", "mask", "width", "height"])
        writer.writeheader()
        writer.writerows(rows)
    return root


def test_image_folder_ingest_keeps_labels_and_masks(tmp_path):
    src = _image_folder(tmp_path / "images")
    summary = ingest_image_folder(source=src, cache=tmp_path / "cache", config=IngestConfig(image_size=50), progress=False)
    assert (summary.added, summary.images_written, summary.rejected) == (3, 3, {})
    dataset = CacheDataset(tmp_path / "cache")
    assert sorted(dataset.labels) == ["benign", "malignant", "normal"]
    for i, label in enumerate(dataset.labels):
        mask = dataset.mask(i)
        if label == "normal":
            assert mask is None
            continue
        assert mask.shape == (1, 50, 50) and set(mask.unique().tolist()) == {0.0, 1.0}
        # 100x60 letterboxed to 50: scale 0.5, 10 rows of padding on top; lesion rows 20..40 -> 20..30.
        rows = torch.nonzero(mask[0].sum(dim=1)).flatten()
        cols = torch.nonzero(mask[0].sum(dim=0)).flatten()
        assert (rows.min().item(), rows.max().item()) == (20, 29)
        assert (cols.min().item(), cols.max().item()) == (20, 29)
    again = ingest_image_folder(source=src, cache=tmp_path / "cache", config=IngestConfig(image_size=50), progress=False)
    assert (again.added, again.skipped_existing) == (0, 3)


def test_image_folder_problems_are_reported(tmp_path):
    src = _image_folder(tmp_path / "images")
    (src / "benign" / "benign (0).png").write_bytes(b"not a png")
    (src / "malignant" / "malignant (1).png").unlink()
    summary = ingest_image_folder(source=src, cache=tmp_path / "cache", config=IngestConfig(image_size=32), progress=False)
    assert summary.added == 1
    assert summary.rejected == {"truncated_or_corrupt": 1, "unreadable": 1}


def test_dataset_items_are_unit_range_single_channel_and_resized_on_load(tmp_path):
    src = _image_folder(tmp_path / "images")
    ingest_image_folder(source=src, cache=tmp_path / "cache", config=IngestConfig(image_size=48), progress=False)
    native = CacheDataset(tmp_path / "cache")
    assert len(native) == 3
    item = native[0]
    assert item.dtype == torch.float32 and item.shape == (1, 48, 48)
    assert 0.0 <= item.min().item() and item.max().item() <= 1.0 and item.max().item() > 0.1
    resized = CacheDataset(tmp_path / "cache", image_size=32)
    doubled = CacheDataset(tmp_path / "cache", image_size=32, transform=lambda x: x * 2)
    assert resized[0].shape == (1, 32, 32)
    assert torch.allclose(doubled[0], resized[0] * 2)  # the transform runs after loading and resizing
    assert open_cache(tmp_path / "cache").image_size == 48


def test_missing_or_empty_cache_says_how_to_build_it(tmp_path):
    with pytest.raises(CacheNotFoundError, match="ultrafedfm ingest"):
        CacheDataset(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cache.json").write_text(json.dumps({"format": 1, "image_size": 32}))
    with pytest.raises(CacheNotFoundError, match="ultrafedfm ingest"):
        open_cache(tmp_path / "empty")


@pytest.mark.skipif(not (BUSI / "labels.csv").is_file(), reason="../shared/data/busi is not present")
def test_busi_subset_ingests_with_labels_and_masks(tmp_path):
    with open(BUSI / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    subset = [next(r for r in rows if r["label"] == label) for label in ("benign", "malignant", "normal")]
    src = tmp_path / "busi"
    for row in subset:
        for rel in (row["file"], row["mask"]):
            if rel:
                (src / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(BUSI / rel, src / rel)
    with open(src / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(subset)
    summary = ingest_image_folder(source=src, cache=tmp_path / "cache", config=IngestConfig(image_size=64), progress=False)
    assert (summary.added, summary.rejected) == (3, {})
    dataset = CacheDataset(tmp_path / "cache")
    assert sorted(dataset.labels) == ["benign", "malignant", "normal"]
    masks = [dataset.mask(i) for i in range(3)]
    assert sum(m is not None for m in masks) == 2
    assert all(m.sum() > 0 for m in masks if m is not None)
