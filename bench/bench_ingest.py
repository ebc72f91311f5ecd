"""Ingest throughput against a plain ``pydicom.dcmread(f).pixel_array`` loop on the same files.

Replicates pydicom's ultrasound test files (new SOP Instance UIDs) into a temp folder, then
times, side by side in one run:

- ``plain``: ``pydicom.dcmread(f).pixel_array`` for every file, one process (one core);
- ``ingest wN``: ``ingest_dicom_folder`` with N workers into a fresh cache (decode sampled
  frames, colour to gray, crop, overlay suppression, letterbox, PNG write, manifest);
- ``w1 no overlays``: 1 worker with ``suppress_overlays=False`` (what overlay suppression costs);
- ``re-run w1``: the same ingest again (every file already cached: header reads only).

Ratios are files/s over the plain loop's files/s. It also measures overlay suppression:
on generated speckle with burned-in text, calipers and a dotted line (how much of the overlay's
error it removes, how much clean tissue it touches) and, when present, on ../shared/data/busi
(fraction of pixels changed, and of lesion-mask pixels changed). Usage::

    .venv/bin/python bench/bench_ingest.py --files 160 --workers 1 2
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image, ImageDraw
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from scipy import ndimage

from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.preprocess import suppress_overlays

BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"

SINGLE_FRAME = [
    "examples_rgb_color.dcm", "examples_palette.dcm", "examples_jpeg2k.dcm",
    # pydicom-data (used when installed)
    "OBXXXX1A_rle.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "US1_J2KI.dcm", "ExplVR_BigEnd.dcm", "gdcm-US-ALOKA-16.dcm",
]
CINE = ["examples_ybr_color.dcm"]  # 30-frame JPEG loop


def replicate(names: list[str], count: int, folder: Path) -> list[Path]:
    """``count`` copies of the named test files, cycled, each with a new SOP Instance UID."""
    sources = [p for p in (get_testdata_file(n, download=False) for n in names) if p]
    folder.mkdir(parents=True)
    files = []
    for i in range(count):
        ds = pydicom.dcmread(sources[i % len(sources)])
        ds.SOPInstanceUID = generate_uid()
        path = folder / f"{i // 50:03d}" / f"IM{i:05d}"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path)
        files.append(path)
    return files


def plain_loop(files: list[Path]) -> float:
    start = time.perf_counter()
    for f in files:
        pydicom.dcmread(f).pixel_array
    return time.perf_counter() - start


def ingest_once(source: Path, cache: Path, workers: int, config: IngestConfig) -> tuple[float, int]:
    start = time.perf_counter()
    summary = ingest_dicom_folder(source=source, cache=cache, config=config, workers=workers, progress=False)
    return time.perf_counter() - start, summary.images_written


def speckle_with_overlays(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(clean speckle, the same with burned-in text/calipers/dotted line, overlay mask)."""
    rng = np.random.default_rng(seed)
    shape = (240, 320)
    field = rng.rayleigh(1.0, shape) * ndimage.gaussian_filter(rng.random(shape), 8) * 4
    for y in rng.integers(20, 220, 3):
        field[y:y + 3] *= 4  # bright smooth interfaces: tissue
    echo = ndimage.gaussian_filter(field, sigma=(0.7, 1.2))
    clean = (255 * np.log1p(echo) / np.log1p(echo).max()).clip(0, 255).astype(np.uint8)
    canvas, mask = Image.fromarray(clean), Image.new("L", (320, 240), 0)
    x, y = (int(v) for v in rng.integers(5, 150, 2))
    for draw in (ImageDraw.Draw(canvas), ImageDraw.Draw(mask)):
        draw.text((x, y), "RT BREAST 3CM", fill=255)
        draw.text((200, 215), "MI 1.1 TIS 0.4", fill=255)
        for cx, cy in ((100, 100), (180, 150)):
            draw.line([(cx - 4, cy), (cx + 4, cy)], fill=255)
            draw.line([(cx, cy - 4), (cx, cy + 4)], fill=255)
        for px in range(104, 176, 6):
            draw.point([(px, 100 + (px - 100) * 50 // 80)], fill=255)
    return clean, np.asarray(canvas).copy(), np.asarray(mask) > 0


def measure_overlays(count: int) -> None:
    removed, touched = [], []
    for seed in range(count):
        clean, burned, overlay = speckle_with_overlays(seed)
        out, _ = suppress_overlays(burned)
        before = np.abs(burned.astype(int) - clean)[overlay].mean()
        removed.append(1 - np.abs(out.astype(int) - clean)[overlay].mean() / before)
        away = ~ndimage.binary_dilation(overlay, iterations=3)
        touched.append((out != burned)[away].mean())
    print(f"overlays, generated ({count} images): overlay error removed {np.mean(removed):.1%}, "
          f"clean tissue pixels changed {np.mean(touched):.3%}")
    if not (BUSI / "labels.csv").is_file():
        return
    with open(BUSI / "labels.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    changed, lesion = [], []
    start = time.perf_counter()
    for row in rows:
        gray = np.asarray(Image.open(BUSI / row["file"]).convert("L"))
        out, fraction = suppress_overlays(gray)
        changed.append(fraction)
        if row["mask"]:
            mask = np.asarray(Image.open(BUSI / row["mask"]).convert("L")) > 127
            lesion.append(((out != gray) & mask).sum() / max(mask.sum(), 1))
    ms = (time.perf_counter() - start) / len(rows) * 1000
    print(f"overlays, BUSI ({len(rows)} images, {ms:.1f} ms each): pixels changed mean {np.mean(changed):.2%} "
          f"(p95 {np.percentile(changed, 95):.2%}), images touched {np.mean(np.array(changed) > 0):.0%}, "
          f"lesion pixels changed mean {np.mean(lesion):.2%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=160, help="files per file set")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings")
    parser.add_argument("--overlay-images", type=int, default=20, help="generated images for the overlay measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    config = IngestConfig(image_size=args.image_size)
    measure_overlays(args.overlay_images)
    print(f"cpu cores: {os.cpu_count()}, files per set: {args.files}, image_size: {args.image_size}")
    print(f"{'file set':<14} {'method':<15} {'files/s':>9} {'images/s':>9} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, names in (("single-frame", SINGLE_FRAME), ("with cine", SINGLE_FRAME + CINE)):
            source = Path(tmp) / label.replace(" ", "_")
            files = replicate(names, args.files, source)
            # Interleave the methods in each repeat so that load from other processes hits all alike.
            methods = {f"ingest w{w}": (w, config) for w in args.workers}
            methods["w1 no overlays"] = (1, dataclasses.replace(config, suppress_overlays=False))
            best = dict.fromkeys(["plain", *methods], float("inf"))
            images = 0
            for r in range(args.repeats):
                best["plain"] = min(best["plain"], plain_loop(files))
                for i, (name, (workers, cfg)) in enumerate(methods.items()):
                    seconds, images = ingest_once(source, Path(tmp) / f"cache_{i}_{r}", workers, cfg)
                    best[name] = min(best[name], seconds)
            base = len(files) / best["plain"]
            print(f"{label:<14} {'plain':<15} {base:9.1f} {'':>9} {1.0:7.2f}")
            for name in methods:
                rate = len(files) / best[name]
                print(f"{label:<14} {name:<15} {rate:9.1f} {images / best[name]:9.1f} {rate / base:7.2f}")
            seconds, _ = ingest_once(source, Path(tmp) / "cache_0_0", 1, config)
            print(f"{label:<14} {'re-run w1':<15} {len(files) / seconds:9.1f} {'':>9} {len(files) / seconds / base:7.2f}")
            shutil.rmtree(source)


if __name__ == "__main__":
    main()
