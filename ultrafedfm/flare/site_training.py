"""One site's part of a round, without FLARE: global weights in, delta and sample count out.

The FLARE client script (``client_script.py``) is a loop around :meth:`SiteTrainer.train_round`;
keeping the work here makes it testable and keeps the script thin. What leaves the site is
built here and only here: the weight delta, the number of training images, the mean loss and
the training time -- never pixels, manifests or file names.
"""
from __future__ import annotations

import logging
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ultrafedfm.flare.model_io import build_model, load_params, pretrain_config
from ultrafedfm.site_config import SiteConfig

_logger = logging.getLogger(__name__)

__all__ = ["SiteTrainer", "SiteUpdate", "local_generator_seed"]


def local_generator_seed(seed: int, round_index: int, site_name: str) -> int:
    """The data-order/masking seed a site uses in a round (distinct per site and round)."""
    return (seed * 1_000_003 + round_index * 7_919 + zlib.crc32(site_name.encode())) % (2**31 - 1)


@dataclass
class SiteUpdate:
    """What a site sends for one round."""

    delta: dict[str, torch.Tensor]
    num_samples: int
    steps: int
    loss: float
    train_seconds: float


class SiteTrainer:
    """Holds a site's dataset and model across rounds (one per client process)."""

    def __init__(self, *, site_name: str, site_config: SiteConfig):
        self.site_name = site_name
        self.config = site_config
        self._datasets: dict[int, Any] = {}
        self._model: torch.nn.Module | None = None
        self._model_key: tuple | None = None
        if site_config.num_threads:
            torch.set_num_threads(site_config.num_threads)

    def dataset(self, image_size: int):
        """The site's cache as a torch Dataset, ingesting the DICOM folder first if needed."""
        if image_size not in self._datasets:
            from ultrafedfm.data.cache import CacheDataset, CacheNotFoundError

            cache = Path(self.config.cache)
            try:
                dataset = CacheDataset(cache, image_size=image_size)
            except CacheNotFoundError:
                if self.config.dicom is None:
                    raise
                self._ingest(cache)
                dataset = CacheDataset(cache, image_size=image_size)
            self._datasets[image_size] = dataset
            _logger.info("%s: %d training images in %s", self.site_name, len(self._datasets[image_size]), cache)
        return self._datasets[image_size]

    def _ingest(self, cache: Path) -> None:
        from ultrafedfm.config import from_mapping
        from ultrafedfm.data.ingest import ingest_dicom_folder
        from ultrafedfm.data.ingest_config import IngestConfig

        ingest_config = from_mapping(IngestConfig, self.config.ingest, source="site.yaml", prefix="ingest")
        _logger.info("%s: ingesting %s into %s", self.site_name, self.config.dicom, cache)
        ingest_dicom_folder(source=self.config.dicom, cache=cache, config=ingest_config, progress=False)

    def model(self, training: Mapping[str, Any]) -> torch.nn.Module:
        key = tuple(sorted((k, str(v)) for k, v in training.items()))
        if self._model is None or self._model_key != key:
            self._model, self._model_key = build_model(training), key
        return self._model

    def train_round(
        self, *, global_params: Mapping[str, Any], training: Mapping[str, Any], lr: float, round_index: int
    ) -> SiteUpdate:
        """Train from ``global_params`` for the job's local epochs/steps at rate ``lr``."""
        from ultrafedfm.train.pretrain import train_local

        if training.get("differential_privacy"):
            raise RuntimeError("the job asks for DP-SGD, which this version does not implement")
        model = self.model(training)
        load_params(model, global_params)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dataset = self.dataset(int(training["img_size"]))
        config = pretrain_config(training, num_workers=self.config.num_workers)
        result = train_local(
            model=model,
            dataset=dataset,
            config=config,
            epochs=training.get("local_epochs"),
            steps=training.get("local_steps"),
            lr=lr,
            device=self._device(),
            checkpoint_dir=None,
            resume=False,
            generator_seed=local_generator_seed(int(training["seed"]), round_index, self.site_name),
            progress=False,
        )
        model.to("cpu")
        delta = {k: v.detach() - start[k] for k, v in model.state_dict().items()}
        return SiteUpdate(
            delta=delta,
            num_samples=len(dataset),
            steps=int(result.steps),
            loss=float(result.mean_loss),
            train_seconds=float(result.seconds),
        )

    def _device(self) -> str:
        if self.config.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.config.device
