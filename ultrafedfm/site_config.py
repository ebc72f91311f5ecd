"""A site's own configuration (``site.yaml`` in the site kit's ``local/`` folder).

The hospital's IT team writes this file; the job never carries it. It says where the site's
ingested cache lives (and, optionally, the DICOM folder to ingest into it on first use), the
ingest options and the resources training may use. Framework-free: the FLARE client script
reads it, and so can ``ultrafedfm`` commands run at the site.

One file may describe one site (keys at the top level) or several sites keyed by site name
under ``sites:`` -- the FLARE simulator copies one ``local/`` folder into every simulated
site, so a simulation needs the per-site map::

    sites:
      site-1:
        cache: /data/site-1/cache
        dicom: /data/site-1/dicom      # optional: ingested into `cache` when it is empty
        ingest: {image_size: 64}
      site-2:
        cache: /data/site-2/cache

Relative paths are taken relative to the folder holding ``site.yaml``.

Secure aggregation needs the site's own files: its signing key (``ultrafedfm kit enroll``), the
consortium's member list from the project admin, and the pins and contribution ledger the site
writes (``ultrafedfm.kit.enroll.SiteFiles``), by default in the kit's ``local/`` folder. The FLARE
simulator (no kits) names another folder per simulated site (``ultrafedfm.flare.deploy.simulation``)::

    secagg_dir: /sim/ws.secagg/site-1      # SIMULATION ONLY; a deployment keeps the kit's local/
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from ultrafedfm.config import ConfigError, check, from_mapping, load_yaml
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.privacy.policy import PrivacyPolicy

_logger = logging.getLogger(__name__)

__all__ = [
    "SITE_CONFIG_FILE", "PrivacyPolicy", "SiteConfig", "SiteResources", "find_site_config",
    "load_site_config",
]

SITE_CONFIG_FILE = "site.yaml"


@dataclass
class SiteResources:
    """What the site declares it has (``ultrafedfm kit check`` verifies it)."""

    gpus: int = 0
    min_memory_gb: float = 0.0
    min_free_disk_gb: float = 0.0

    def __post_init__(self) -> None:
        check(self.gpus >= 0, "gpus", "must be >= 0")
        check(self.min_memory_gb >= 0 and self.min_free_disk_gb >= 0, "min_memory_gb", "sizes must be >= 0")


@dataclass
class SiteConfig:
    """Where a site's data is and what training may use.

    Args:
        cache: the site-local cache written by ``ultrafedfm ingest`` (pixels only, no PHI).
        dicom: a DICOM folder ingested into ``cache`` when the cache does not exist yet.
        labelled: a folder of images with ``labels.csv`` (file, label, mask, group) for fine-tuning
            jobs; each job trains on its training split, the rest stays for the site's own evaluation.
        ingest: how that ingestion turns DICOM into images (``IngestConfig``, validated when the file is read).
        device: ``cpu``, ``cuda`` or ``auto`` (``cuda`` when available).
        num_threads: torch intra-op threads for training (``None``: torch's default).
        num_workers: data-loader worker processes (0: load in the training process).
        resources: what the site declares it has (``None``: nothing declared).
        privacy: the site's privacy policy (``ultrafedfm.privacy.policy``), checked before every task.
        secagg_dir: the folder of the site's secure-aggregation files (signing key, member list, pins,
            ledger; ``None``: the kit's ``local/`` folder). Only the simulator names another.
    """

    cache: Path
    dicom: Path | None = None
    labelled: Path | None = None
    ingest: IngestConfig = field(default_factory=IngestConfig)
    device: Literal["cpu", "cuda", "auto"] = "cpu"
    num_threads: int | None = None
    num_workers: int = 2
    resources: SiteResources | None = None
    privacy: PrivacyPolicy = field(default_factory=PrivacyPolicy)
    secagg_dir: Path | None = None

    def __post_init__(self) -> None:
        check(self.num_threads is None or self.num_threads >= 1, "num_threads", "must be at least 1")
        check(self.num_workers >= 0, "num_workers", "must be >= 0")


def load_site_config(path: str | Path, *, site_name: str | None = None) -> SiteConfig:
    """Read ``path``; with a ``sites:`` map, return the entry for ``site_name``."""
    path = Path(path)
    data = load_yaml(path)
    prefix = ""
    if "sites" in data:
        extra = sorted(set(data) - {"sites"})
        if extra:
            raise ConfigError("a file with 'sites:' holds nothing else at the top level", key=extra[0], source=path)
        sites = data["sites"]
        if not isinstance(sites, dict):
            raise ConfigError("expected a mapping of site name to settings", key="sites", source=path)
        if site_name not in sites:
            raise ConfigError(
                f"no entry for this site ({site_name!r}); entries: {', '.join(map(str, sites)) or 'none'}",
                key="sites",
                source=path,
            )
        data = sites[site_name] or {}
        prefix = f"sites.{site_name}"
    config = from_mapping(SiteConfig, data, source=path, prefix=prefix)
    base = path.resolve().parent
    config.cache = base / config.cache.expanduser()
    if config.dicom is not None:
        config.dicom = base / config.dicom.expanduser()
    if config.labelled is not None:
        config.labelled = base / config.labelled.expanduser()
    if config.secagg_dir is not None:
        config.secagg_dir = base / config.secagg_dir.expanduser()
    return config


def find_site_config(start: str | Path) -> Path:
    """The ``local/site.yaml`` of the FLARE workspace holding ``start``.

    A FLARE client runs job code in ``<site workspace>/<job id>/app_<site>``; the kit's
    ``local/`` folder sits at the workspace root, so we walk up from ``start`` to it.
    """
    start = Path(start).resolve()
    for folder in (start, *start.parents):
        candidate = folder / "local" / SITE_CONFIG_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"no local/{SITE_CONFIG_FILE} in {start} or any folder above it; put the site's "
        f"{SITE_CONFIG_FILE} (template: site_templates/site.yaml) into the site kit's local/ folder",
        source=start,
    )
