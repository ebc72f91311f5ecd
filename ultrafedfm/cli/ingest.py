"""``ultrafedfm ingest``: build or extend a site-local image cache from DICOM or an image folder.

    ultrafedfm ingest --source /pacs/export --cache /data/ultrafedfm-cache --config site.yaml
    ultrafedfm ingest --images ../shared/data/busi --cache /data/busi-cache
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
from pathlib import Path

from ultrafedfm.config import load_config
from ultrafedfm.data.ingest import ingest_dicom_folder, ingest_image_folder
from ultrafedfm.data.ingest_config import IngestConfig

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "ingest",
        help="turn a DICOM folder (or an image folder with labels.csv) into a site-local cache",
        description="Walk a folder of DICOM files, keep ultrasound, decode, crop, suppress overlays, resize and "
        "write a PHI-free cache of PNGs plus a manifest. Re-running adds only new files. Files not used are "
        "listed with their paths and a reason in CACHE.LOCAL/ingest_report.csv, beside the cache (paths can name "
        "patients: that folder stays at the site); the cache keeps only counts by reason and keyed hashes.",
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--source", type=Path, help="folder of DICOM files (nested, any names)")
    what.add_argument("--images", type=Path, help="folder of images with labels.csv (file,label,mask,width,height)")
    parser.add_argument("--cache", type=Path, required=True, help="site cache folder (created if missing)")
    parser.add_argument("--config", type=Path, help="site.yaml whose 'ingest:' section sets the options")
    parser.add_argument("--workers", type=int, help="worker processes (default: config, then one per CPU core)")
    parser.add_argument("--image-size", type=int, help="override ingest.image_size")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (for logs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = load_config(IngestConfig, args.config, section="ingest") if args.config else IngestConfig()
    if args.image_size is not None:
        config = dataclasses.replace(config, image_size=args.image_size)
    if args.workers is not None and args.workers < 1:
        _logger.error("--workers must be at least 1, got %d", args.workers)
        return 2
    try:
        if args.source is not None:
            summary = ingest_dicom_folder(source=args.source, cache=args.cache, config=config,
                                          workers=args.workers, progress=not args.no_progress)
        else:
            summary = ingest_image_folder(source=args.images, cache=args.cache, config=config,
                                          progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as exc:
        _logger.error("%s", exc)
        return 2
    if summary.added == 0 and summary.skipped_existing == 0:
        _logger.error("no usable image found; see %s for the reason of each file", summary.report_path)
        return 1
    return 0
