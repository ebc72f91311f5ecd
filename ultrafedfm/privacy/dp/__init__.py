"""Differential privacy at each site: DP-SGD (Opacus), the site's accountant and budget ledger.

- :mod:`~ultrafedfm.privacy.dp.config`: :class:`DPConfig`, a job's DP settings (typed contract).
- :mod:`~ultrafedfm.privacy.dp.plan`: :func:`plan_job`, the job's DP resolved with the site's
  image count and checked against its policy.
- :mod:`~ultrafedfm.privacy.dp.ledger`: the ledger on the site's disk, budget checks, reader.
- :mod:`~ultrafedfm.privacy.dp.accounting`: epsilon (PRV or RDP) and noise calibration.
- :mod:`~ultrafedfm.privacy.dp.site`: :class:`SiteDP`, the calls a site makes per job and round.
- :mod:`~ultrafedfm.privacy.dp.privatizer`: :class:`DPPrivatizer`, the trainer's ``privatize``
  hook (imports torch and Opacus; import it from its module).

Everything here but the privatizer imports no torch.
"""
from ultrafedfm.privacy.dp.accounting import Mechanism, calibrate_noise, compute_epsilon
from ultrafedfm.privacy.dp.config import DPConfig, default_delta
from ultrafedfm.privacy.dp.ledger import (
    BudgetExhausted, Ledger, LedgerEntry, LedgerError, PrivacyLedger, Spent, read_ledger, site_ledger_path,
)
from ultrafedfm.privacy.dp.plan import DPPlan, plan_job
from ultrafedfm.privacy.dp.site import DPRound, RoundPrivacy, SiteDP

__all__ = [
    "BudgetExhausted", "DPConfig", "DPPlan", "DPRound", "Ledger", "LedgerEntry", "LedgerError", "Mechanism",
    "PrivacyLedger", "RoundPrivacy", "SiteDP", "Spent", "calibrate_noise", "compute_epsilon", "default_delta",
    "plan_job", "read_ledger", "site_ledger_path",
]
