"""Every privacy decision of UltraFedFM, in one package.

- :mod:`~ultrafedfm.privacy.policy`: the site's own policy (``site.yaml`` ``privacy:``) and
  :func:`admit_job`, the one gate every job request passes at a site.

Other modules ask this package; none re-implements a check.
"""
from ultrafedfm.privacy.policy import Admission, JobRequest, PolicyRefusal, PrivacyPolicy, admit_job, policy_key

__all__ = ["Admission", "JobRequest", "PolicyRefusal", "PrivacyPolicy", "admit_job", "policy_key"]
