"""One site's DP-SGD across rounds and jobs: plan a job, charge each round before it trains, report the spend.

The site process keeps one :class:`SiteDP` for its lifetime; its ledger is the accountant's
state and outlives the process. The order of calls for a job with DP on::

    site_dp = SiteDP(site_name="hospital-a", policy=site_config.privacy, ledger_path=site_ledger_path(cache))
    plan = site_dp.plan(admission.dp, job="mae_pretrain", num_images=len(dataset), batch_size=64,
                        rounds=300, local_epochs=1)                       # once per job (may refuse)
    with site_dp.begin_round(plan, job_id=job_id, round_index=r) as dp_round:   # charge first (may refuse)
        train_local(model=mae, dataset=dataset, config=config, lr=lr, privatize=dp_round.privatize)
        spent = dp_round.finish()                                        # the site's own epsilon report

:class:`~ultrafedfm.privacy.policy.PolicyRefusal` (from ``plan``) and its subclass
:class:`~ultrafedfm.privacy.dp.ledger.BudgetExhausted` (from ``begin_round``) carry messages
that name the policy key and are safe to send to the server; the site then does not train.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from ultrafedfm.privacy.dp.accounting import Mechanism, compute_epsilon
from ultrafedfm.privacy.dp.config import DPConfig
from ultrafedfm.privacy.dp.ledger import LedgerEntry, PrivacyLedger, Spent
from ultrafedfm.privacy.dp.plan import DPPlan, plan_job
from ultrafedfm.privacy.policy import PrivacyPolicy, policy_key

_logger = logging.getLogger(__name__)

__all__ = ["DPRound", "RoundPrivacy", "SiteDP"]


@dataclass(frozen=True)
class RoundPrivacy:
    """What a site reports about its privacy after a round (its own figures, from its own ledger)."""

    epsilon_job: float
    delta: float
    epsilon_lifetime: float
    lifetime_delta: float
    accountant: str
    noise_multiplier: float
    steps: int
    clipping: str


class SiteDP:
    """A site's DP-SGD: its policy, its ledger, and the rounds it charges.

    Args:
        site_name: this site.
        policy: the site's own policy (``site.yaml`` ``privacy:``).
        ledger_path: the site's ledger (:func:`~ultrafedfm.privacy.dp.ledger.site_ledger_path`).
    """

    def __init__(self, *, site_name: str, policy: PrivacyPolicy, ledger_path: str | Path):
        self.site_name = site_name
        self.policy = policy
        self.ledger = PrivacyLedger(ledger_path, site_name=site_name)

    def plan(self, config: DPConfig, *, job: str, num_images: int, batch_size: int, rounds: int,
             local_epochs: int | None = None, local_steps: int | None = None) -> DPPlan:
        """:func:`~ultrafedfm.privacy.dp.plan.plan_job` for this site; warns when the lifetime cap will stop the job."""
        plan = plan_job(config, self.policy, site_name=self.site_name, job=job, num_images=num_images,
                        batch_size=batch_size, rounds=rounds, local_epochs=local_epochs, local_steps=local_steps)
        if self.policy.lifetime_epsilon is not None:
            ledger = self.ledger.read()
            delta = min(plan.delta, ledger.lifetime_delta() or plan.delta)
            whole_job = Mechanism(plan.noise_multiplier, plan.sample_rate, plan.rounds * plan.steps_per_round)
            projected, _ = compute_epsilon(ledger.history() + [whole_job], delta, plan.accountant)
            if projected > self.policy.lifetime_epsilon:
                _logger.warning("job '%s' would take this site's lifetime epsilon to %.3f (delta %g), above %s: %g; "
                                "the site will stop contributing before the round that passes it", job, projected,
                                delta, policy_key("lifetime_epsilon"), self.policy.lifetime_epsilon)
        return plan

    def begin_round(self, plan: DPPlan, *, job_id: str, round_index: int, noise_seed: int | None = None,
                    sampling_seed: int | None = None) -> "DPRound":
        """Charge the round in the ledger (raises ``BudgetExhausted`` past a cap), then hand out its privatizer.

        ``noise_seed`` / ``sampling_seed``: tests and benchmarks only (see ``DPPrivatizer``).
        """
        charge = self.ledger.charge_round(plan, job_id=job_id, round_index=round_index, policy=self.policy)
        from ultrafedfm.privacy.dp.privatizer import DPPrivatizer  # torch and Opacus only where a round trains

        return DPRound(ledger=self.ledger, charge=charge,
                       privatize=DPPrivatizer(plan, noise_seed=noise_seed, sampling_seed=sampling_seed))

    def spent(self, job_id: str | None = None) -> Spent:
        """Epsilon spent by one job run, or by the site over its lifetime (``job_id=None``)."""
        return self.ledger.spent(job_id)


@dataclass
class DPRound:
    """One charged round: pass ``privatize`` to ``train_local``, then :meth:`finish`.

    As a context manager it releases the model from Opacus on exit, also when training fails;
    the charge stays in the ledger either way (what was charged may have been spent).
    """

    ledger: PrivacyLedger
    charge: LedgerEntry
    privatize: "DPPrivatizer"  # noqa: F821 (imported lazily)
    finished: RoundPrivacy | None = None

    def finish(self) -> RoundPrivacy:
        """Record the round as completed (Opacus' step count checked against the charge); the site's figures."""
        if self.finished is not None:
            return self.finished
        steps = self.privatize.steps_taken
        self.privatize.close()
        self.ledger.record_completion(self.charge, steps_taken=steps, clipping=self.privatize.clipping_used or "none")
        c = self.charge
        self.finished = RoundPrivacy(epsilon_job=c.epsilon_job, delta=c.delta, epsilon_lifetime=c.epsilon_lifetime,
                                     lifetime_delta=c.lifetime_delta, accountant=c.accountant,
                                     noise_multiplier=c.noise_multiplier, steps=steps,
                                     clipping=self.privatize.clipping_used or "none")
        return self.finished

    def close(self) -> None:
        self.privatize.close()

    def __enter__(self) -> "DPRound":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
