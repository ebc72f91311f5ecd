"""A job's DP-SGD at one site, resolved with the site's own data: :func:`plan_job` -> :class:`DPPlan`.

What a job's :class:`~ultrafedfm.privacy.dp.config.DPConfig` leaves open depends on the site:
the Poisson rate (one over the steps of an epoch, ``ceil(N / batch)``), the default delta
(``1 / (10 N)``) and, for a target epsilon, the noise that reaches it over the job's rounds x
local epochs. The site works these out from its own image count N, which never leaves it, and
checks the outcome against its policy (minimum noise, maximum delta, per-job epsilon cap)
before the first round. A refusal names the policy key and the values, never N or a path.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from ultrafedfm.privacy.dp.accounting import Mechanism, calibrate_noise, compute_epsilon
from ultrafedfm.privacy.dp.config import Accountant, Clipping, DPConfig, default_delta
from ultrafedfm.privacy.policy import PolicyRefusal, PrivacyPolicy, policy_key

_logger = logging.getLogger(__name__)

__all__ = ["DPPlan", "plan_job"]


@dataclass(frozen=True)
class DPPlan:
    """The DP-SGD one job runs at one site (every value the site's ledger charges per round).

    Args:
        job: the job's name.
        noise_multiplier: Gaussian noise std / ``max_grad_norm`` (given, or calibrated here).
        max_grad_norm: per-image clipping norm.
        delta: the delta of this job's guarantee at this site.
        sample_rate: Poisson rate the accountant charges, ``1 / steps_per_epoch``.
        steps_per_epoch: DP-SGD steps of one local epoch, ``ceil(num_images / batch_size)``.
        steps_per_round: DP-SGD steps of one round.
        rounds: rounds the job declared; the site charges at most this many distinct rounds.
        num_images / batch_size: the site's image count and the job's expected batch size.
        accountant / clipping: as in :class:`DPConfig`.
        target_epsilon: the job's own epsilon budget at this site, when it set one.
        planned_epsilon: what all ``rounds`` rounds spend at this site if none is re-run.
    """

    job: str
    noise_multiplier: float
    max_grad_norm: float
    delta: float
    sample_rate: float
    steps_per_epoch: int
    steps_per_round: int
    rounds: int
    num_images: int
    batch_size: int
    accountant: Accountant
    clipping: Clipping
    target_epsilon: float | None
    planned_epsilon: float

    @property
    def round_mechanism(self) -> Mechanism:
        """What one round adds to the site's history."""
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps_per_round)


def _job_delta(config: DPConfig, policy: PrivacyPolicy, *, num_images: int, job: str, refusing: str) -> float:
    """The job's delta (the site's default 1/(10 N) unless the job sets one), checked against the policy."""
    delta = config.delta if config.delta is not None else default_delta(num_images, max_delta=policy.max_delta)
    if policy.max_delta is not None and delta > policy.max_delta:
        key = policy_key("max_delta")
        raise PolicyRefusal(f"{refusing}: the job asks for delta {delta:g}, and the site's site.yaml sets {key}: "
                            f"{policy.max_delta:g}. Run the job with a smaller delta (or none, for the site's "
                            f"default), or the site's IT raises {key}", key=key)
    if delta * num_images >= 1:
        raise PolicyRefusal(f"{refusing}: delta {delta:g} is not below 1/N for this site's image count, a "
                            "guarantee that permits releasing an image outright. Set dp.delta to null for the "
                            "site's default 1/(10 N)", key="dp.delta")
    if delta * num_images > 0.1:
        _logger.warning("job '%s' uses delta %g, above this site's default 1/(10 N) = %g", job, delta,
                        default_delta(num_images))
    return delta


def _check_noise_floor(noise: float, config: DPConfig, policy: PrivacyPolicy, *, refusing: str) -> None:
    if noise < policy.min_noise_multiplier:
        key = policy_key("min_noise_multiplier")
        how = ("sets noise multiplier" if config.noise_multiplier is not None
               else f"reaches its target epsilon {config.target_epsilon:g} here with noise multiplier")
        raise PolicyRefusal(f"{refusing}: the job {how} {noise:.4g}, and the site's site.yaml sets {key}: "
                            f"{policy.min_noise_multiplier:g}. Run the job with more noise or a smaller "
                            f"target epsilon, or the site's IT lowers {key}", key=key)


def plan_job(
    config: DPConfig,
    policy: PrivacyPolicy,
    *,
    site_name: str,
    job: str,
    num_images: int,
    batch_size: int,
    rounds: int,
    local_epochs: int | None = None,
    local_steps: int | None = None,
) -> DPPlan:
    """Resolve ``config`` for this site's ``num_images`` and check it against the site's ``policy``.

    Args:
        config: the job's DP settings (enabled).
        policy: the site's policy.
        site_name / job: named in a refusal.
        num_images: the images this site trains on (stays at the site).
        batch_size: the job's batch size (the expected Poisson batch).
        rounds: the job's number of rounds.
        local_epochs / local_steps: one round's length (exactly one of them).

    Raises:
        PolicyRefusal: the job would use less noise, a larger delta or more epsilon than the
            policy allows (key ``privacy.min_noise_multiplier``, ``privacy.max_delta``,
            ``privacy.max_epsilon``), or a delta of at least 1/N (key ``dp.delta``).
    """
    if not config.enabled:
        raise ValueError("plan_job needs a DPConfig with enabled: true")
    if (local_epochs is None) == (local_steps is None):
        raise ValueError(f"give local_epochs or local_steps, not {local_epochs=} and {local_steps=}")
    if num_images < 1 or batch_size < 1 or rounds < 1 or (local_epochs or local_steps or 0) < 1:
        raise ValueError(f"need num_images, batch_size, rounds and the round length >= 1, got {num_images}, "
                         f"{batch_size}, {rounds}, {local_epochs or local_steps}")
    refusing = f"site '{site_name}' refuses job '{job}'"
    steps_per_epoch = math.ceil(num_images / batch_size)
    sample_rate = 1.0 / steps_per_epoch
    steps_per_round = local_steps if local_steps is not None else local_epochs * steps_per_epoch
    total_steps = rounds * steps_per_round

    delta = _job_delta(config, policy, num_images=num_images, job=job, refusing=refusing)
    if config.noise_multiplier is not None:
        noise = config.noise_multiplier
    else:
        noise = calibrate_noise(target_epsilon=config.target_epsilon, delta=delta, sample_rate=sample_rate,
                                steps=total_steps, accountant=config.accountant)
        _logger.info("job '%s': noise multiplier %.4f reaches epsilon %g at delta %g over %d rounds x %d steps",
                     job, noise, config.target_epsilon, delta, rounds, steps_per_round)
    _check_noise_floor(noise, config, policy, refusing=refusing)

    planned, _ = compute_epsilon([Mechanism(noise, sample_rate, total_steps)], delta, config.accountant)
    if policy.max_epsilon is not None and planned > policy.max_epsilon:
        key = policy_key("max_epsilon")
        raise PolicyRefusal(f"{refusing}: its {rounds} rounds would spend epsilon {planned:.3f} (delta {delta:g}) "
                            f"at this site, and the site's site.yaml sets {key}: {policy.max_epsilon:g}. Run the "
                            f"job with more noise, fewer rounds or a target epsilon, or the site's IT raises {key}",
                            key=key)
    return DPPlan(job=job, noise_multiplier=noise, max_grad_norm=config.max_grad_norm, delta=delta,
                  sample_rate=sample_rate, steps_per_epoch=steps_per_epoch, steps_per_round=steps_per_round,
                  rounds=rounds, num_images=num_images, batch_size=batch_size, accountant=config.accountant,
                  clipping=config.clipping, target_epsilon=config.target_epsilon, planned_epsilon=planned)
