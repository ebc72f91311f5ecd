"""Per-round statistics of a pretraining run: one record, three sinks (no FLARE import).

The server's run (``federation.server``) fills one :class:`RoundStats` per round. It is
appended to the run's ``rounds.jsonl``, written to TensorBoard, and kept as the last round of
the run's :class:`RunProgress`, which the FLARE controller hands to FLARE's info collector:
what ``nvflare job stats`` and the admin console's ``show_stats JOB server`` print while the
job runs.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

__all__ = ["RoundStats", "RunProgress", "TensorBoardSink", "format_round_line"]


@dataclass
class RoundStats:
    """What happened in one round.

    ``train_seconds`` is each site's own measure of its training time (the federation
    benchmark compares the slowest of them with ``duration_s``). ``bytes_received`` counts the
    payload of the accepted updates (parameter bytes), not FLARE's framing.
    """

    round: int
    num_rounds: int
    lr: float
    targets: list[str]
    participants: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)
    loss: dict[str, float] = field(default_factory=dict)
    num_samples: dict[str, int] = field(default_factory=dict)
    train_seconds: dict[str, float] = field(default_factory=dict)
    global_loss: float | None = None
    bytes_received: int = 0
    duration_s: float = 0.0
    applied: bool = False
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


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
                "loss": last.loss,
                "global_loss": last.global_loss,
                "bytes_received": last.bytes_received,
                "duration_s": round(last.duration_s, 2),
                "applied": last.applied,
            }
        return info


def format_round_line(stats: RoundStats) -> str:
    """One progress line, e.g. ``round 2/3  sites 3/3  loss 0.8123  lr 9.4e-05  4.1 s``."""
    loss = f"{stats.global_loss:.4f}" if stats.global_loss is not None else "  n/a "
    line = (
        f"round {stats.round + 1}/{stats.num_rounds}  sites {len(stats.participants)}/{len(stats.targets)}"
        f"  loss {loss}  lr {stats.lr:.2e}  {stats.duration_s:.1f} s"
    )
    if stats.failed:
        line += "  failed: " + "; ".join(f"{k}: {v}" for k, v in sorted(stats.failed.items()))
    if not stats.applied:
        line += "  [model NOT updated: " + stats.message + "]"
    return line


class TensorBoardSink:
    """TensorBoard scalars on the server, one step per round."""

    def __init__(self, log_dir: str | Path):
        from torch.utils.tensorboard import SummaryWriter  # deferred: tensorboard import is slow

        self._writer = SummaryWriter(log_dir=str(log_dir))

    def write(self, stats: RoundStats) -> None:
        step = stats.round
        w = self._writer
        if stats.global_loss is not None:
            w.add_scalar("loss/global", stats.global_loss, step)
        for site, loss in stats.loss.items():
            w.add_scalar(f"loss/{site}", loss, step)
        w.add_scalar("round/lr", stats.lr, step)
        w.add_scalar("round/participants", len(stats.participants), step)
        w.add_scalar("round/duration_s", stats.duration_s, step)
        w.add_scalar("round/bytes_received", stats.bytes_received, step)
        w.flush()

    def close(self) -> None:
        self._writer.close()
