"""The site's privacy-budget ledger: every DP-SGD charge, on the site's own disk, written before it is spent.

One JSON file per site (e.g. ``<cache>/privacy/dp_ledger.json``, mode 0600) lists entries in
order, numbered from 1:

- ``charge``: a round about to train, with everything the accountant needs (job, round, noise
  multiplier, sample rate, steps, delta) and the epsilon of the job and of the site's lifetime
  *after* it. Written durably before the round's first DP-SGD step, so a round killed midway
  is already paid for; a round that is run again is charged again.
- ``completed``: that round finished (steps Opacus actually took, the clipping used).
- ``refusal``: the site stopped contributing instead of charging, and why (the cap's key).

The history of charges is the site's accountant state: epsilon is always recomputed from it
(:mod:`~ultrafedfm.privacy.dp.accounting`), so the accountant spans rounds, jobs and restarts
and is never reset. Each update runs under an exclusive file lock (two jobs at one site cannot
lose a charge) and replaces the file atomically (:func:`ultrafedfm.fileio.atomic_write_json`),
so a reader, or a site killed with SIGKILL, sees the old ledger or the new one, never half.
The ledger never leaves the site; :func:`read_ledger` is how the site's own audit reads it.

Example::

    ledger = PrivacyLedger(path, site_name="hospital-a")
    charge = ledger.charge_round(plan, job_id=job_id, round_index=3, policy=policy)  # may raise BudgetExhausted
    ...train the round...
    ledger.record_completion(charge, steps_taken=12, clipping="ghost")
    ledger.spent().epsilon
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator, Literal

from ultrafedfm.config import ConfigError, from_mapping, to_mapping
from ultrafedfm.fileio import atomic_write_json
from ultrafedfm.privacy.dp.accounting import Mechanism, compute_epsilon
from ultrafedfm.privacy.dp.config import Accountant
from ultrafedfm.privacy.dp.plan import DPPlan
from ultrafedfm.privacy.policy import PolicyRefusal, PrivacyPolicy, policy_key

_logger = logging.getLogger(__name__)

__all__ = [
    "LEDGER_FILE", "BudgetExhausted", "Ledger", "LedgerEntry", "LedgerError", "PrivacyLedger", "Spent", "read_ledger",
    "site_ledger_path",
]

LEDGER_FILE = "dp_ledger.json"
_FORMAT = 1


def site_ledger_path(cache: str | Path) -> Path:
    """Where a site keeps its ledger: beside its image cache, which outlives kits and jobs."""
    return Path(cache) / "privacy" / LEDGER_FILE


class LedgerError(RuntimeError):
    """The ledger file cannot be read or is not this site's; the message names the file and what to do."""


class BudgetExhausted(PolicyRefusal):
    """A round would take the site past a cap; the site stops contributing. ``key`` names the cap.

    The message is safe to send to the server (no path, no image count).
    """


@dataclass(frozen=True)
class LedgerEntry:
    """One line of the ledger (fields that do not apply to ``kind`` are ``None``).

    Args:
        seq: position in the ledger, from 1.
        time: UTC time of writing, ISO 8601.
        kind: ``charge``, ``completed`` or ``refusal``.
        job_id / job / round: the job run (its FLARE job id), its name and the round index (from 0).
        noise_multiplier / sample_rate / steps / delta / max_grad_norm: the charged mechanism.
        accountant: the accountant that computed the epsilons.
        epsilon_job: the job's epsilon at ``delta`` after this charge (or the one refused).
        epsilon_lifetime / lifetime_delta: the site's epsilon over every charge, at the smallest
            delta any charge used.
        clipping: ``ghost`` or ``hooks`` (asked for in a charge, used in a completion).
        steps_taken: DP-SGD steps Opacus counted (completion).
        key / reason: the cap that stopped the site and why (refusal).
    """

    seq: int
    time: str
    kind: Literal["charge", "completed", "refusal"]
    job_id: str
    job: str
    round: int
    noise_multiplier: float | None = None
    sample_rate: float | None = None
    steps: int | None = None
    delta: float | None = None
    max_grad_norm: float | None = None
    accountant: str | None = None
    epsilon_job: float | None = None
    epsilon_lifetime: float | None = None
    lifetime_delta: float | None = None
    clipping: str | None = None
    steps_taken: int | None = None
    key: str | None = None
    reason: str | None = None

    @property
    def mechanism(self) -> Mechanism:
        """The (noise, rate, steps) a charge adds to the history."""
        if self.kind != "charge":
            raise ValueError(f"ledger entry {self.seq} is a {self.kind}, not a charge")
        return Mechanism(self.noise_multiplier, self.sample_rate, self.steps)


@dataclass(frozen=True)
class Spent:
    """Epsilon spent at ``delta`` by a set of charges (``accountant`` computed it)."""

    epsilon: float
    delta: float | None
    accountant: str
    charges: int


@dataclass(frozen=True)
class Ledger:
    """A ledger as read from disk: the site it belongs to and its entries in order."""

    site: str
    entries: tuple[LedgerEntry, ...]

    def charges(self, job_id: str | None = None) -> list[LedgerEntry]:
        """Charges, all or one job run's."""
        return [e for e in self.entries if e.kind == "charge" and (job_id is None or e.job_id == job_id)]

    def history(self, job_id: str | None = None) -> list[Mechanism]:
        """The accountant's history: one mechanism per charge."""
        return [e.mechanism for e in self.charges(job_id)]

    def lifetime_delta(self) -> float | None:
        """The smallest delta any charge used (the site's lifetime epsilon is stated at it)."""
        deltas = [e.delta for e in self.charges()]
        return min(deltas) if deltas else None

    def spent(self, job_id: str | None = None, *, accountant: Accountant | None = None) -> Spent:
        """Epsilon spent by one job run (at its delta) or by the site's lifetime (at :meth:`lifetime_delta`).

        ``accountant``: default, the one the latest charge in scope used.
        """
        charges = self.charges(job_id)
        if not charges:
            return Spent(epsilon=0.0, delta=None, accountant=accountant or "prv", charges=0)
        accountant = accountant or charges[-1].accountant
        delta = charges[-1].delta if job_id is not None else self.lifetime_delta()
        epsilon, used = compute_epsilon([e.mechanism for e in charges], delta, accountant)
        return Spent(epsilon=epsilon, delta=delta, accountant=used, charges=len(charges))


def read_ledger(path: str | Path, *, site_name: str | None = None) -> Ledger:
    """Read and check a ledger (missing file: empty). For the site's own audit report and tools.

    Raises:
        LedgerError: unreadable, not a ledger, entries out of sequence, or another site's.
    """
    path = Path(path)
    if not path.exists():
        return Ledger(site=site_name or "", entries=())
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r} is not {_FORMAT}")
        entries = tuple(from_mapping(LedgerEntry, e) for e in data["entries"])
        site = data["site"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError, ConfigError) as exc:
        raise LedgerError(f"{path}: cannot read the DP ledger ({exc}). Restore it from the site's backup; do not "
                          "delete it: the site's spent privacy budget would restart at zero") from exc
    if [e.seq for e in entries] != list(range(1, len(entries) + 1)):
        raise LedgerError(f"{path}: ledger entries are not numbered 1..{len(entries)}; the file was edited or "
                          "damaged. Restore it from the site's backup")
    if site_name is not None and site != site_name:
        raise LedgerError(f"{path}: this ledger belongs to site '{site}', not '{site_name}'; point the site at its "
                          "own ledger")
    return Ledger(site=site, entries=entries)


class PrivacyLedger:
    """A site's ledger file: charge rounds (budget checked under a lock), record completions, report spend.

    Args:
        path: the ledger file (created with its folder on the first charge, mode 0600).
        site_name: this site (the file must belong to it).
    """

    def __init__(self, path: str | Path, *, site_name: str):
        self.path = Path(path)
        self.site_name = site_name
        read_ledger(self.path, site_name=site_name)  # fail now, not at the first round

    def read(self) -> Ledger:
        """The ledger as it is on disk now."""
        return read_ledger(self.path, site_name=self.site_name)

    def spent(self, job_id: str | None = None, *, accountant: Accountant | None = None) -> Spent:
        """See :meth:`Ledger.spent`."""
        return self.read().spent(job_id, accountant=accountant)

    def charge_round(self, plan: DPPlan, *, job_id: str, round_index: int, policy: PrivacyPolicy) -> LedgerEntry:
        """Charge one round of ``plan`` before it trains, unless a cap forbids it.

        The caps, checked against the ledger as it is on disk under the lock: the policy's
        ``max_epsilon`` for this job run, the job's own ``target_epsilon``, the policy's
        ``lifetime_epsilon`` for the site, and no round beyond the job's declared rounds.

        Raises:
            BudgetExhausted: the round would pass a cap; a ``refusal`` entry records it and the
                site must not train this round (nor any later one the same cap forbids).
        """
        if round_index < 0:
            raise ValueError(f"round_index must be >= 0, got {round_index}")
        with self._locked():
            ledger = self.read()
            new = plan.round_mechanism
            job_history = ledger.history(job_id) + [new]
            epsilon_job, used = compute_epsilon(job_history, plan.delta, plan.accountant)
            lifetime_delta = min(plan.delta, ledger.lifetime_delta() or plan.delta)
            life_history = ledger.history() + [new]
            if life_history == job_history and lifetime_delta == plan.delta:  # the site's only job so far
                epsilon_life, used_life = epsilon_job, used
            else:
                epsilon_life, used_life = compute_epsilon(life_history, lifetime_delta, plan.accountant)
            accountant = used if used == used_life else "rdp"
            base = dict(job_id=job_id, job=plan.job, round=round_index, noise_multiplier=new.noise_multiplier,
                        sample_rate=new.sample_rate, steps=new.steps, delta=plan.delta,
                        max_grad_norm=plan.max_grad_norm, accountant=accountant, epsilon_job=epsilon_job,
                        epsilon_lifetime=epsilon_life, lifetime_delta=lifetime_delta)
            refusal = _first_cap_passed(plan, policy, round_index=round_index, epsilon_job=epsilon_job,
                                        epsilon_lifetime=epsilon_life, lifetime_delta=lifetime_delta)
            if refusal is not None:
                key, why = refusal
                self._append(ledger, dict(base, kind="refusal", key=key, reason=why))
                message = (f"site '{self.site_name}' stops contributing to job '{plan.job}' before round "
                           f"{round_index + 1}: {why}")
                _logger.warning("%s", message)
                raise BudgetExhausted(message, key=key)
            entry = self._append(ledger, dict(base, kind="charge", clipping=plan.clipping))
        _logger.info("DP ledger: charged job '%s' round %d: %d steps, noise %.3f, rate %.4g; epsilon %.3f for the "
                     "job (delta %g), %.3f lifetime (delta %g)", plan.job, round_index + 1, new.steps,
                     new.noise_multiplier, new.sample_rate, epsilon_job, plan.delta, epsilon_life, lifetime_delta)
        return entry

    def record_completion(self, charge: LedgerEntry, *, steps_taken: int, clipping: str) -> LedgerEntry:
        """Record that ``charge``'s round finished with ``steps_taken`` DP-SGD steps.

        Raises:
            LedgerError: Opacus took more steps than were charged (the ledger would under-count);
                the round's update must not leave the site.
        """
        if steps_taken > charge.steps:
            raise LedgerError(f"round {charge.round + 1} of job '{charge.job}' took {steps_taken} DP-SGD steps but "
                              f"{charge.steps} were charged; its update must not leave the site")
        with self._locked():
            return self._append(self.read(), dict(
                kind="completed", job_id=charge.job_id, job=charge.job, round=charge.round, steps=charge.steps,
                steps_taken=steps_taken, clipping=clipping, accountant=charge.accountant,
                epsilon_job=charge.epsilon_job, epsilon_lifetime=charge.epsilon_lifetime, delta=charge.delta,
                lifetime_delta=charge.lifetime_delta))

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, also when the process dies
            yield
        finally:
            os.close(fd)

    def _append(self, ledger: Ledger, fields: dict) -> LedgerEntry:
        entry = LedgerEntry(seq=len(ledger.entries) + 1, time=_now(), **fields)
        entries = [to_mapping(e) for e in (*ledger.entries, entry)]
        atomic_write_json(self.path, {"format": _FORMAT, "site": self.site_name, "entries": entries}, mode=0o600)
        return entry


def _first_cap_passed(plan: DPPlan, policy: PrivacyPolicy, *, round_index: int, epsilon_job: float,
                      epsilon_lifetime: float, lifetime_delta: float) -> tuple[str, str] | None:
    """(key, why) of the first cap the round would pass, or ``None``."""
    if round_index >= plan.rounds:
        return "rounds", (f"the job declared {plan.rounds} rounds and its privacy was planned for that many; "
                          f"round {round_index + 1} is beyond them")
    if policy.max_epsilon is not None and epsilon_job > policy.max_epsilon:
        key = policy_key("max_epsilon")
        return key, (f"the round would take the job's epsilon to {epsilon_job:.3f} (delta {plan.delta:g}), above "
                     f"{key}: {policy.max_epsilon:g} in the site's site.yaml")
    if plan.target_epsilon is not None and epsilon_job > plan.target_epsilon:
        return "dp.target_epsilon", (f"the round would take the job's epsilon to {epsilon_job:.3f} (delta "
                                     f"{plan.delta:g}), above the job's own target_epsilon {plan.target_epsilon:g}")
    if policy.lifetime_epsilon is not None and epsilon_lifetime > policy.lifetime_epsilon:
        key = policy_key("lifetime_epsilon")
        return key, (f"the round would take the site's lifetime epsilon to {epsilon_lifetime:.3f} (delta "
                     f"{lifetime_delta:g}), above {key}: {policy.lifetime_epsilon:g} in the site's site.yaml")
    return None


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

