"""Settings of site-local ingestion (the ``ingest:`` section of a site's ``site.yaml``).

Example ``site.yaml``::

    ingest:
      image_size: 224
      frame_stride: 5          # keep every 5th frame of a cine loop
      max_frames_per_file: 32
      crop: auto               # auto | regions | none
      suppress_overlays: true
      exclude: ["*/SR/*", "*.txt"]

Load it with ``load_config(IngestConfig, "site.yaml", section="ingest")``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from ultrafedfm.config import check

_logger = logging.getLogger(__name__)

__all__ = ["CropMode", "IngestConfig"]

CropMode = Literal["auto", "regions", "none"]


@dataclass(frozen=True)
class IngestConfig:
    """How DICOM files (or images) become cache images.

    Args:
        image_size: side of the square cache images (letterboxed, aspect kept).
        frame_stride: keep frames 0, stride, 2*stride, ... of a multi-frame (cine) file.
        max_frames_per_file: at most this many frames per file (``None``: no limit).
        crop: ``regions`` crops to ``SequenceOfUltrasoundRegions``; ``auto`` uses those when
            present and consistent, otherwise finds the scan sector from the pixels; ``none``
            keeps the whole frame.
        suppress_overlays: inpaint burned-in text, calipers and colour annotations.
        include: glob patterns on the path relative to the source root (or the file name);
            a file must match one of them.
        exclude: glob patterns; a matching file is skipped and reported as ``excluded``.
        workers: worker processes (``None``: one per CPU core).
    """

    image_size: int = 224
    frame_stride: int = 5
    max_frames_per_file: int | None = 32
    crop: CropMode = "auto"
    suppress_overlays: bool = True
    include: tuple[str, ...] = ("*",)
    exclude: tuple[str, ...] = ()
    workers: int | None = None

    def __post_init__(self) -> None:
        check(16 <= self.image_size <= 4096, "image_size", f"must be between 16 and 4096, got {self.image_size}")
        check(self.frame_stride >= 1, "frame_stride", f"must be at least 1, got {self.frame_stride}")
        check(
            self.max_frames_per_file is None or self.max_frames_per_file >= 1,
            "max_frames_per_file", f"must be at least 1 (or null for no limit), got {self.max_frames_per_file}",
        )
        check(self.crop in ("auto", "regions", "none"), "crop", f"must be auto, regions or none, got {self.crop!r}")
        check(len(self.include) > 0, "include", "needs at least one pattern (use ['*'] for all files)")
        check(self.workers is None or self.workers >= 1, "workers", f"must be at least 1, got {self.workers}")
