"""DP-SGD for one round of local training: the trainers' ``privatize`` hook, built on Opacus.

:class:`DPPrivatizer` is called by :func:`ultrafedfm.train.pretrain.train_local` (MAE pretraining)
or :func:`ultrafedfm.train.finetune_local.finetune_local` (fine-tuning) with the model,
optimizer and data loader it built, and returns Opacus' replacements (the order Opacus'
``make_private`` uses with ghost clipping)::

    privatizer = DPPrivatizer(plan)                       # plan: ultrafedfm.privacy.dp.plan_job(...)
    train_local(model=mae, dataset=images, config=config, lr=lr, privatize=privatizer)
    privatizer.steps_taken, privatizer.clipping_used      # what the ledger records
    privatizer.close()                                    # the model is plain again for the next round

What it sets up:
- Poisson sampling at exactly the plan's rate (each image joins each step independently), with
  empty batches handled (they still add noise), from a generator seeded by the operating
  system: the server knows the job's seed, so nothing it could replay may choose the batches.
- Per-image clipping at ``max_grad_norm``: ghost clipping (per-image gradient norms without
  per-image gradients) by default, Opacus hooks (per-image gradients) when asked or when Opacus
  refuses ghost clipping on the model, said in the log and recorded in ``clipping_used``.
- Gaussian noise of std ``noise_multiplier * max_grad_norm`` on the sum of clipped gradients,
  from its own OS-seeded generator on the model's device.
- The loss per image (the MAE's ``reduction="none"``; cross-entropy, or BCE + Dice, per image when
  fine-tuning), reduced by Opacus' criterion wrapper.
- A model Opacus cannot train privately (BatchNorm mixes the images of a batch) is refused before
  anything runs, with what to do; a fine-tuning job with ``dp`` on builds its network without it.

Opacus computes per-image gradients of a parameter-owning module from its captured activations,
so such modules must be deterministic; the MAE keeps all randomness (masking, degradations) in
its parameter-free top module (see :mod:`ultrafedfm.models.mae`).
"""
from __future__ import annotations

import logging
import math
import secrets
import warnings

import torch
import torch.nn as nn
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from ultrafedfm.privacy.dp.plan import DPPlan

_logger = logging.getLogger(__name__)

__all__ = ["DPPrivatizer", "PerImageLoss"]


class PerImageLoss(nn.Module):
    """The criterion Opacus wraps: per-image losses (N,) -> their mean, sum, or themselves (``reduction``)."""

    def __init__(self, reduction: str = "mean"):
        super().__init__()
        self.reduction = reduction  # Opacus' ghost clipping switches it to "none" for its first pass

    def forward(self, per_image: torch.Tensor) -> torch.Tensor:
        if self.reduction == "none":
            return per_image
        if self.reduction == "sum":
            return per_image.sum()
        return per_image.mean()


class DPPrivatizer:
    """The ``privatize`` hook of :func:`~ultrafedfm.train.pretrain.train_local` for one round of ``plan``.

    Args:
        plan: the site's resolved DP-SGD for this job (:func:`~ultrafedfm.privacy.dp.plan_job`).
        noise_seed / sampling_seed: seeds for the noise and the Poisson sampling, for tests and
            benchmarks only. Anyone who knows them can subtract the noise or knows the batches,
            which voids the guarantee; the default (``None``) seeds both from the operating system.
    """

    def __init__(self, plan: DPPlan, *, noise_seed: int | None = None, sampling_seed: int | None = None):
        self.plan = plan
        self._noise_seed = noise_seed
        self._sampling_seed = sampling_seed
        if noise_seed is not None or sampling_seed is not None:
            _logger.warning("DP-SGD with fixed noise/sampling seeds: for tests and benchmarks only; a known seed "
                            "voids the privacy guarantee")
        self.clipping_used: str | None = None
        self.fallback_reason: str | None = None
        self._engine: PrivacyEngine | None = None
        self._module = None

    def __call__(self, model: nn.Module, optimizer: Optimizer, loader: DataLoader):
        """Return ``(module, optimizer, criterion, loader)``: Opacus' DP-SGD versions of the trainer's objects."""
        if self._engine is not None:
            raise RuntimeError("a DPPrivatizer serves one round; make a new one for the next round")
        plan = self.plan
        if len(loader.dataset) != plan.num_images or len(loader) != plan.steps_per_epoch:
            raise ValueError(f"the data loader has {len(loader.dataset)} images in {len(loader)} batches, but the DP "
                             f"plan was made for {plan.num_images} in {plan.steps_per_epoch}: the ledger would charge "
                             "the wrong sampling rate. Plan with this site's dataset and the job's batch size")
        _check_trainable_privately(model)
        device = next(model.parameters()).device
        dp_loader = _poisson_loader(loader, plan.steps_per_epoch, _generator("cpu", self._sampling_seed))
        noise_generator = _generator(device, self._noise_seed)
        # The engine's own accountant only counts this round's steps (checked against the ledger's
        # charge); the site's accountant is its ledger, which spans rounds and jobs.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")  # we pass OS-seeded generators
            self._engine = PrivacyEngine(accountant=plan.accountant)
        modes = [plan.clipping] if plan.clipping == "hooks" else ["ghost", "hooks"]
        for mode in modes:
            try:
                out = self._engine.make_private(
                    module=model, optimizer=optimizer, data_loader=dp_loader, criterion=PerImageLoss(),
                    noise_multiplier=plan.noise_multiplier, max_grad_norm=plan.max_grad_norm,
                    poisson_sampling=False,  # dp_loader already samples; Opacus' own rounds 1/(1/n) down
                    grad_sample_mode=mode, noise_generator=noise_generator, loss_reduction="mean",
                )
            except Exception as exc:  # Opacus raises several types for modules it cannot handle
                if mode == modes[-1]:
                    raise
                self.fallback_reason = f"{type(exc).__name__}: {exc}"
                _logger.warning("Opacus refuses ghost clipping on this model (%s); falling back to per-sample "
                                "gradient hooks (same guarantee, more memory and time)", self.fallback_reason)
                continue
            break
        if len(out) == 4:
            module, dp_optimizer, criterion, dp_loader = out
        else:
            (module, dp_optimizer, dp_loader), criterion = out, PerImageLoss()
        module.forbid_grad_accumulation()  # a second backward before step() would mix two batches' gradients
        self.clipping_used, self._module = mode, module
        _logger.info("DP-SGD: %s clipping at %g, noise multiplier %.4g, Poisson rate %.4g, %d steps per epoch",
                     mode, plan.max_grad_norm, plan.noise_multiplier, plan.sample_rate, len(dp_loader))
        return module, dp_optimizer, criterion, dp_loader

    @property
    def steps_taken(self) -> int:
        """Noisy optimizer steps Opacus took (each one counted by its accountant)."""
        if self._engine is None:
            return 0
        return sum(steps for _, _, steps in self._engine.accountant.history)

    def close(self) -> None:
        """Remove Opacus' hooks and per-sample attributes from the model (it is reused next round)."""
        if self._module is not None:
            self._module.cleanup()
            self._module = None


def _check_trainable_privately(model: nn.Module) -> None:
    """Refuse, before any step, a model Opacus would refuse (or train wrongly): BatchNorm and the like."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        return
    batch_norms = [name for name, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    reasons = sorted({str(p).split(". ")[0] for p in problems if "BatchNorm" not in str(p)})
    found = list(reasons)
    if batch_norms:
        listed = ", ".join(batch_norms[:3]) + (", ..." if len(batch_norms) > 3 else "")
        found.insert(0, f"{len(batch_norms)} BatchNorm layers ({listed}), which mix the images of a batch")
    raise ValueError(f"DP-SGD cannot train this {type(model).__name__}: {'; '.join(found)}. Build the model without "
                     "them (a fine-tuning job with `dp` enabled builds its network dp_compatible: GroupNorm in place "
                     "of BatchNorm)")


def _generator(device: torch.device | str, seed: int | None) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(secrets.randbits(63) if seed is None else seed)
    return generator


def _poisson_loader(loader: DataLoader, steps_per_epoch: int, generator: torch.Generator) -> DPDataLoader:
    """Opacus' Poisson loader with ``steps_per_epoch`` steps at rate ``1 / steps_per_epoch`` (or a hair below).

    Opacus derives the step count as ``int(1 / rate)``, which for 1 in 17 step counts (93, 99,
    ...) is one short in floating point; the rate is then lowered by one ulp, so the accountant's
    ``1 / steps_per_epoch`` stays an upper bound on the true rate.
    """
    rate = 1.0 / steps_per_epoch
    while int(1 / rate) < steps_per_epoch:
        rate = math.nextafter(rate, 0.0)
    dp_loader = DPDataLoader(
        loader.dataset, sample_rate=rate, num_workers=loader.num_workers, collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory, timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=generator,
        prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
    )
    if len(dp_loader) != steps_per_epoch:
        raise RuntimeError(f"Opacus' Poisson loader has {len(dp_loader)} steps per epoch, not {steps_per_epoch}")
    return dp_loader
