"""One site's round of training, without FLARE: global weights in, delta and sample count out.

A site process keeps one :class:`SiteTrainer` for a job (its dataset and model across
rounds); :meth:`SiteTrainer.train_round` trains from the global weights under the job's
:class:`~ultrafedfm.federation.contract.TrainingContract`. What leaves the site is built from
the :class:`SiteUpdate` elsewhere (``federation.site_session``) -- never pixels, manifests or file
names.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch

from ultrafedfm.federation.contract import TrainingContract
from ultrafedfm.federation.model_io import load_params
from ultrafedfm.seeds import mix_seed
from ultrafedfm.site_config import SiteConfig

_logger = logging.getLogger(__name__)

__all__ = ["SiteTrainer", "SiteUpdate", "local_generator_seed"]


def local_generator_seed(seed: int, round_index: int, site_name: str) -> int:
    """The data-order/masking seed a site uses in a round (distinct per site and round)."""
    return mix_seed(seed, round_index, site_name, bits=31)


@dataclass
class SiteUpdate:
    """What a site's round of training produced (kept at the site; only its masked form leaves)."""

    delta: dict[str, torch.Tensor]
    num_samples: int
    steps: int
    loss: float
    train_seconds: float


class SiteTrainer:
    """Holds a site's dataset and model across rounds (one per site process)."""

    def __init__(self, *, site_name: str, site_config: SiteConfig):
        self.site_name = site_name
        self.config = site_config
        self._datasets: dict[int, Any] = {}
        self._model: torch.nn.Module | None = None
        self._contract: TrainingContract | None = None
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
            _logger.info("%s: %d training images in %s", self.site_name, len(dataset), cache)
        return self._datasets[image_size]

    def _ingest(self, cache: Path) -> None:
        from ultrafedfm.data.ingest import ingest_dicom_folder

        _logger.info("%s: ingesting %s into %s", self.site_name, self.config.dicom, cache)
        ingest_dicom_folder(source=self.config.dicom, cache=cache, config=self.config.ingest, progress=False)

    def model(self, contract: TrainingContract) -> torch.nn.Module:
        """The site's model for ``contract`` (rebuilt only when the contract changes)."""
        if self._model is None or self._contract != contract:
            self._model, self._contract = contract.initial_model(), contract
        return self._model

    def train_round(
        self, *, global_params: Mapping[str, Any], contract: TrainingContract, lr: float, round_index: int
    ) -> SiteUpdate:
        """Train from ``global_params`` for the contract's local epochs/steps at rate ``lr``."""
        from ultrafedfm.train.pretrain import train_local

        if contract.differential_privacy:
            raise RuntimeError("the job asks for DP-SGD, which this version does not implement")
        model = self.model(contract)
        load_params(model, global_params)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dataset = self.dataset(contract.img_size)
        result = train_local(
            model=model,
            dataset=dataset,
            config=contract.pretrain_config(num_workers=self.config.num_workers),
            epochs=contract.local_epochs,
            steps=contract.local_steps,
            lr=lr,
            device=self._device(),
            checkpoint_dir=None,
            resume=False,
            generator_seed=local_generator_seed(contract.seed, round_index, self.site_name),
            progress=False,
        )
        model.to("cpu")
        delta = {k: v.detach() - start[k] for k, v in model.state_dict().items()}
        return SiteUpdate(delta=delta, num_samples=len(dataset), steps=int(result.steps),
                          loss=float(result.mean_loss), train_seconds=float(result.seconds))

    def _device(self) -> str:
        if self.config.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.config.device
