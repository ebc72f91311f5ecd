"""One site's round of training, without FLARE: global weights in, delta and sample count out.

A site process keeps one :class:`SiteTrainer` for a job (its dataset and model across
rounds); :meth:`SiteTrainer.train_round` trains from the global weights under the job's
:class:`~ultrafedfm.federation.contract.TrainingContract`. When the contract turns DP-SGD on,
the round is planned and charged by the site's own ``ultrafedfm.privacy.dp.SiteDP`` (its ledger
on the site's disk) before any step, and trained through its Opacus privatizer; a round that would
pass the site's cap raises ``BudgetExhausted`` and does not train. What leaves the site is built from
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
from ultrafedfm.privacy.dp import DPPlan, RoundPrivacy, SiteDP, site_ledger_path
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
    privacy: RoundPrivacy | None = None  # the site's own DP figures after this round (DP off: None)


class SiteTrainer:
    """Holds a site's dataset and model across rounds (one per site process)."""

    def __init__(self, *, site_name: str, site_config: SiteConfig):
        self.site_name = site_name
        self.config = site_config
        self._datasets: dict[int, Any] = {}
        self._model: torch.nn.Module | None = None
        self._contract: TrainingContract | None = None
        self._site_dp: SiteDP | None = None
        self._dp_plans: dict[tuple[TrainingContract, int], DPPlan] = {}
        self._labelled: dict[TrainingContract, Any] = {}
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
        self, *, global_params: Mapping[str, Any], contract: TrainingContract, lr: float, round_index: int,
        job_id: str = "local", generator_seed: int | None = None,
    ) -> SiteUpdate:
        """Train from ``global_params`` for the contract's local epochs/steps at rate ``lr``.

        Args:
            job_id: the transport's id of this job run (the DP ledger charges rounds per job run).
            generator_seed: data order, masking and degradations (default: a function of the
                contract's seed, the round and the site, :func:`local_generator_seed`).
        """
        model = self.model(contract)
        load_params(model, global_params)
        start = {k: v.detach().clone() for k, v in model.state_dict().items()}
        dataset = self.training_data(contract)
        dp_round = None
        if contract.dp.enabled:  # charged before any step: a round past the site's cap never trains
            dp_round = self.site_dp().begin_round(self._dp_plan(contract, len(dataset)), job_id=job_id,
                                                  round_index=round_index)
        try:
            result = self._train(model, dataset, contract, lr=lr, round_index=round_index,
                                 generator_seed=generator_seed, privatize=dp_round.privatize if dp_round else None)
            privacy = dp_round.finish() if dp_round else None
        finally:
            if dp_round is not None:
                dp_round.close()  # releases the model from Opacus, also when training failed
        model.to("cpu")
        delta = {k: v.detach() - start[k] for k, v in model.state_dict().items()}
        if privacy is not None:
            _logger.info("%s: round %d: DP-SGD spent epsilon %.3f for this job (delta %.2g; lifetime %.3f), noise %.3f",
                         self.site_name, round_index + 1, privacy.epsilon_job, privacy.delta,
                         privacy.epsilon_lifetime, privacy.noise_multiplier)
        steps, loss, seconds = result
        return SiteUpdate(delta=delta, num_samples=len(dataset), steps=int(steps), loss=float(loss),
                          train_seconds=float(seconds), privacy=privacy)

    def training_data(self, contract: TrainingContract):
        """What this site trains on: its image cache (pretraining), or the training split of its labelled
        folder (fine-tuning; kept per contract)."""
        if contract.finetune is None:
            return self.dataset(contract.img_size)
        if contract not in self._labelled:
            from ultrafedfm.federation.finetune import site_training_view

            self._labelled[contract] = site_training_view(self.config, contract.finetune, img_size=contract.img_size,
                                                          seed=contract.seed, site_name=self.site_name)
        return self._labelled[contract]

    def _train(self, model, dataset, contract: TrainingContract, *, lr: float, round_index: int,
               generator_seed: int | None, privatize) -> tuple[int, float, float]:
        """(steps, mean loss, seconds) of one round's local training."""
        if generator_seed is None:
            generator_seed = local_generator_seed(contract.seed, round_index, self.site_name)
        if contract.finetune is not None:
            from ultrafedfm.federation.finetune import finetune_config
            from ultrafedfm.train.finetune_local import finetune_local

            config = finetune_config(contract.finetune, batch_size=contract.batch_size, base_lr=contract.base_lr,
                                     weight_decay=contract.weight_decay, seed=contract.seed)
            update = finetune_local(model=model, global_state=model.state_dict(), dataset=dataset, config=config,
                                    lr=lr, epochs=contract.local_epochs, steps=contract.local_steps,
                                    privatize=privatize, generator_seed=generator_seed, device=self._device())
            return update.steps, update.loss, update.train_seconds
        from ultrafedfm.train.pretrain import train_local

        result = train_local(
            model=model, dataset=dataset, config=contract.pretrain_config(num_workers=self.config.num_workers),
            epochs=contract.local_epochs, steps=contract.local_steps, lr=lr, device=self._device(),
            checkpoint_dir=None, resume=False, privatize=privatize, generator_seed=generator_seed, progress=False,
        )
        return result.steps, result.mean_loss, result.seconds

    def site_dp(self) -> SiteDP:
        """The site's DP-SGD state: its policy and its ledger (beside its cache), for its whole life."""
        if self._site_dp is None:
            self._site_dp = SiteDP(site_name=self.site_name, policy=self.config.privacy,
                                   ledger_path=site_ledger_path(self.config.cache))
        return self._site_dp

    def _dp_plan(self, contract: TrainingContract, num_images: int) -> DPPlan:
        """The job's DP at this site, planned once per contract (may refuse, naming the policy key)."""
        key = (contract, num_images)
        if key not in self._dp_plans:
            self._dp_plans[key] = self.site_dp().plan(
                contract.dp, job=contract.job, num_images=num_images, batch_size=contract.batch_size,
                rounds=contract.num_rounds, local_epochs=contract.local_epochs, local_steps=contract.local_steps)
        return self._dp_plans[key]

    def _device(self) -> str:
        if self.config.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.config.device
