"""Site-local ingestion: a DICOM folder (or a PNG folder with ``labels.csv``) into a site cache.

``ingest_dicom_folder`` walks a folder (any names, nested; DICOMDIR skipped), decodes the
ultrasound files in a process pool (chunked; a crashing worker costs only the file that
crashed it), crops, suppresses overlays, letterboxes and writes PNGs, then appends the
manifest from the parent process. Files already in the cache are recognised from their header
alone (pixel data is deferred and never read). Every file not used is reported with one reason
of :data:`~ultrafedfm.data.dicom_reader.REJECT_REASONS`.

``ingest_image_folder`` builds the same cache from a folder of images with a ``labels.csv``
(columns ``file,label,mask,width,height``, the format of the BUSI evaluation folder).

Two reports, because source paths can carry PHI (a folder named after a patient):

- ``<cache>.LOCAL/ingest_report.csv`` (beside the cache, for the site's IT only): each file not
  used by its path relative to the source root, its reason and a detail, and a keyed hash;
- in the cache, ``ingest_report.csv`` (the keyed hash and the reason, no path, no detail) and
  ``ingest_summary.json`` (counts by reason): what the cache -- and the site's audit -- holds.

Manifest, PNG names and logs carry only salted keys, labels and frame numbers.
"""
from __future__ import annotations

import csv
import datetime as dt
import fnmatch
import hashlib
import io
import logging
import os
import secrets
from collections import Counter
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from ultrafedfm.data.cache import (
    LOCAL_KEY_FILE, LOCAL_REPORT_FILE, REPORT_FILE, SUMMARY_FILE, CacheEntry, ManifestWriter, image_relpath, init_cache,
    local_report_dir, open_cache, salted_key, write_png,
)
from ultrafedfm.data.dicom_reader import (
    Rejected, check_ultrasound, decode_frames, frame_indices, number_of_frames, read_header, ultrasound_regions,
)
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.preprocess import box_from_regions, letterbox, prepare_frames, suppress_overlays
from ultrafedfm.fileio import atomic_write_json, atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = ["FolderSample", "IngestSummary", "ingest_dicom_folder", "ingest_image_folder", "sample_dicom_folder"]

_CHUNK_SIZE = 8
_IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


@dataclass(frozen=True)
class IngestSummary:
    """What one ingest run did. ``added`` counts files (instances), ``images_written`` frames.

    ``report_path`` is the path-bearing list for the site's IT, outside the cache
    (``<cache>.LOCAL/ingest_report.csv``); the cache itself keeps only keyed hashes and counts.
    """

    cache: Path
    report_path: Path
    files_seen: int
    added: int
    images_written: int
    skipped_existing: int
    rejected: dict[str, int] = field(default_factory=dict)

    @property
    def rejected_total(self) -> int:
        return sum(self.rejected.values())


@dataclass(frozen=True)
class _Context:
    """What a worker needs; sent once per worker by the pool initializer."""

    source: Path
    cache: Path
    salt: bytes
    config: IngestConfig
    known: frozenset[str]


@dataclass
class _FileResult:
    relpath: str
    status: str  # added | skipped | rejected
    instance: str = ""
    frames: list[tuple[str, int]] = field(default_factory=list)
    reason: str = ""
    detail: str = ""


# Set in each worker process by the pool initializer (the standard way to give workers
# large read-only state without pickling it with every task).
_worker_context: _Context | None = None


def _init_worker(context: _Context) -> None:
    global _worker_context
    _worker_context = context
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings may quote header values


def _ingest_chunk(relpaths: list[str]) -> list[_FileResult]:
    assert _worker_context is not None, "worker started without _init_worker"
    return [_ingest_one(relpath, _worker_context) for relpath in relpaths]


def _ingest_one(relpath: str, ctx: _Context) -> _FileResult:
    try:
        return _ingest_dicom(relpath, ctx)
    except Rejected as rej:
        return _FileResult(relpath, "rejected", reason=rej.reason, detail=rej.detail)
    except MemoryError:
        return _FileResult(relpath, "rejected", reason="unreadable", detail="out of memory while decoding")
    except Exception as exc:  # one bad file never stops the run
        return _FileResult(relpath, "rejected", reason="truncated_or_corrupt", detail=f"unexpected {type(exc).__name__}")


def _ingest_dicom(relpath: str, ctx: _Context) -> _FileResult:
    path = ctx.source / relpath
    ds = read_header(path)
    check_ultrasound(ds)
    uid = str(ds.get("SOPInstanceUID", "") or "").strip()
    if not uid:  # key by content instead: still stable across runs
        uid = "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()
    instance = salted_key(ctx.salt, "dicom", uid)
    if instance in ctx.known:
        return _FileResult(relpath, "skipped", instance=instance)
    frames, images = _decode_and_prepare(ds, ctx.config)
    written = []
    for frame, image in zip(frames, images):
        key = salted_key(ctx.salt, "dicom", uid, frame.index)
        write_png(ctx.cache, image_relpath(key), image)
        written.append((key, frame.index))
    return _FileResult(relpath, "added", instance=instance, frames=written)


def _decode_and_prepare(ds, cfg: IngestConfig) -> tuple[list, list[np.ndarray]]:
    """The sampled frames of ``ds`` (DecodedFrame) and their cache images."""
    frames = decode_frames(ds, frame_indices(number_of_frames(ds), stride=cfg.frame_stride, max_frames=cfg.max_frames_per_file))
    region_box = box_from_regions(ultrasound_regions(ds), frames[0].gray.shape) if cfg.crop != "none" else None
    images = prepare_frames([(f.gray, f.colour) for f in frames], region_box=region_box, find_box=cfg.crop == "auto",
                            suppress=cfg.suppress_overlays, size=cfg.image_size)
    return frames, images


@dataclass(frozen=True)
class FolderSample:
    """What :func:`sample_dicom_folder` found: the first usable file, or why none was.

    ``usable`` is the first file (relative path) that decodes and preprocesses into ``images``
    cache images; ``rejected`` counts the reasons of the files looked at before it, and
    ``details`` keeps the first detail seen for each reason (it names a missing decoder's package).
    """

    files_looked: int
    usable: str | None
    images: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)


def sample_dicom_folder(source: Path, *, config: IngestConfig, limit: int = 200, isolated: bool = True) -> FolderSample:
    """Try the files under ``source`` one by one (walk order, include/exclude applied, at most
    ``limit``) until one would ingest; nothing is written. ``isolated`` runs the search in one
    worker process, so a decoder that crashes on a file costs the search, not the caller."""
    source = Path(source)
    if not isolated:
        return _sample(source, config, limit)
    with ProcessPoolExecutor(max_workers=1, initializer=_quiet_pydicom) as pool:
        try:
            return pool.submit(_sample, source, config, limit).result()
        except BrokenProcessPool:
            return FolderSample(files_looked=0, usable=None, rejected={"truncated_or_corrupt": 1},
                                details={"truncated_or_corrupt": "a decoder crashed the process on one of the files"})


def _quiet_pydicom() -> None:
    logging.getLogger("pydicom").setLevel(logging.ERROR)  # its warnings may quote header values


def _sample(source: Path, config: IngestConfig, limit: int) -> FolderSample:
    rejected: Counter[str] = Counter()
    details: dict[str, str] = {}
    looked = 0
    for relpath in _iter_selected(source, config):
        if looked >= limit:
            break
        looked += 1
        try:
            ds = read_header(source / relpath)
            check_ultrasound(ds)
            _, images = _decode_and_prepare(ds, config)
        except Rejected as rej:
            rejected[rej.reason] += 1
            details.setdefault(rej.reason, rej.detail)
            continue
        except Exception as exc:  # as in ingest: one bad file is a reason, never a crash
            rejected["truncated_or_corrupt"] += 1
            details.setdefault("truncated_or_corrupt", f"unexpected {type(exc).__name__}")
            continue
        return FolderSample(looked, relpath, len(images), dict(rejected), details)
    return FolderSample(looked, None, 0, dict(rejected), details)


def _iter_selected(source: Path, config: IngestConfig):
    """Relative POSIX paths of the files ingest would read, lazily in walk order (DICOMDIR skipped)."""
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames.sort()
        here = Path(dirpath)
        for name in sorted(filenames):
            rel = (here / name).relative_to(source).as_posix()
            matches = lambda patterns: any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
            if name.upper() != "DICOMDIR" and matches(config.include) and not matches(config.exclude):
                yield rel


def _walk(source: Path, cache: Path, config: IngestConfig) -> tuple[list[str], list[str]]:
    """(files to ingest, files excluded by the config) as sorted relative POSIX paths."""
    skip = {cache.resolve(), local_report_dir(cache)}
    selected, excluded = [], []
    for dirpath, dirnames, filenames in os.walk(source):
        here = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if (here / d).resolve() not in skip)
        for name in sorted(filenames):
            if name.upper() == "DICOMDIR":
                continue
            rel = (here / name).relative_to(source).as_posix()
            matches = lambda patterns: any(fnmatch.fnmatch(rel, p) or fnmatch.fnmatch(name, p) for p in patterns)  # noqa: E731
            (selected if matches(config.include) and not matches(config.exclude) else excluded).append(rel)
    return selected, excluded


def _run_pool(relpaths: list[str], context: _Context, workers: int, bar: tqdm) -> list[_FileResult]:
    """Ingest in chunks over a process pool; a crashing worker costs only the file that crashed it.

    A crash breaks the pool and fails every unfinished chunk. Failed chunks are halved and
    retried in a fresh pool, smallest (most suspect) last so the others finish first; a single
    file that still fails is retried alone and, if it crashes again, reported.
    """
    results: list[_FileResult] = []
    pending = [relpaths[i:i + _CHUNK_SIZE] for i in range(0, len(relpaths), _CHUNK_SIZE)]
    suspects: list[str] = []
    while pending:
        pending.sort(key=len, reverse=True)
        failed = _run_chunks(pending, context, workers, results, bar)
        pending = []
        for chunk in failed:
            if len(chunk) > 1:
                pending += [chunk[: len(chunk) // 2], chunk[len(chunk) // 2:]]
            else:
                suspects.append(chunk[0])
    for relpath in suspects:
        if _run_chunks([[relpath]], context, 1, results, bar):
            results.append(_FileResult(relpath, "rejected", reason="truncated_or_corrupt",
                                       detail="the decoder crashed the worker process"))
            bar.update(1)
    return results


def _run_chunks(chunks: list[list[str]], context: _Context, workers: int, results: list[_FileResult], bar: tqdm) -> list[list[str]]:
    """Run ``chunks`` in one fresh pool, appending to ``results``; returns the chunks a crash lost."""
    failed = []
    with ProcessPoolExecutor(max_workers=workers, initializer=_init_worker, initargs=(context,)) as pool:
        futures: dict[Future, list[str]] = {pool.submit(_ingest_chunk, chunk): chunk for chunk in chunks}
        for future in as_completed(futures):
            try:
                done = future.result()
            except BrokenProcessPool:
                failed.append(futures[future])
                continue
            results.extend(done)
            bar.update(len(done))
    return failed


def ingest_dicom_folder(
    *, source: Path, cache: Path, config: IngestConfig, workers: int | None = None, progress: bool = True
) -> IngestSummary:
    """Ingest the ultrasound DICOM files under ``source`` into the cache at ``cache``.

    Args:
        workers: worker processes; defaults to ``config.workers``, then ``os.cpu_count()``.
        progress: show a tqdm progress bar.
    """
    source, cache = Path(source), Path(cache)
    if not source.is_dir():
        raise FileNotFoundError(f"DICOM source folder {source} does not exist; pass the folder of the site's DICOM store")
    salt = init_cache(cache, image_size=config.image_size)
    known = open_cache(cache, allow_empty=True).instances
    relpaths, excluded = _walk(source, cache, config)
    workers = max(1, min(workers or config.workers or os.cpu_count() or 1, max(1, len(relpaths))))
    _logger.info("ingesting %d files with %d workers (%d already cached instances, %d excluded)",
                 len(relpaths), workers, len(known), len(excluded))
    context = _Context(source=source, cache=cache, salt=salt, config=config, known=frozenset(known))
    with tqdm(total=len(relpaths), unit="file", desc="ingest", disable=not progress) as bar:
        results = _run_pool(relpaths, context, workers, bar) if relpaths else []
    results.sort(key=lambda r: r.relpath)
    results += [_FileResult(rel, "rejected", reason="excluded", detail="matches the include/exclude patterns of the config")
                for rel in excluded]
    added = written = skipped = 0
    with ManifestWriter(cache) as manifest:
        for result in results:
            if result.status == "added" and result.instance in known:
                result.status = "skipped"  # the same SOP instance twice in one source folder
            if result.status == "skipped":
                skipped += 1
            elif result.status == "added":
                known.add(result.instance)
                added += 1
                for key, frame in result.frames:
                    manifest.add(CacheEntry(key=key, instance=result.instance, image=image_relpath(key),
                                            source="dicom", frame=frame))
                    written += 1
    return _finish(cache, results, files_seen=len(relpaths) + len(excluded), added=added, written=written, skipped=skipped)


def _finish(cache: Path, results: list[_FileResult], *, files_seen: int, added: int, written: int, skipped: int) -> IngestSummary:
    rejected = [r for r in results if r.status == "rejected"]
    local = local_report_dir(cache)
    key = _local_report_key(local)
    rows = [(salted_key(key, "source-file", r.relpath), r) for r in rejected]
    local_csv = io.StringIO()
    writer = csv.writer(local_csv)
    writer.writerow(["file_key", "path", "reason", "detail"])
    writer.writerows([file_key, r.relpath, r.reason, r.detail] for file_key, r in rows)
    report_path = atomic_write_text(local / LOCAL_REPORT_FILE, local_csv.getvalue(), mode=0o600)
    cache_csv = io.StringIO()
    writer = csv.writer(cache_csv)
    writer.writerow(["file_key", "reason"])
    writer.writerows([file_key, r.reason] for file_key, r in rows)
    atomic_write_text(cache / REPORT_FILE, cache_csv.getvalue())
    counts = dict(sorted(Counter(r.reason for r in rejected).items()))
    atomic_write_json(cache / SUMMARY_FILE, {
        "format": 1, "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "files_seen": files_seen, "added": added, "images_written": written, "skipped_existing": skipped,
        "rejected": counts})
    summary = IngestSummary(cache=cache, report_path=report_path, files_seen=files_seen, added=added,
                            images_written=written, skipped_existing=skipped, rejected=counts)
    reasons = ", ".join(f"{reason} {n}" for reason, n in counts.items())
    _logger.info("ingest done: %d files added (%d images), %d already cached, %d not used%s; the files not used, "
                 "with their paths (LOCAL: keep it at the site): %s", added, written, skipped,
                 summary.rejected_total, f" ({reasons})" if reasons else "", report_path)
    return summary


_LOCAL_README = """LOCAL to this site: do not copy this folder with the cache, attach it to a ticket or send it anywhere.
ingest_report.csv lists the source files the last ingest run did not use, by their path relative to the
DICOM folder; paths can carry patient names. The cache beside this folder holds only the keyed hash of each
path (file_key, an HMAC under report.key, which stays here) and the reason.
"""


def _local_report_key(local: Path) -> bytes:
    """The HMAC key of the file keys (created once, mode 0600, in the LOCAL folder only)."""
    local.mkdir(parents=True, exist_ok=True)
    readme = local / "README.txt"
    if not readme.exists():
        readme.write_text(_LOCAL_README, encoding="utf-8")
    path = local / LOCAL_KEY_FILE
    if not path.exists():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another ingest created it meanwhile
            pass
        else:
            with os.fdopen(fd, "w", encoding="ascii") as f:
                f.write(secrets.token_hex(32) + "\n")
    return bytes.fromhex(path.read_text(encoding="ascii").strip())


def ingest_image_folder(*, source: Path, cache: Path, config: IngestConfig, progress: bool = True) -> IngestSummary:
    """Ingest a folder of images (with an optional ``labels.csv``) into the cache at ``cache``.

    ``labels.csv`` columns: ``file`` (relative path), ``label``, ``mask`` (relative path or
    empty); ``width``/``height`` are informative. Without it every image is ingested unlabelled.
    Images are not cropped (public datasets come cropped); overlays are suppressed per config;
    masks are letterboxed with nearest-neighbour resampling and stored as 0/255.
    """
    source, cache = Path(source), Path(cache)
    if not source.is_dir():
        raise FileNotFoundError(f"image folder {source} does not exist")
    rows = _image_rows(source)
    salt = init_cache(cache, image_size=config.image_size)
    known = open_cache(cache, allow_empty=True).instances
    results: list[_FileResult] = []
    added = written = skipped = 0
    with ManifestWriter(cache) as manifest:
        for row in tqdm(rows, unit="image", desc="ingest images", disable=not progress):
            rel = (row.get("file") or "").strip()
            instance = salted_key(salt, "image", rel)
            if instance in known:
                skipped += 1
                continue
            try:
                if not rel:
                    raise Rejected("unreadable", "labels.csv row without a file name")
                entry = _ingest_image(source, cache, rel, row, instance, config)
            except Rejected as rej:
                results.append(_FileResult(rel, "rejected", reason=rej.reason, detail=rej.detail))
                continue
            except Exception as exc:  # one bad image never stops the run
                results.append(_FileResult(rel, "rejected", reason="truncated_or_corrupt", detail=f"unexpected {type(exc).__name__}"))
                continue
            manifest.add(entry)
            known.add(instance)
            added += 1
            written += 1
    return _finish(cache, results, files_seen=len(rows), added=added, written=written, skipped=skipped)


def _image_rows(source: Path) -> list[dict[str, str]]:
    labels = source / "labels.csv"
    if labels.is_file():
        with open(labels, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "file" not in reader.fieldnames:
                raise ValueError(f"{labels}: needs a header with at least a 'file' column (file,label,mask,width,height)")
            return list(reader)
    return [{"file": p.relative_to(source).as_posix()} for p in sorted(source.rglob("*"))
            if p.suffix.lower() in _IMAGE_SUFFIXES and not p.stem.endswith("_mask")]


def _load_gray(path: Path, what: str) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("L"), dtype=np.uint8)
    except FileNotFoundError:
        raise Rejected("unreadable", f"{what} listed in labels.csv does not exist") from None
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise Rejected("truncated_or_corrupt", f"{what} is not a readable image ({type(exc).__name__})") from None


def _ingest_image(source: Path, cache: Path, rel: str, row: dict[str, str], instance: str, config: IngestConfig) -> CacheEntry:
    gray = _load_gray(source / rel, "image")
    if config.suppress_overlays:
        gray, _ = suppress_overlays(gray)
    write_png(cache, image_relpath(instance), letterbox(gray, config.image_size))
    mask_rel = None
    if (row.get("mask") or "").strip():
        mask = _load_gray(source / row["mask"].strip(), "mask")
        if mask.shape != gray.shape:
            raise Rejected("truncated_or_corrupt", f"mask is {mask.shape[1]}x{mask.shape[0]} but image is {gray.shape[1]}x{gray.shape[0]}")
        mask_rel = image_relpath(instance, kind="masks")
        write_png(cache, mask_rel, np.where(letterbox(mask, config.image_size, nearest=True) > 127, 255, 0).astype(np.uint8))
    label = (row.get("label") or "").strip() or None
    return CacheEntry(key=instance, instance=instance, image=image_relpath(instance), source="image", label=label, mask=mask_rel)
