"""A site's durable ledger of what it contributed to, so the server cannot difference two sums.

Differencing: with two unmasked sums over {A, B, C, X} and {A, B, C} computed from the same
global model, the server learns X's update. A site therefore records, on its own disk and
before the message leaves:

- per (job, round): the round context it signed (model hash, lr, training and secure-aggregation
  settings, member list) and how many attempts it joined. A later attempt of the same round must
  carry the same context -- a legitimate restart re-runs a round from the same model with fresh
  round keys; a "restart" with another model, lr or settings is refused.
- per global model (its hash, whatever the job or round label): the survivor set of the one sum
  it helped unmask. From that model it signs survivor lists and reveals unmask shares again only
  for exactly the same survivor set, so however often a round is re-run from that model, the
  server can unmask only sums over one set of sites.

Rules are checked as early as possible (roster, share delivery) and enforced where it matters:
before signing a survivor list and before revealing unmask shares. :func:`fresh_training_seed`
adds fresh entropy to a site's training randomness, so a re-run from the same model does not
reproduce the same update either.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable

from ultrafedfm.fileio import atomic_write_json
from ultrafedfm.secagg.errors import ContributionRefused, ProtocolError
from ultrafedfm.seeds import mix_seed

_logger = logging.getLogger(__name__)

__all__ = ["ContributionLedger", "fresh_training_seed"]

_FORMAT = "ultrafedfm-secagg-ledger/v1"


def fresh_training_seed(*parts: int | str | bytes) -> int:
    """A training seed from ``parts`` (e.g. job seed, round, site) mixed with 128 fresh random bits.

    Data order, MAE masks and DP noise then differ between two runs from the same model, so a
    server that re-runs a round cannot cancel a site's update out of two sums. Log it locally if
    the site wants to reproduce its run.
    """
    return mix_seed(*parts, os.urandom(16))


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


class ContributionLedger:
    """One site's record of its secure-aggregation contributions (a JSON file, replaced atomically).

    Use :meth:`open` with a path in the site's kit (``local/secagg_ledger.json``); :meth:`in_memory`
    is for simulations and benchmarks only (nothing survives the process).
    """

    def __init__(self, path: Path | None):
        self.path = Path(path) if path is not None else None
        self._rounds: dict[tuple[str, int], dict[str, Any]] = {}
        self._models: dict[str, dict[str, Any]] = {}
        if self.path is not None and self.path.exists():
            self._load()

    @classmethod
    def open(cls, path: str | Path) -> "ContributionLedger":
        return cls(Path(path))

    @classmethod
    def in_memory(cls) -> "ContributionLedger":
        return cls(None)

    def _load(self) -> None:
        assert self.path is not None
        try:
            data = json.loads(self.path.read_text())
            if data.get("format") != _FORMAT:
                raise ValueError(f"format {data.get('format')!r}, expected {_FORMAT!r}")
            for entry in data["rounds"]:
                self._rounds[(str(entry["job"]), int(entry["round"]))] = dict(entry)
            for model, entry in data["models"].items():
                self._models[str(model)] = dict(entry)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            # Fail closed: without its ledger the site cannot tell what it already contributed to.
            raise ProtocolError(f"secure-aggregation ledger {self.path} is unreadable ({exc}); the site takes part in "
                                "no round until its IT restores the file from backup") from exc

    def _save(self) -> None:
        if self.path is None:
            return
        atomic_write_json(self.path, {
            "format": _FORMAT,
            "rounds": [self._rounds[k] for k in sorted(self._rounds, key=lambda k: (k[0], k[1]))],
            "models": dict(sorted(self._models.items())),
        }, mode=0o600)

    # -- per round ---------------------------------------------------------------------------
    def start_round(self, *, site: str, job_id: str, round_number: int, model_sha256: str,
                    context_digest: bytes) -> int:
        """Record one more attempt of (job, round); returns its number (1 = first).

        Raises :class:`ContributionRefused` if the round was started before with another context.
        """
        entry = self._rounds.get((job_id, round_number))
        if entry is not None and entry["context"] != context_digest.hex():
            raise ContributionRefused(
                f"site '{site}' refuses round {round_number} of job '{job_id}' again with another model, lr or settings "
                f"(now model {model_sha256[:16]}..., before model {entry['model'][:16]}...; the context it signed "
                "differs): a restarted round must start from the same global model with the same settings")
        if entry is None:
            entry = {"job": job_id, "round": round_number, "model": model_sha256, "context": context_digest.hex(),
                     "attempts": 0, "masked_inputs": 0}
            self._rounds[(job_id, round_number)] = entry
        entry["attempts"] += 1
        entry["updated"] = _now()
        self._save()
        if entry["attempts"] > 1:
            _logger.warning("site %s: round %d of job %s started again (attempt %d) from the same model %s...; allowed "
                            "with fresh keys (a server restart)", site, round_number, job_id, entry["attempts"],
                            model_sha256[:16])
        return entry["attempts"]

    def record_masked_input(self, *, job_id: str, round_number: int) -> None:
        entry = self._rounds[(job_id, round_number)]
        entry["masked_inputs"] += 1
        entry["updated"] = _now()
        self._save()

    def round_entry(self, job_id: str, round_number: int) -> dict[str, Any] | None:
        entry = self._rounds.get((job_id, round_number))
        return dict(entry) if entry is not None else None

    # -- per model -----------------------------------------------------------------------------
    def bound_survivors(self, model_sha256: str) -> tuple[str, ...] | None:
        """The survivor set this site already helped unmask a sum for, from this model (or ``None``)."""
        entry = self._models.get(model_sha256)
        return tuple(entry["survivors"]) if entry is not None else None

    def _refusal(self, site: str, model_sha256: str, detail: str) -> ContributionRefused:
        entry = self._models[model_sha256]
        return ContributionRefused(
            f"site '{site}' already helped unmask a sum from model {model_sha256[:16]}... (job '{entry['job']}', round "
            f"{entry['round']}) over survivors {entry['survivors']}; {detail}. A second sum from the same model over "
            "other sites would let the server difference the two and isolate a site's update. Re-run the round with "
            "exactly those survivors, or aggregate from another model")

    def check_reachable(self, *, site: str, model_sha256: str, available: Iterable[str], where: str) -> None:
        """Refuse early when the bound survivor set can no longer be met (some of it is missing)."""
        bound = self.bound_survivors(model_sha256)
        if bound is not None:
            missing = sorted(set(bound) - set(available))
            if missing:
                raise self._refusal(site, model_sha256, f"{missing} are missing from {where}")

    def check_survivors(self, *, site: str, model_sha256: str, survivors: Iterable[str]) -> None:
        bound = self.bound_survivors(model_sha256)
        if bound is not None and tuple(sorted(survivors)) != bound:
            raise self._refusal(site, model_sha256, f"now the server asks for survivors {sorted(survivors)}")

    def bind_survivors(self, *, site: str, model_sha256: str, job_id: str, round_number: int,
                       survivors: Iterable[str], dropped: Iterable[str]) -> None:
        """Durably record the survivor set before revealing unmask shares (write-ahead)."""
        self.check_survivors(site=site, model_sha256=model_sha256, survivors=survivors)
        if model_sha256 not in self._models:
            self._models[model_sha256] = {"job": job_id, "round": round_number, "survivors": sorted(survivors),
                                          "dropped": sorted(dropped), "at": _now()}
            self._save()
