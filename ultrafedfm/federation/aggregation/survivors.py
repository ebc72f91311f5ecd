"""The survivor set the server asked the sites to unmask a sum over, kept across a server restart.

Every site records, before it reveals unmask shares, the survivor set of the one sum it helps
unmask from a global model (``ultrafedfm.secagg.ContributionLedger``), and from that model it
takes part again only with exactly that set: two sums over different sets from the same model
would let the server difference them. So the server writes the set here, in the run's folder
outside the job workspace, *before* it sends the unmask request; a server that crashes after it
and re-runs the round (a resubmitted job continues the run from the same model) asks exactly
those sites again, and the round completes.

``<run folder>/secagg_survivors.json``: ``{"format": ..., "models": {model_sha256: {"job_id",
"round", "survivors", "at"}}}`` (the latest few models).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from ultrafedfm.fileio import atomic_write_json

_logger = logging.getLogger(__name__)

__all__ = ["SURVIVORS_FILE", "BoundSurvivors", "read_bound_survivors", "write_bound_survivors"]

SURVIVORS_FILE = "secagg_survivors.json"
_FORMAT = "ultrafedfm-secagg-survivors/v1"
_KEEP = 16  # models remembered (a model is bound only until a round from it is applied)


@dataclass(frozen=True)
class BoundSurvivors:
    """The survivors of the sum unmasked (or about to be) from one global model."""

    model_sha256: str
    job_id: str
    round: int
    survivors: tuple[str, ...]


def _read(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("format") != _FORMAT:
            raise ValueError(f"format {data.get('format')!r}")
        return dict(data["models"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        # The sites enforce the rule themselves; without this file the server may only run a
        # round they refuse, so say so loudly instead of stopping the run.
        _logger.error("%s is unreadable (%s): the server cannot tell which survivor set the sites are bound to; a "
                      "re-run of an interrupted round may be refused by the sites", path, exc)
        return {}


def read_bound_survivors(run_dir: Path | None, model_sha256: str) -> BoundSurvivors | None:
    """The survivor set the server already asked the sites to unmask a sum over from this model, or ``None``."""
    if run_dir is None:
        return None
    entry = _read(Path(run_dir) / SURVIVORS_FILE).get(model_sha256)
    if entry is None:
        return None
    return BoundSurvivors(model_sha256=model_sha256, job_id=str(entry["job_id"]), round=int(entry["round"]),
                          survivors=tuple(sorted(entry["survivors"])))


def write_bound_survivors(run_dir: Path | None, bound: BoundSurvivors) -> None:
    """Durably record ``bound`` before the unmask request leaves (write-ahead, like the sites' ledgers)."""
    if run_dir is None:
        _logger.debug("no run folder: the survivor set of round %d is not persisted", bound.round)
        return
    path = Path(run_dir) / SURVIVORS_FILE
    models = _read(path)
    models.pop(bound.model_sha256, None)
    models[bound.model_sha256] = {"job_id": bound.job_id, "round": bound.round, "survivors": list(bound.survivors),
                                  "at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")}
    kept = dict(list(models.items())[-_KEEP:])
    atomic_write_json(path, {"format": _FORMAT, "models": kept})
