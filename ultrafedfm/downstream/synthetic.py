"""Generated lesions in the shared-data folder format (``labels.csv`` + PNGs + masks), and in memory.

Benign, malignant and normal B-mode frames from :mod:`ultrafedfm.data.synth` (known masks and
labels) for tests, the study's smoke preset and the demo's linear probe. ``repeats`` exports
each frame more than once (slightly brighter, a little noise): near-copies that a grouped split
must keep together, as in BUSI.
"""
from __future__ import annotations

import csv
import logging
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

from ultrafedfm.data.preprocess import crop, find_imaging_box, letterbox
from ultrafedfm.data.synth import default_site_profiles, render_bmode
from ultrafedfm.data.synth.profiles import with_image_size

_logger = logging.getLogger(__name__)

__all__ = ["render_lesions", "write_labelled_folder"]


def render_lesions(*, n: int, seed: int, classes: Sequence[str] = ("benign", "malignant"), n_sites: int = 3,
                   frame: tuple[int, int] = (128, 160), size: int | None = None, repeats: int = 1
                   ) -> tuple[np.ndarray | list[np.ndarray], np.ndarray | list[np.ndarray], list[str], list[int]]:
    """``n`` frames cycling through ``classes`` and ``n_sites`` scanner profiles drawn from ``seed``.

    Frames are cropped to their scan area (as public data sets come). Returns images (a list of
    (H, W) uint8, or with ``size`` an (n, size, size) array of letterboxed frames), masks likewise
    (bool), labels and frame ids. With ``repeats`` > 1 each frame is exported that many times
    (4 % brighter, a little noise): near-duplicates sharing one id, as BUSI has them.
    """
    profiles = [with_image_size(p, frame) for p in default_site_profiles(n_sites, seed=seed)]
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x1E5,)))
    images, masks, labels, scenes = [], [], [], []
    index = 0
    while len(images) < n:
        kind = classes[index % len(classes)]
        image, mask = render_bmode(rng=rng, profile=profiles[index % len(profiles)], lesion=kind)
        # Keep the scan area only, as public data sets ship their images.
        box = find_imaging_box([image])
        image, mask = crop(image, box), crop(mask, box)
        for copy in range(repeats):
            if len(images) >= n:
                break
            if copy:  # a near-copy: the same frame exported again, slightly brighter, with a little noise
                noise = rng.normal(0.0, 2.0, image.shape)
                image = np.clip(image.astype(np.float64) * 1.04 + noise, 0, 255).astype(np.uint8)
            out_image, out_mask = image, mask
            if size is not None:
                out_image = letterbox(image, size)
                out_mask = letterbox(mask.astype(np.uint8) * 255, size, nearest=True) > 127
            images.append(out_image)
            masks.append(out_mask)
            labels.append(kind)
            scenes.append(index)
        index += 1
    if size is not None:
        return np.stack(images), np.stack(masks), labels, scenes
    return images, masks, labels, scenes


def write_labelled_folder(out: str | Path, *, n: int, seed: int,
                          classes: Sequence[str] = ("benign", "malignant", "normal"), group_column: bool = True,
                          masks: bool = True, labels: bool = True, repeats: int = 2,
                          frame: tuple[int, int] = (128, 144)) -> Path:
    """Write ``n`` generated images as ``out/labels.csv`` + ``images/*.png`` (+ ``*_mask.png``).

    Columns ``file,label,mask,width,height`` (+ ``group`` = the scene, when ``group_column``);
    ``labels=False`` leaves ``label`` empty, ``masks=False`` leaves ``mask`` empty (normal images
    never have a mask file, as in BUSI).
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    images, lesion_masks, names, scenes = render_lesions(n=n, seed=seed, classes=classes, frame=frame,
                                                         repeats=repeats)
    columns = ["file", "label", "mask", "width", "height"] + (["group"] if group_column else [])
    with open(out / "labels.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(columns)
        for i, (image, mask, name, scene) in enumerate(zip(images, lesion_masks, names, scenes)):
            rel = f"images/{name}_{i:04d}.png"
            Image.fromarray(image).save(out / rel)
            mask_rel = ""
            if masks and name != "normal":
                mask_rel = f"images/{name}_{i:04d}_mask.png"
                Image.fromarray(mask.astype(np.uint8) * 255).save(out / mask_rel)
            row = [rel, name if labels else "", mask_rel, image.shape[1], image.shape[0]]
            writer.writerow(row + ([f"scene_{scene:04d}"] if group_column else []))
    return out
