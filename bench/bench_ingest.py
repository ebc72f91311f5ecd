"""Ingest throughput against a plain ``pydicom.dcmread(f).pixel_array`` loop on the same files.

Replicates pydicom's ultrasound test files (new SOP Instance UIDs) into a temp folder, then
times, interleaved in each repeat (the order rotates, so load from other processes on a shared
machine hits every method alike):

- ``plain``: ``pydicom.dcmread(f).pixel_array`` for every file, one process (one core);
- ``ingest wN``: ``ingest_dicom_folder`` with N workers into a fresh cache (decode sampled
  frames, colour to gray, crop, overlay suppression, letterbox, PNG write, manifest);
- ``w1 no overlays``: 1 worker with ``suppress_overlays=False`` (what overlay suppression costs);
- ``w1 floor``: 1 worker, no overlay suppression and ``crop: none`` (decode, gray, letterbox,
  PNG and manifest only: the least an ingest does);
- ``re-run w1``: the same ingest again (every file already cached: header reads only).

Each row gives the median over the repeats of files/s (wall clock) and of CPU ms per file
(this process and its worker processes); ``ratio`` is the median over the repeats of that
repeat's rate over the plain loop's rate in the same repeat, by wall clock and by CPU time. The
CPU ratio is the per-core figure: it does not move when other jobs share the cores.

It also measures overlay suppression on generated speckle with burned-in text, calipers and a
dotted line (how much of the overlay's error it removes, how much clean tissue it touches), both
at full resolution (``suppress_overlays``) and through the ingest path (``prepare_frames`` at
``--image-size``, against the clean image letterboxed the same way), and, when present, on
../shared/data/busi (fraction of pixels changed, and of lesion-mask pixels changed). Usage::

    .venv/bin/python bench/bench_ingest.py                 # 160 files per set, workers 1 2, 5 repeats
    .venv/bin/python bench/bench_ingest.py --files 80 --repeats 3 --sets single-frame
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
from ultrafedfm.data.preprocess import letterbox, prepare_frames, suppress_overlays

BUSI = Path(__file__).resolve().parents[2] / "shared" / "data" / "busi"

SINGLE_FRAME = [
    "examples_rgb_color.dcm", "examples_palette.dcm", "examples_jpeg2k.dcm",
    # pydicom-data (used when installed)
    "OBXXXX1A_rle.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "US1_J2KI.dcm", "ExplVR_BigEnd.dcm", "gdcm-US-ALOKA-16.dcm",
]
CINE = ["examples_ybr_color.dcm"]  # 30-frame JPEG loop
FILE_SETS = {"single-frame": SINGLE_FRAME, "with cine": SINGLE_FRAME + CINE}


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


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system  # children: joined worker processes


def timed(fn) -> tuple[float, float, object]:
    """(wall s, CPU s of this process and its finished children, result)."""
    wall, cpu = time.perf_counter(), _cpu()
    out = fn()
    return time.perf_counter() - wall, _cpu() - cpu, out


def plain_loop(files: list[Path]) -> int:
    for f in files:
        pydicom.dcmread(f).pixel_array
    return 0


def ingest(source: Path, cache: Path, workers: int, config: IngestConfig) -> int:
    return ingest_dicom_folder(source=source, cache=cache, config=config, workers=workers, progress=False).images_written


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


def overlay_scores(clean: np.ndarray, burned: np.ndarray, out: np.ndarray, overlay: np.ndarray) -> tuple[float, float]:
    """(share of the overlay pixels' error removed, share of clean tissue pixels >= 3 px away changed)."""
    before = np.abs(burned.astype(int) - clean)[overlay].mean()
    removed = 1 - np.abs(out.astype(int) - clean)[overlay].mean() / before
    away = ~ndimage.binary_dilation(overlay, iterations=3)
    return removed, (out != burned)[away].mean()


def measure_overlays(count: int, image_size: int) -> None:
    full, ingest_path = [], []
    for seed in range(count):
        clean, burned, overlay = speckle_with_overlays(seed)
        full.append(overlay_scores(clean, burned, suppress_overlays(burned)[0], overlay))
        # Through ingest: detection at full resolution, fill after the letterbox resize.
        (out,) = prepare_frames([(burned, None)], region_box=None, find_box=False, suppress=True, size=image_size)
        small_overlay = letterbox(overlay.view(np.uint8) * np.uint8(255), image_size) > 0
        ingest_path.append(overlay_scores(letterbox(clean, image_size), letterbox(burned, image_size), out,
                                          small_overlay))
    for label, scores in (("full resolution, suppress_overlays", full),
                          (f"ingest path, prepare_frames at {image_size} px", ingest_path)):
        removed, touched = np.mean(scores, axis=0)
        print(f"overlays, generated ({count} images), {label}: overlay error removed {removed:.1%}, "
              f"clean tissue pixels changed {touched:.3%}")
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


def per_file(names: list[str], image_size: int, repeats: int, tmp: Path) -> None:
    """CPU ms per test file (median of ``repeats``): the plain decode, and what ingest does with the
    file in one process (decode sampled frames to gray, crop, overlay suppression, letterbox, PNG),
    with the overlay detection alone beside it."""
    from ultrafedfm.data.cache import write_png
    from ultrafedfm.data.dicom_reader import decode_frames, read_header, ultrasound_regions
    from ultrafedfm.data.preprocess import box_from_regions, crop, overlay_mask

    def cpu_ms(fn) -> float:
        times = []
        for _ in range(repeats):
            start = time.process_time()
            fn()
            times.append(time.process_time() - start)
        return 1e3 * float(np.median(times))

    print(f"{'file (first frame)':<32} {'size':>10} {'plain ms':>9} {'ingest ms':>10} {'overlay detection ms':>21}")
    for name in names:
        path = get_testdata_file(name, download=False)
        if not path:
            continue

        def ingest_file() -> None:
            ds = read_header(path)
            frames = decode_frames(ds, [0])
            box = box_from_regions(ultrasound_regions(ds), frames[0].gray.shape)
            (image,) = prepare_frames([(f.gray, f.colour) for f in frames], region_box=box, find_box=True,
                                      suppress=True, size=image_size)
            write_png(tmp, f"per_file/{name}.png", image)

        ds = read_header(path)
        frame = decode_frames(ds, [0])[0]
        box = box_from_regions(ultrasound_regions(ds), frame.gray.shape)
        gray, colour = crop(frame.gray, box), None if frame.colour is None else crop(frame.colour, box)
        print(f"{name:<32} {'x'.join(map(str, frame.gray.shape)):>10} "
              f"{cpu_ms(lambda: pydicom.dcmread(path).pixel_array):9.2f} {cpu_ms(ingest_file):10.2f} "
              f"{cpu_ms(lambda: overlay_mask(gray, colour)):21.2f}")


def bench_set(label: str, names: list[str], args: argparse.Namespace, tmp: Path) -> None:
    config = IngestConfig(image_size=args.image_size)
    source = tmp / label.replace(" ", "_")
    files = replicate(names, args.files, source)
    n = len(files)
    methods = {"plain": lambda cache: plain_loop(files)}
    for w in args.workers:
        methods[f"ingest w{w}"] = lambda cache, w=w: ingest(source, cache, w, config)
    methods["w1 no overlays"] = lambda cache: ingest(source, cache, 1, dataclasses.replace(config, suppress_overlays=False))
    methods["w1 floor"] = lambda cache: ingest(source, cache, 1, dataclasses.replace(config, suppress_overlays=False,
                                                                                       crop="none"))
    names_ = list(methods)
    runs: dict[str, list[tuple[float, float]]] = {m: [] for m in names_}
    images: dict[str, int] = {}
    for r in range(args.repeats):
        order = names_[r % len(names_):] + names_[:r % len(names_)]  # rotate who goes first
        for name in order:
            cache = tmp / f"cache_{label[:3]}_{name.replace(' ', '_')}_{r}"
            wall, cpu, written = timed(lambda: methods[name](cache))
            runs[name].append((wall, cpu))
            images[name] = written
            if r < args.repeats - 1 or name != "ingest w1":
                shutil.rmtree(cache, ignore_errors=True)
    plain = np.array(runs["plain"])
    for name in names_:
        t = np.array(runs[name])
        wall_ratio = np.median(plain[:, 0] / t[:, 0])
        cpu_ratio = np.median(plain[:, 1] / t[:, 1])
        rate = n / np.median(t[:, 0])
        img_rate = f"{images[name] / np.median(t[:, 0]):9.1f}" if name != "plain" else f"{'':>9}"
        print(f"{label:<13} {name:<15} {rate:8.1f} {img_rate} {wall_ratio:10.2f} {1e3 * np.median(t[:, 1]) / n:11.2f} "
              f"{cpu_ratio:9.2f}   " + " ".join(f"{p / x:.2f}" for p, x in zip(plain[:, 1], t[:, 1])))
    cache = tmp / f"cache_{label[:3]}_ingest_w1_{args.repeats - 1}"
    rerun = [timed(lambda: ingest(source, cache, 1, config))[:2] for _ in range(args.repeats)]
    t = np.array(rerun)
    print(f"{label:<13} {'re-run w1':<15} {n / np.median(t[:, 0]):8.1f} {'':>9} "
          f"{np.median(plain[:, 0]) / np.median(t[:, 0]):10.2f} {1e3 * np.median(t[:, 1]) / n:11.2f} "
          f"{np.median(plain[:, 1]) / np.median(t[:, 1]):9.2f}")
    shutil.rmtree(source)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=160, help="files per file set")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved repeats; rows are medians over them")
    parser.add_argument("--sets", nargs="+", default=list(FILE_SETS), choices=list(FILE_SETS))
    parser.add_argument("--overlay-images", type=int, default=20, help="generated images for the overlay measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    load_before = os.getloadavg()[0]
    measure_overlays(args.overlay_images, args.image_size)
    print(f"cpu cores: {os.cpu_count()}, files per set: {args.files}, image_size: {args.image_size}, "
          f"repeats: {args.repeats} (medians)")
    with tempfile.TemporaryDirectory() as tmp:
        per_file(SINGLE_FRAME, args.image_size, 2 * args.repeats + 1, Path(tmp))
    print(f"{'file set':<13} {'method':<15} {'files/s':>8} {'images/s':>9} {'wall ratio':>10} {'CPU ms/file':>11} "
          f"{'CPU ratio':>9}   CPU ratio per repeat")
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.sets:
            bench_set(label, FILE_SETS[label], args, Path(tmp))
    print(f"load average (1 min): {load_before:.2f} before, {os.getloadavg()[0]:.2f} after, on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
