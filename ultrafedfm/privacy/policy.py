"""A site's privacy policy and the one gate every job request passes at that site.

The hospital writes its policy into the ``privacy:`` section of its own ``site.yaml``; a job
never carries it and can never weaken it. Before a site does anything for a task, the task's
request goes through :func:`admit_job`::

    admission = admit_job(policy, JobRequest(job="mae_pretrain", secure_aggregation=True,
                                             secagg=to_mapping(secagg_config)), site_name="hospital-a")
    admission.secagg          # the SecAggConfig this site will run the round with

    admission.dp              # the DPConfig this site will train with (None: DP off)

A request asking for less than the policy requires raises :class:`PolicyRefusal`, whose
message names the job, the site, the policy key and both values, and carries no path or file
name (it is sent to the server). What depends on the site's own data (the noise a target
epsilon needs, the default delta, the epsilon already spent) is checked where the site has it:
``ultrafedfm.privacy.dp.SiteDP.plan`` per job and ``begin_round`` per round. Framework-free: the
FLARE site script, the CLI and the tests call it alike.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, Mapping

from ultrafedfm.config import ConfigError, check, from_mapping

_logger = logging.getLogger(__name__)

__all__ = [
    "Admission", "JobRequest", "PolicyRefusal", "PrivacyPolicy", "SECAGG_PROTECTIVE_SETTINGS", "admit_job",
    "policy_key",
]

POLICY_SECTION = "privacy"


def policy_key(name: str) -> str:
    """The dotted ``site.yaml`` key of a policy field, e.g. ``privacy.require_dp``."""
    return f"{POLICY_SECTION}.{name}"


@dataclass
class PrivacyPolicy:
    """The site's minimum protection for any job (``site.yaml`` section ``privacy``).

    Args:
        require_secure_aggregation: refuse a job that sends this site's update unmasked.
        require_dp: refuse a job that does not train with DP-SGD at this site.
        max_epsilon: the most epsilon one job may spend at this site (``None``: no per-job cap).
        lifetime_epsilon: the most epsilon all jobs together may spend (``None``: no lifetime cap).
        max_delta: the largest delta a job may use (``None``: the DP default of at most 1/(10 N)).
        min_noise_multiplier: the smallest DP-SGD noise multiplier a job may use.
        min_sites: the fewest sites this site accepts in a secure-aggregation roster, key-sharing
            set and survivor set, whatever the job says (at least 3: with two sites, each learns
            the other's update from the sum; DESIGN.md's threat model).
        confirm_new_members: a site the project admin adds to the member list counts for this
            site only after its own IT accepts the new member's fingerprint
            (``ultrafedfm kit members --accept-site``); ``False`` (the default) pins new members
            on sight with a WARNING. Whoever holds the admin membership key can add members, so a
            site that does not trust that key alone sets this.
    """

    require_secure_aggregation: bool = True
    require_dp: bool = False
    max_epsilon: float | None = None
    lifetime_epsilon: float | None = None
    max_delta: float | None = None
    min_noise_multiplier: float = 0.0
    min_sites: int = 3
    confirm_new_members: bool = False

    def __post_init__(self) -> None:
        check(self.max_epsilon is None or self.max_epsilon > 0, "max_epsilon", "must be > 0 (or null)")
        check(self.lifetime_epsilon is None or self.lifetime_epsilon > 0, "lifetime_epsilon", "must be > 0 (or null)")
        check(self.max_delta is None or 0 < self.max_delta < 1, "max_delta", "must be in (0, 1) (or null)")
        check(self.min_noise_multiplier >= 0, "min_noise_multiplier", "must be >= 0")
        check(not isinstance(self.min_sites, bool) and isinstance(self.min_sites, int) and self.min_sites >= 3,
              "min_sites", "must be an integer >= 3 (with two sites each learns the other's update from the sum)")
        check(isinstance(self.confirm_new_members, bool), "confirm_new_members", "must be true or false")


class PolicyRefusal(RuntimeError):
    """A job asks for less protection than the site's policy; the message is safe to send to the server.

    ``key`` names the policy key (``privacy.require_dp``) or job setting at fault.
    """

    def __init__(self, message: str, *, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class JobRequest:
    """What one task of a job asks of a site, as the site sees it.

    Args:
        job: the job's name (named in a refusal).
        secure_aggregation: whether the site's update would leave masked.
        differential_privacy: the job's on/off switch for DP-SGD, for callers that send no ``dp``
            settings yet; ``True`` without ``dp`` is refused (DP-SGD needs a noise multiplier or a
            target epsilon). Superseded by ``dp``.
        secagg: the job's ``SecAggConfig`` as a mapping (``to_mapping``), when secure aggregation is on.
        dp: the job's ``DPConfig`` as a mapping (``to_mapping``); ``None``: DP off.
    """

    job: str
    secure_aggregation: bool
    differential_privacy: bool = False
    secagg: Mapping[str, Any] | None = None
    dp: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class Admission:
    """What the site agreed to run: the secure-aggregation and DP settings it checked (``None``: off).

    ``min_sites`` is the floor the site holds every secure-aggregation roster, key-sharing set and
    survivor set to: the larger of its policy's ``privacy.min_sites`` and the job's ``min_sites``.
    """

    secagg: Any = None  # SecAggConfig; typed loosely to keep this module light to import
    dp: Any = None  # DPConfig with enabled=True, or None
    min_sites: int = 3


# Settings of SecAggConfig whose weaker value would expose a site; a job may not turn them down.
# The consistency check stops a server from showing sites different survivor lists; the threshold
# is already floored at a strict majority by SecAggConfig.threshold_for.
SECAGG_PROTECTIVE_SETTINGS: Mapping[str, Any] = {"consistency_check": True}


def admit_job(policy: PrivacyPolicy, request: JobRequest, *, site_name: str) -> Admission:
    """Check ``request`` against the site's ``policy``; raise :class:`PolicyRefusal` naming the key.

    Returns the :class:`Admission` the site runs the task with.
    """
    refuse = _Refuser(site_name=site_name, job=request.job)
    if policy.require_secure_aggregation and not request.secure_aggregation:
        refuse("require_secure_aggregation", True,
               "the job turns secure aggregation off",
               "Run the job with secure_aggregation: true")
    dp = _dp_config(request, site_name=site_name)
    if policy.require_dp and dp is None:
        refuse("require_dp", True,
               "the job does not train with DP-SGD",
               "Run a job with DP-SGD on (dp: enabled: true)")
    if dp is not None:
        _check_dp_floor(policy, dp, refuse)
    secagg = None
    min_sites = policy.min_sites
    if request.secure_aggregation:
        secagg = _secagg_config(request.secagg, site_name=site_name, job=request.job)
        min_sites = max(min_sites, secagg.min_sites)
    return Admission(secagg=secagg, dp=dp, min_sites=min_sites)


def _dp_config(request: JobRequest, *, site_name: str):
    """The job's DPConfig when it trains with DP (validated), else ``None``."""
    from ultrafedfm.privacy.dp.config import DPConfig  # deferred: the dp package imports this module

    refusing = f"site '{site_name}' refuses job '{request.job}'"
    if request.dp is None:
        if request.differential_privacy:
            raise PolicyRefusal(f"{refusing}: the job turns DP-SGD on but carries no DP settings (dp: with "
                                "noise_multiplier or target_epsilon)", key="dp")
        return None
    try:
        dp = from_mapping(DPConfig, request.dp, source="the job's DP settings")
    except ConfigError as exc:
        raise PolicyRefusal(f"{refusing}: DP setting dp.{exc.key}: {exc.bare_message}",
                            key=f"dp.{exc.key}" if exc.key else "dp") from None
    if not dp.enabled and request.differential_privacy:
        raise PolicyRefusal(f"{refusing}: the job says differential_privacy: true but its DP settings have "
                            "enabled: false", key="dp.enabled")
    return dp if dp.enabled else None


def _check_dp_floor(policy: PrivacyPolicy, dp, refuse: "_Refuser") -> None:
    """Refuse DP settings weaker than the policy's floor where the job states them outright."""
    if dp.noise_multiplier is not None and dp.noise_multiplier < policy.min_noise_multiplier:
        refuse("min_noise_multiplier", policy.min_noise_multiplier,
               f"the job sets noise multiplier {dp.noise_multiplier:g}",
               "Run the job with more noise")
    if dp.target_epsilon is not None and policy.max_epsilon is not None and dp.target_epsilon > policy.max_epsilon:
        refuse("max_epsilon", policy.max_epsilon,
               f"the job asks for target epsilon {dp.target_epsilon:g}",
               "Run the job with a smaller target epsilon")
    if dp.delta is not None and policy.max_delta is not None and dp.delta > policy.max_delta:
        refuse("max_delta", policy.max_delta,
               f"the job asks for delta {dp.delta:g}",
               "Run the job with a smaller delta, or none for the site's default")


def _secagg_config(mapping: Mapping[str, Any] | None, *, site_name: str, job: str):
    """The job's SecAggConfig as this site will run it; a weakened protective setting is refused."""
    from ultrafedfm.secagg.params import SecAggConfig  # deferred: cryptography is not needed for plain jobs

    if mapping is None:
        raise PolicyRefusal(f"site '{site_name}' refuses job '{job}': secure aggregation is on but the task carries "
                            "no secure-aggregation settings", key="secagg")
    known = {f.name for f in fields(SecAggConfig)}
    unknown = sorted(set(mapping) - known)
    if unknown:
        raise PolicyRefusal(f"site '{site_name}' refuses job '{job}': unknown secure-aggregation settings {unknown} "
                            f"sent by the server (known: {sorted(known)})", key=f"secagg.{unknown[0]}")
    for name, required in SECAGG_PROTECTIVE_SETTINGS.items():
        if name in mapping and mapping[name] != required:
            raise PolicyRefusal(f"site '{site_name}' refuses job '{job}': the server asks for secure-aggregation "
                                f"{name}={mapping[name]!r}, which weakens the protocol; this site runs only with "
                                f"{name}={required!r}", key=f"secagg.{name}")
    try:
        return from_mapping(SecAggConfig, mapping, source="the job's secure-aggregation settings")
    except ConfigError as exc:
        raise PolicyRefusal(f"site '{site_name}' refuses job '{job}': secure-aggregation setting {exc.key}: "
                            f"{exc.bare_message}", key=f"secagg.{exc.key}") from None


@dataclass(frozen=True)
class _Refuser:
    site_name: str
    job: str

    def __call__(self, field_name: str, value: Any, why: str, fix: str) -> None:
        key = policy_key(field_name)
        shown = "true" if value is True else f"{value:g}" if isinstance(value, float) else value
        raise PolicyRefusal(
            f"site '{self.site_name}' refuses job '{self.job}': {why}, and the site's site.yaml sets {key}: {shown}. "
            f"{fix} (or the site's IT changes {key} in its own site.yaml)", key=key)
