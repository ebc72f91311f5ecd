"""Per-round statistics of a pretraining run: one record of aggregates, three sinks (no FLARE import).

The server's run (``federation.server``) fills one :class:`RoundStats` per round. It is
appended to the run's ``rounds.jsonl`` (and the checkpoint's history), written to TensorBoard,
and kept as the last round of the run's :class:`RunProgress`, which the FLARE controller hands
to FLARE's info collector: what ``nvflare job stats`` and the admin console's ``show_stats JOB
server`` print while the job runs.

Only aggregates: with secure aggregation the server learns a round's weighted mean loss, total
images and total steps from the unmasked sum and nothing per site; a plain FedAvg round is
recorded the same way. Which sites took part and why a site failed are kept (the server knows
them anyway). Each site keeps its own figures on its own disk (``federation.site_figures``).
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

__all__ = ["PER_SITE_KEYS", "RoundStats", "RunProgress", "TensorBoardSink", "format_round_line"]

# Per-site figures older versions kept in a round's record; dropped wherever such a record is read.
PER_SITE_KEYS = ("loss", "num_samples", "train_seconds")


@dataclass
class RoundStats:
    """What happened in one round, as aggregates.

    ``global_loss`` is the participants' image-weighted mean training loss, ``total_images`` and
    ``total_steps`` their sums (``None`` when the round aggregated nothing). ``failed`` names each
    site that dropped out and why. ``bytes_received`` counts the payload of the accepted updates
    (parameter bytes), not FLARE's framing.
    """

    round: int
    num_rounds: int
    lr: float
    targets: list[str]
    participants: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    global_loss: float | None = None
    total_images: int | None = None
    total_steps: int | None = None
    bytes_received: int = 0
    duration_s: float = 0.0
    applied: bool = False
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "RoundStats":
        """A record of ``rounds.jsonl``; per-site figures of older versions are dropped."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in known})


@dataclass
class RunProgress:
    """Where a run is: its phase, the round in progress and the last completed round's statistics."""

    run_name: str
    num_rounds: int
    phase: str = "init"
    current_round: int | None = None  # 0-based
    last_stats: RoundStats | None = None

    @classmethod
    def for_job(cls, job: Any) -> "RunProgress":
        return cls(run_name=job.effective_run_name, num_rounds=job.num_rounds)

    def to_info(self) -> dict[str, Any]:
        """The console's view: round numbers 1-based, the last round's aggregate figures."""
        info: dict[str, Any] = {
            "run_name": self.run_name,
            "phase": self.phase,
            "current_round": None if self.current_round is None else self.current_round + 1,
            "num_rounds": self.num_rounds,
        }
        last = self.last_stats
        if last is not None:
            info["last_round"] = {
                "round": last.round + 1,
                "participants": last.participants,
                "failed": last.failed,
                "global_loss": last.global_loss,
                "total_images": last.total_images,
                "total_steps": last.total_steps,
                "bytes_received": last.bytes_received,
                "duration_s": round(last.duration_s, 2),
                "applied": last.applied,
            }
        return info


def format_round_line(stats: RoundStats) -> str:
    """One progress line of aggregates, e.g. ``round 2/3  sites 3/3  loss 0.8123  images 120  lr 9.4e-05  4.1 s``."""
    loss = f"{stats.global_loss:.4f}" if stats.global_loss is not None else "  n/a "
    images = stats.total_images if stats.total_images is not None else "n/a"
    line = (
        f"round {stats.round + 1}/{stats.num_rounds}  sites {len(stats.participants)}/{len(stats.targets)}"
        f"  loss {loss}  images {images}  lr {stats.lr:.2e}  {stats.duration_s:.1f} s"
    )
    if stats.failed:
        line += "  failed: " + "; ".join(f"{k}: {v}" for k, v in sorted(stats.failed.items()))
    if not stats.applied:
        line += "  [model NOT updated: " + stats.message + "]"
    return line


class TensorBoardSink:
    """TensorBoard scalars on the server, one step per round (aggregates only)."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # deferred: tensorboard import is slow

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, stats: RoundStats) -> None:
        step = stats.round
        w = self._writer
        if stats.global_loss is not None:
            w.add_scalar("loss/global", stats.global_loss, step)
        if stats.total_images is not None:
            w.add_scalar("round/images", stats.total_images, step)
        if stats.total_steps is not None:
            w.add_scalar("round/steps", stats.total_steps, step)
        w.add_scalar("round/lr", stats.lr, step)
        w.add_scalar("round/participants", len(stats.participants), step)
        w.add_scalar("round/duration_s", stats.duration_s, step)
        w.add_scalar("round/bytes_received", stats.bytes_received, step)
        w.flush()

    def close(self) -> None:
        self._writer.close()
