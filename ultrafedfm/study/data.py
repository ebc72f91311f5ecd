"""The study's data: downstream sets with fixed splits, and one pretraining site cache per shared set.

Downstream sets (BUSI for diagnosis and lesion masks, DDTI for nodule masks) are loaded once
at the preset's size (overlay suppression, letterbox; an ``.npz`` cache makes reruns instant)
and split once, grouped and stratified, from the preset's ``split_seed``: every arm, seed and
label fraction sees the same test images. Pretraining sites are the shared sets, one site
per set, their images only (labels and masks are never used): a ``labels.csv`` listing just
``file`` is written beside a link to the set, leaving out every image of a downstream **test**
split, and ingested into a site cache with the project's ingest (``ingest_image_folder``).

Layout under the study folder::

    data/<set>-<size>-<hash>.npz       preprocessed downstream sets
    splits/<set>.json                  the fixed split (indices and file names)
    sites/<set>/source/{labels.csv,data -> <data_root>/<set>}
    sites/<set>/cache/                 the site cache the pretraining arms read
"""
from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ultrafedfm.data.cache import LOCAL_REPORT_FILE, local_report_dir
from ultrafedfm.data.labelled import LabelledImages, load_labelled_folder
from ultrafedfm.downstream.splits import Split, grouped_split
from ultrafedfm.fileio import atomic_write_json
from ultrafedfm.study.presets import StudyPreset

_logger = logging.getLogger(__name__)

__all__ = ["DOWNSTREAM_SETS", "PRETRAIN_SETS", "THYROID_SETS", "StudyData", "prepare_data"]

# Shared sets used as pretraining sites, in a fixed order (site-1 ... site-N).
PRETRAIN_SETS = ("busi", "ddti", "thyroid", "hc18", "lung", "usgra", "carotid")
THYROID_SETS = ("ddti", "thyroid")
DOWNSTREAM_SETS = ("busi", "ddti")


@dataclass
class StudyData:
    """Downstream sets with their splits, and the pretraining site caches (name -> cache folder)."""

    downstream: dict[str, LabelledImages]
    splits: dict[str, Split]
    sites: dict[str, Path]
    site_images: dict[str, int]

    def sites_without(self, names: tuple[str, ...]) -> dict[str, Path]:
        return {k: v for k, v in self.sites.items() if k not in names}


def _write_site_source(site_dir: Path, data_dir: Path, exclude: set[str], *, limit: int | None) -> int:
    """``site_dir/source``: a link to ``data_dir`` and a file-only ``labels.csv`` without ``exclude``."""
    source = site_dir / "source"
    source.mkdir(parents=True, exist_ok=True)
    link = source / "data"
    if link.is_symlink() and Path(os.readlink(link)) != data_dir.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(data_dir.resolve(), target_is_directory=True)
    with open(data_dir / "labels.csv", newline="", encoding="utf-8") as f:
        files = [row["file"].strip() for row in csv.DictReader(f) if row["file"].strip() not in exclude]
    if limit is not None:
        files = files[:limit]
    text = "file\n" + "".join(f"data/{name}\n" for name in files)
    labels = source / "labels.csv"
    if not labels.is_file() or labels.read_text(encoding="utf-8") != text:
        labels.write_text(text, encoding="utf-8")
    return len(files)


def prepare_data(data_root: str | Path, out: str | Path, preset: StudyPreset, *, progress: bool = True) -> StudyData:
    """Load and split the downstream sets, and build a pretraining cache per shared set (idempotent)."""
    from ultrafedfm.data.cache import open_cache
    from ultrafedfm.data.ingest import ingest_image_folder
    from ultrafedfm.data.ingest_config import IngestConfig

    data_root, out = Path(data_root), Path(out)
    downstream: dict[str, LabelledImages] = {}
    splits: dict[str, Split] = {}
    for name in DOWNSTREAM_SETS:
        folder = data_root / name
        if not (folder / "labels.csv").is_file():
            raise FileNotFoundError(f"the study needs {folder}/labels.csv (see ../shared/data/README.md); "
                                    "pass --data-root DIR holding busi/ and ddti/")
        data = load_labelled_folder(folder, image_size=preset.img_size, cache_dir=out / "data", progress=progress)
        labels = data.labels.numpy() if data.classes else None
        split = grouped_split(data.groups, labels, seed=preset.split_seed)
        downstream[name], splits[name] = data, split
        atomic_write_json(out / "splits" / f"{name}.json", {
            "seed": preset.split_seed, "groups_derived": data.groups_derived, **split.to_mapping(),
            "test_files": [data.files[i] for i in split.test]})
    ingest = IngestConfig(image_size=preset.img_size, workers=1)
    sites: dict[str, Path] = {}
    counts: dict[str, int] = {}
    for name in PRETRAIN_SETS:
        folder = data_root / name
        if not (folder / "labels.csv").is_file():
            _logger.warning("pretraining site %s skipped: %s/labels.csv not found", name, folder)
            continue
        exclude = set()
        if name in downstream:
            exclude = {downstream[name].files[i] for i in splits[name].test}
        site_dir = out / "sites" / name
        count = _write_site_source(site_dir, folder, exclude, limit=preset.max_site_images)
        cache = site_dir / "cache"
        ingest_image_folder(source=site_dir / "source", cache=cache, config=ingest, progress=progress)
        counts[name] = len(open_cache(cache))
        if counts[name] > count:
            # A cache only grows: images of an earlier, different split (maybe today's test images) remain.
            raise RuntimeError(f"site cache {cache} holds {counts[name]} images but only {count} are allowed now "
                               "(an earlier run with another split or preset?); delete that cache folder and rerun")
        if counts[name] < count:
            _logger.warning("site %s: %d images listed, %d in its cache (see %s)",
                            name, count, counts[name], local_report_dir(cache) / LOCAL_REPORT_FILE)
        sites[name] = cache
    if len(sites) < 2:
        raise FileNotFoundError(f"the study needs at least two pretraining sites under {data_root}, found {list(sites)}")
    atomic_write_json(out / "sites.json", {"sites": {k: str(v) for k, v in sites.items()}, "images": counts,
                                           "excluded": "the test split of each downstream set"})
    return StudyData(downstream=downstream, splits=splits, sites=sites, site_images=counts)
