"""A site's own figures of each round, kept on its own disk and never sent.

With secure aggregation the server learns only aggregates (the loss, image count and steps
travel inside the masked vector); the site still wants its own numbers -- for its IT, its
privacy officer and its audit report. After every round the site appends one
:class:`SiteRoundFigures` line to ``<cache>/privacy/round_figures.jsonl`` (beside its privacy
ledger): durable, append-only, readable with :func:`read_site_figures`.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ultrafedfm.fileio import append_line

_logger = logging.getLogger(__name__)

__all__ = ["SITE_FIGURES_FILE", "SiteRoundFigures", "append_site_figures", "read_site_figures", "site_figures_path"]

SITE_FIGURES_FILE = "round_figures.jsonl"


def site_figures_path(cache: str | Path) -> Path:
    """Where a site keeps its round figures: beside its privacy ledger, in its cache folder."""
    return Path(cache) / "privacy" / SITE_FIGURES_FILE


@dataclass
class SiteRoundFigures:
    """One round at one site, as the site itself measured it.

    Args:
        job / job_id / round: which round (0-based) of which job run.
        loss: mean training loss; num_samples: images; steps: optimizer steps; train_seconds: wall time.
        masked: whether the update left masked (secure aggregation).
        clipped_coordinates: coordinates the secure-aggregation encoding clipped (0 expected; reported).
        epsilon / delta / noise_multiplier / accountant: this job's DP spend after the round (``None``: DP off).
        epsilon_lifetime: the site's lifetime epsilon after the round (``None``: DP off).
        generator_seed: the seed of the round's data order, MAE masks and degradations (with secure
            aggregation it mixes in fresh entropy, so only this record can reproduce the round).
        recorded_at: UTC time the line was written.
    """

    job: str
    job_id: str
    round: int
    loss: float
    num_samples: int
    steps: int
    train_seconds: float
    masked: bool
    clipped_coordinates: int = 0
    epsilon: float | None = None
    delta: float | None = None
    noise_multiplier: float | None = None
    accountant: str | None = None
    epsilon_lifetime: float | None = None
    generator_seed: int | None = None
    recorded_at: str = field(default_factory=lambda: dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))


def append_site_figures(path: str | Path, figures: SiteRoundFigures) -> None:
    """Append ``figures`` durably (fsync) to the site's log."""
    append_line(path, json.dumps(asdict(figures), sort_keys=True))


def read_site_figures(path: str | Path) -> list[SiteRoundFigures]:
    """Every round the site recorded, oldest first (a line torn by a crash is skipped with a warning)."""
    path = Path(path)
    if not path.is_file():
        return []
    names = {f.name for f in fields(SiteRoundFigures)}
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            data = json.loads(line)
            rows.append(SiteRoundFigures(**{k: v for k, v in data.items() if k in names}))
        except (ValueError, TypeError):
            _logger.warning("%s line %d: unreadable (torn by a crash?); skipped", path, number)
    return rows
