"""Every privacy decision of UltraFedFM, in one package.

- :mod:`~ultrafedfm.privacy.policy`: the site's own policy (``site.yaml`` ``privacy:``) and
  :func:`admit_job`, the one gate every job request passes at a site.
- :mod:`~ultrafedfm.privacy.dp`: DP-SGD at the site: the job's :class:`DPConfig`, the site's plan
  for it, the budget ledger on the site's disk (its accountant, spanning rounds and jobs) and the
  per-round budget check (:class:`SiteDP`); the trainer hook ``DPPrivatizer`` lives in
  :mod:`ultrafedfm.privacy.dp.privatizer` (torch and Opacus are imported only there).

Other modules ask this package; none re-implements a check.
"""
from ultrafedfm.privacy.policy import Admission, JobRequest, PolicyRefusal, PrivacyPolicy, admit_job, policy_key
from ultrafedfm.privacy.dp import (
    BudgetExhausted, DPConfig, DPPlan, DPRound, LedgerEntry, LedgerError, PrivacyLedger, RoundPrivacy, SiteDP,
    plan_job, read_ledger, site_ledger_path,
)

__all__ = [
    "Admission", "BudgetExhausted", "DPConfig", "DPPlan", "DPRound", "JobRequest", "LedgerEntry", "LedgerError",
    "PolicyRefusal", "PrivacyLedger", "PrivacyPolicy", "RoundPrivacy", "SiteDP", "admit_job", "plan_job",
    "policy_key", "read_ledger", "site_ledger_path",
]
