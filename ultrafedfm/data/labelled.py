"""Labelled ultrasound for fine-tuning and evaluation: an image folder with ``labels.csv``, or a site cache.

Folder format (the one of ``../shared/data/*``): ``labels.csv`` with columns
``file,label,mask,width,height[,group]``; ``file`` and ``mask`` are paths relative to the
folder, ``label`` a class name (may be empty), ``mask`` a lesion mask (0 = background, anything
else = foreground; empty when there is none), ``group`` the unit that must not be split between
train and test (patient, case, clip). Where there is no ``group`` column (BUSI), groups are
derived from the pixels: two images whose 16x16 mean hashes differ in at most 4 bits are
near-duplicates, and near-duplicate pairs are merged with union-find (the rule BUSI's README
gives). A site cache (``ultrafedfm ingest``) carries labels and masks but no groups: they are
derived the same way.

Every image goes through the project's preprocessing once on load: burned-in overlays
(calipers, text) are inpainted by :func:`ultrafedfm.data.preprocess.suppress_overlays` (so no
model learns to read calipers) and the image is letterboxed to ``image_size`` (masks with
nearest neighbour). The result is held in memory as uint8: a few thousand images at 64-224 px.

Example::

    data = load_labelled_folder(Path("../shared/data/busi"), image_size=64, require="label")
    data.classes, data.images.shape      # ('benign', 'malignant', 'normal'), (538, 1, 64, 64)
"""
from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ultrafedfm.data.preprocess import letterbox, suppress_overlays

_logger = logging.getLogger(__name__)

__all__ = [
    "LabelledDataError", "LabelledImages", "LabelledView", "load_labelled_cache", "load_labelled_folder",
    "mean_hash", "near_duplicate_groups",
]

LABELS_FILE = "labels.csv"
Requirement = Literal["label", "mask"] | None
_HASH_SIDE = 16
_HASH_MAX_DISTANCE = 4


class LabelledDataError(ValueError):
    """A labelled folder or cache cannot serve the requested task (the message says what to do)."""


@dataclass
class LabelledImages:
    """Preprocessed images with their labels, masks and groups, in memory.

    Attributes:
        images: (N, 1, S, S) uint8.
        labels: (N,) int64 index into ``classes``; -1 where an image has no label.
        classes: class names (sorted), the meaning of ``labels``.
        masks: (N, 1, S, S) bool, or ``None`` when the source has no masks at all.
        has_mask: (N,) bool, whether image i has a mask (an all-background mask counts).
        groups: N group names; images of one group always land on one side of a split.
        files: N source names (relative paths; cache keys for a cache).
        source: the folder or cache they came from.
        groups_derived: groups came from near-duplicate detection, not from a ``group`` column.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]
    masks: torch.Tensor | None
    has_mask: np.ndarray
    groups: list[str]
    files: list[str]
    source: str
    groups_derived: bool = False

    def __len__(self) -> int:
        return len(self.files)

    @property
    def image_size(self) -> int:
        return int(self.images.shape[-1])

    def label_names(self) -> list[str | None]:
        return [self.classes[i] if i >= 0 else None for i in self.labels.tolist()]

    def require(self, what: Requirement) -> np.ndarray:
        """Indices usable for a task needing ``what``; raises :class:`LabelledDataError` if none."""
        if what is None:
            return np.arange(len(self))
        if what == "label":
            usable = np.flatnonzero(self.labels.numpy() >= 0)
            if usable.size == 0:
                raise LabelledDataError(
                    f"{self.source}: no image has a label (column 'label' of {LABELS_FILE} is empty or missing); "
                    "classification needs one class name per image: fill the 'label' column, or use --task seg "
                    "if the folder has masks")
            return usable
        usable = np.flatnonzero(self.has_mask)
        if usable.size == 0:
            raise LabelledDataError(
                f"{self.source}: no image has a mask (column 'mask' of {LABELS_FILE} is empty or missing); "
                "segmentation needs a mask file per image (0 = background): fill the 'mask' column with the "
                "mask paths, or use --task cls if the folder has labels")
        return usable

    def view(self, indices: Sequence[int], *, task: Literal["cls", "seg"]) -> "LabelledView":
        return LabelledView(self, np.asarray(indices, dtype=np.int64), task=task)


class LabelledView(Dataset):
    """A subset of :class:`LabelledImages` as a torch Dataset for one task.

    Items are ``(image, target)``: image (1, S, S) float32 in [0, 1]; target the class index
    (``cls``) or the mask (1, S, S) float32 in {0, 1} (``seg``).
    """

    def __init__(self, data: LabelledImages, indices: np.ndarray, *, task: Literal["cls", "seg"]):
        if task == "seg" and data.masks is None:
            data.require("mask")
        self.data, self.indices, self.task = data, indices, task

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = int(self.indices[item])
        image = self.data.images[index].float().div_(255.0)
        if self.task == "cls":
            return image, self.data.labels[index]
        return image, self.data.masks[index].float()

    @property
    def groups(self) -> list[str]:
        return [self.data.groups[i] for i in self.indices]

    @property
    def labels(self) -> np.ndarray:
        return self.data.labels.numpy()[self.indices]


def mean_hash(gray: np.ndarray, side: int = _HASH_SIDE) -> np.ndarray:
    """``side*side`` bits: the image shrunk to side x side (area average), each pixel above its mean."""
    small = np.asarray(Image.fromarray(gray).resize((side, side), Image.Resampling.BOX), dtype=np.float32)
    return (small > small.mean()).reshape(-1)


def near_duplicate_groups(hashes: np.ndarray, *, max_distance: int = _HASH_MAX_DISTANCE,
                          prefix: str = "dup") -> list[str]:
    """Group names from mean hashes (N, B) bool: pairs within ``max_distance`` bits are merged (union-find)."""
    n = len(hashes)
    parent = list(range(n))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    bits = hashes.astype(np.int32)
    for start in range(0, n, 512):  # chunks keep the distance matrix small
        block = bits[start:start + 512]
        distance = block @ (1 - bits).T + (1 - block) @ bits.T  # Hamming distance, (b, n)
        for i, j in zip(*np.nonzero(distance <= max_distance)):
            a, b = find(start + int(i)), find(int(j))
            if a != b:
                parent[max(a, b)] = min(a, b)
    return [f"{prefix}{find(i):05d}" for i in range(n)]


def _read_rows(folder: Path) -> tuple[list[dict[str, str]], list[str]]:
    labels = folder / LABELS_FILE
    if not folder.is_dir():
        raise LabelledDataError(f"{folder} is not a folder; pass an image folder with a {LABELS_FILE} "
                                "(columns file,label,mask,width,height[,group]) or --cache CACHE")
    if not labels.is_file():
        raise LabelledDataError(f"{folder} has no {LABELS_FILE}; write one with columns "
                                "file,label,mask,width,height[,group] (paths relative to the folder)")
    with open(labels, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        columns = list(reader.fieldnames or [])
        if "file" not in columns:
            raise LabelledDataError(f"{labels}: no 'file' column (columns: {', '.join(columns) or 'none'}); "
                                    "the header must start file,label,mask,width,height")
        return list(reader), columns


def _load_gray(path: Path, *, what: str, row: int, labels: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise LabelledDataError(f"{labels} row {row}: {what} {path.name} does not exist in {path.parent}") from None
    except (UnidentifiedImageError, OSError) as exc:
        raise LabelledDataError(f"{labels} row {row}: {what} {path} is not a readable image ({exc})") from None


def load_labelled_folder(
    folder: str | Path,
    *,
    image_size: int,
    require: Requirement = None,
    suppress: bool = True,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> LabelledImages:
    """Load an image folder with ``labels.csv`` (see the module docstring).

    Args:
        folder: the folder.
        image_size: side of the letterboxed square images.
        require: ``"label"`` (classification) or ``"mask"`` (segmentation): raise a clear
            :class:`LabelledDataError` when the folder has no such column or no such value.
        suppress: inpaint burned-in overlays (recommended; off only to study their effect).
        cache_dir: keep the preprocessed arrays there (``.npz`` keyed by folder, size and
            ``labels.csv`` content) so a second load is instant.
        progress: tqdm bar.
    """
    folder = Path(folder)
    rows, columns = _read_rows(folder)
    labels_path = folder / LABELS_FILE
    if require == "label" and "label" not in columns:
        raise LabelledDataError(f"{labels_path}: no 'label' column (columns: {', '.join(columns)}); classification "
                                "needs one class name per image: add the column, or use --task seg for masks")
    if require == "mask" and "mask" not in columns:
        raise LabelledDataError(f"{labels_path}: no 'mask' column (columns: {', '.join(columns)}); segmentation "
                                "needs a mask file per image: add the column, or use --task cls for labels")
    if not rows:
        raise LabelledDataError(f"{labels_path} lists no image")
    digest = hashlib.sha256(labels_path.read_bytes() + f"{image_size}/{suppress}/1".encode()).hexdigest()[:16]
    cached = Path(cache_dir) / f"{folder.name}-{image_size}-{digest}.npz" if cache_dir else None
    if cached is not None and cached.is_file():
        arrays = dict(np.load(cached))
    else:
        arrays = _preprocess_rows(folder, rows, image_size=image_size, suppress=suppress, progress=progress)
        if cached is not None:
            cached.parent.mkdir(parents=True, exist_ok=True)
            tmp = cached.with_name(cached.name + ".tmp.npz")
            np.savez_compressed(tmp, **arrays)
            tmp.replace(cached)
    names = [(r.get("label") or "").strip() or None for r in rows]
    if "group" in columns and all((r.get("group") or "").strip() for r in rows):
        groups, derived = [r["group"].strip() for r in rows], False
    else:
        groups, derived = near_duplicate_groups(arrays["hashes"]), True
        _logger.info("%s: no complete 'group' column; %d near-duplicate groups derived from %d images "
                     "(16x16 mean hash, Hamming <= %d)", folder, len(set(groups)), len(rows), _HASH_MAX_DISTANCE)
    data = _assemble(arrays, names=names, groups=groups, files=[r["file"].strip() for r in rows],
                     source=str(folder), derived=derived)
    if require is not None:
        data.require(require)
    return data


def _preprocess_rows(folder: Path, rows: list[dict[str, str]], *, image_size: int, suppress: bool,
                     progress: bool) -> dict[str, np.ndarray]:
    labels_path = folder / LABELS_FILE
    n = len(rows)
    images = np.zeros((n, image_size, image_size), dtype=np.uint8)
    masks = np.zeros((n, image_size, image_size), dtype=bool)
    has_mask = np.zeros(n, dtype=bool)
    hashes = np.zeros((n, _HASH_SIDE * _HASH_SIDE), dtype=bool)
    for i, row in enumerate(tqdm(rows, desc=f"load {folder.name}", unit="image", disable=not progress)):
        rel = (row.get("file") or "").strip()
        if not rel:
            raise LabelledDataError(f"{labels_path} row {i + 2}: empty 'file'")
        gray = _load_gray(folder / rel, what="image", row=i + 2, labels=labels_path)
        hashes[i] = mean_hash(gray)
        if suppress:
            gray, _ = suppress_overlays(gray)
        images[i] = letterbox(gray, image_size)
        mask_rel = (row.get("mask") or "").strip()
        if mask_rel:
            mask = _load_gray(folder / mask_rel, what="mask", row=i + 2, labels=labels_path)
            if mask.shape != gray.shape:
                raise LabelledDataError(f"{labels_path} row {i + 2}: mask {mask_rel} is {mask.shape[1]}x"
                                        f"{mask.shape[0]} but the image is {gray.shape[1]}x{gray.shape[0]}")
            # Any non-zero value is foreground: 0/255 masks and class-index masks (usgra) alike.
            masks[i] = letterbox((mask > 0).astype(np.uint8) * 255, image_size, nearest=True) > 127
            has_mask[i] = True
    return {"images": images, "masks": masks, "has_mask": has_mask, "hashes": hashes}


def _assemble(arrays: dict[str, np.ndarray], *, names: list[str | None], groups: list[str], files: list[str],
              source: str, derived: bool) -> LabelledImages:
    classes = tuple(sorted({n for n in names if n is not None}))
    index = {c: k for k, c in enumerate(classes)}
    labels = torch.tensor([index[n] if n is not None else -1 for n in names], dtype=torch.int64)
    has_mask = arrays["has_mask"].astype(bool)
    masks = torch.from_numpy(arrays["masks"]).unsqueeze(1) if has_mask.any() else None
    return LabelledImages(images=torch.from_numpy(arrays["images"]).unsqueeze(1), labels=labels, classes=classes,
                          masks=masks, has_mask=has_mask, groups=groups, files=files, source=source,
                          groups_derived=derived)


def load_labelled_cache(cache: str | Path, *, image_size: int | None = None, require: Requirement = None,
                        progress: bool = True) -> LabelledImages:
    """A site cache (``ultrafedfm ingest``, already preprocessed) as :class:`LabelledImages`.

    Groups are derived by near-duplicate detection (a cache keeps no patient information).
    """
    from ultrafedfm.data.cache import open_cache

    site = open_cache(cache)
    size = image_size or site.image_size
    n = len(site)
    images = np.zeros((n, size, size), dtype=np.uint8)
    masks = np.zeros((n, size, size), dtype=bool)
    has_mask = np.zeros(n, dtype=bool)
    hashes = np.zeros((n, _HASH_SIDE * _HASH_SIDE), dtype=bool)

    def read(rel: str, *, nearest: bool) -> np.ndarray:
        with Image.open(site.root / rel) as img:
            gray = img.convert("L")
            if gray.size != (size, size):
                gray = gray.resize((size, size), Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR)
            return np.asarray(gray, dtype=np.uint8)

    for i, entry in enumerate(tqdm(site.entries, desc=f"load cache {site.root.name}", unit="image",
                                   disable=not progress)):
        images[i] = read(entry.image, nearest=False)
        hashes[i] = mean_hash(images[i])
        if entry.mask:
            masks[i] = read(entry.mask, nearest=True) > 127
            has_mask[i] = True
    arrays = {"images": images, "masks": masks, "has_mask": has_mask, "hashes": hashes}
    data = _assemble(arrays, names=[e.label for e in site.entries], groups=near_duplicate_groups(hashes),
                     files=[e.key for e in site.entries], source=str(site.root), derived=True)
    if require is not None:
        data.require(require)
    return data
