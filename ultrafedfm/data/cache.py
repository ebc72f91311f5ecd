"""The site-local image cache: 8-bit grayscale PNGs plus a manifest, and a torch Dataset over it.

Layout of a cache folder::

    cache.json          format version and image_size
    salt.key            32 random bytes (hex), mode 0600: the HMAC key of this cache
    manifest.jsonl      one JSON object per image (see CacheEntry)
    images/ab/<key>.png square uint8 images, ``image_size`` px
    masks/ab/<key>.png  lesion masks (image-folder ingest only), same geometry
    ingest_report.csv   files of the last run that were not used: a keyed hash and a reason each
    ingest_summary.json counts of the last run (files seen, added, images, not used by reason)

Keys are HMAC-SHA256(salt, SOP Instance UID + frame number): stable across re-runs of one
cache (so re-ingesting adds only new files) but unlinkable to the UID without the salt, which
never leaves the site. Nothing else from a DICOM header is stored.

Source paths never enter the cache: a folder named after a patient would put the name there.
The list IT needs to find a file that was not used (path, reason, detail) is written beside
the cache, in ``<cache>.LOCAL/`` (:func:`local_report_dir`), keyed by an HMAC of the path under
a key kept only there (``report.key``), so the in-cache list cannot be matched against guessed
paths by whoever holds the cache.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import Dataset

_logger = logging.getLogger(__name__)

__all__ = [
    "CacheDataset",
    "CacheEntry",
    "CacheNotFoundError",
    "ManifestWriter",
    "SiteCache",
    "init_cache",
    "local_report_dir",
    "open_cache",
    "read_ingest_summary",
    "salted_key",
]

CACHE_FORMAT = 1
META_FILE = "cache.json"
SALT_FILE = "salt.key"
MANIFEST_FILE = "manifest.jsonl"
REPORT_FILE = "ingest_report.csv"
SUMMARY_FILE = "ingest_summary.json"
LOCAL_SUFFIX = ".LOCAL"
LOCAL_REPORT_FILE = "ingest_report.csv"
LOCAL_KEY_FILE = "report.key"
_HOW_TO_BUILD = "build it with `ultrafedfm ingest --source DICOM_DIR --cache {root}` (or --images DIR for a PNG folder)"


class CacheNotFoundError(FileNotFoundError):
    """There is no (or an empty) site cache where one was expected."""


@dataclass(frozen=True)
class CacheEntry:
    """One manifest line. ``image`` and ``mask`` are paths relative to the cache root."""

    key: str
    instance: str
    image: str
    source: Literal["dicom", "image"]
    frame: int | None = None
    label: str | None = None
    mask: str | None = None


@dataclass(frozen=True)
class SiteCache:
    """An opened cache: its root, square image size and manifest entries (in manifest order)."""

    root: Path
    image_size: int
    entries: tuple[CacheEntry, ...]

    def __len__(self) -> int:
        return len(self.entries)

    @property
    def instances(self) -> set[str]:
        """Salted keys of the DICOM instances / source images already in the cache."""
        return {e.instance for e in self.entries}


def salted_key(salt: bytes, *parts: str | int) -> str:
    """HMAC-SHA256 of ``parts`` joined by ``/`` under ``salt`` (hex)."""
    message = "/".join(str(p) for p in parts).encode("utf-8")
    return hmac.new(salt, message, hashlib.sha256).hexdigest()


def local_report_dir(cache: str | Path) -> Path:
    """The site-only folder beside ``cache`` that holds the path-bearing ingest report (never copy it along)."""
    cache = Path(cache).expanduser().resolve()
    return cache.with_name(cache.name + LOCAL_SUFFIX)


def read_ingest_summary(cache: str | Path) -> dict | None:
    """The counts of the cache's last ingest run (``ingest_summary.json``), or ``None`` if it has none."""
    path = Path(cache) / SUMMARY_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def image_relpath(key: str, *, kind: Literal["images", "masks"] = "images") -> str:
    """Where the PNG of ``key`` lives inside the cache (two-level fan-out keeps folders small)."""
    return f"{kind}/{key[:2]}/{key}.png"


def write_png(root: Path, relpath: str, image: np.ndarray) -> None:
    """Write ``image`` (H, W) uint8 to ``root / relpath``.

    No temp-file-and-rename: a PNG becomes part of the cache only when its manifest line is
    written (after this returns), and a re-run rewrites any file a crash left half-written.
    """
    path = root / relpath
    if not path.parent.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="PNG", compress_level=1)


def init_cache(root: Path, *, image_size: int) -> bytes:
    """Create (or reopen) the cache at ``root`` and return its salt.

    Raises:
        ValueError: the existing cache was built at another ``image_size``.
    """
    root.mkdir(parents=True, exist_ok=True)
    meta_path = root / META_FILE
    if meta_path.exists():
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if int(meta["image_size"]) != image_size:
            raise ValueError(
                f"{root}: this cache holds {meta['image_size']} px images but image_size is {image_size}; "
                "use the same image_size or a new --cache folder"
            )
    else:
        meta_path.write_text(json.dumps({"format": CACHE_FORMAT, "image_size": image_size}) + "\n", encoding="utf-8")
    salt_path = root / SALT_FILE
    if not salt_path.exists():
        fd = os.open(salt_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w", encoding="ascii") as f:
            f.write(secrets.token_hex(32) + "\n")
    return bytes.fromhex(salt_path.read_text(encoding="ascii").strip())


class ManifestWriter:
    """Appends entries to ``manifest.jsonl``, one flushed line each (a crash loses no line)."""

    def __init__(self, root: Path):
        self._file = open(root / MANIFEST_FILE, "a", encoding="utf-8")

    def add(self, entry: CacheEntry) -> None:
        self._file.write(json.dumps(asdict(entry), separators=(",", ":")) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> "ManifestWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_cache(root: str | Path, *, allow_empty: bool = False) -> SiteCache:
    """Read the cache at ``root``.

    Raises:
        CacheNotFoundError: no cache there, or (unless ``allow_empty``) it holds no image.
    """
    root = Path(root)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise CacheNotFoundError(f"no site cache at {root} ({META_FILE} missing): {_HOW_TO_BUILD.format(root=root)}")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    entries = []
    manifest = root / MANIFEST_FILE
    if manifest.is_file():
        with open(manifest, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    entries.append(CacheEntry(**json.loads(line)))
                except (json.JSONDecodeError, TypeError) as exc:
                    _logger.warning("%s line %d: skipping malformed manifest line (%s)", manifest, number, exc)
    if not entries and not allow_empty:
        raise CacheNotFoundError(f"the site cache at {root} holds no image: {_HOW_TO_BUILD.format(root=root)}")
    return SiteCache(root=root, image_size=int(meta["image_size"]), entries=tuple(entries))


class CacheDataset(Dataset):
    """A site cache as a torch Dataset of ``(1, S, S)`` float32 images in [0, 1].

    Example::

        ds = CacheDataset(Path("/data/cache"), image_size=224)
        loader = DataLoader(ds, batch_size=64, shuffle=True)

    Args:
        root: the cache folder written by ``ultrafedfm ingest``.
        image_size: ``S``; images are resized (bilinear) on load when it differs from the
            cache's own size. ``None`` keeps the cache's size.
        transform: applied to the tensor after loading (and resizing).
    """

    def __init__(self, root: Path, *, image_size: int | None = None, transform: Callable | None = None):
        self.cache = open_cache(root)
        self.root = Path(root)
        self.image_size = image_size or self.cache.image_size
        self.transform = transform
        self.labels: list[str | None] = [e.label for e in self.cache.entries]

    def __len__(self) -> int:
        return len(self.cache.entries)

    def __getitem__(self, index: int) -> torch.Tensor:
        entry = self.cache.entries[index]
        image = self._load(entry.image, nearest=False)
        return self.transform(image) if self.transform is not None else image

    def mask(self, index: int) -> torch.Tensor | None:
        """The lesion mask of item ``index`` as (1, S, S) float32 {0, 1}, or ``None``."""
        entry = self.cache.entries[index]
        return None if entry.mask is None else (self._load(entry.mask, nearest=True) > 0.5).float()

    def _load(self, relpath: str, *, nearest: bool) -> torch.Tensor:
        with Image.open(self.root / relpath) as img:
            array = np.asarray(img.convert("L"), dtype=np.uint8)
        tensor = torch.from_numpy(array.copy()).float().div_(255.0).unsqueeze(0)
        if tensor.shape[-1] != self.image_size or tensor.shape[-2] != self.image_size:
            mode = "nearest" if nearest else "bilinear"
            kwargs = {} if nearest else {"align_corners": False, "antialias": True}
            tensor = F.interpolate(tensor.unsqueeze(0), size=(self.image_size,) * 2, mode=mode, **kwargs)[0]
            tensor = tensor.clamp_(0.0, 1.0)
        return tensor
