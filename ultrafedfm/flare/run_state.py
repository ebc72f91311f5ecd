"""The run's persisted state, kept outside any FLARE job workspace (no FLARE import).

FLARE 2.9 does not resume a job after a server restart: the old job record stays "running"
and its workspace is never continued. So the server workflow writes, after every completed
round, one checkpoint file holding everything needed to continue -- global weights, the
index of the last completed round, the best round so far and the per-round history -- into
``<run_state_dir>/<run_name>/``. A resubmitted job with the same run name reads it and starts
at the next round: a round is either fully in the checkpoint or not at all (atomic
``os.replace``), so none is lost or applied twice.

Files in the run folder:
    global_model.pt   the latest global state_dict (+ round, history) -- the resume point
    best_model.pt     the state_dict of the round with the lowest global loss
    state.json        a human-readable summary of the same (written after the checkpoint)
    rounds.jsonl      one line of statistics per completed or skipped round
    tb/               TensorBoard event files
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

_logger = logging.getLogger(__name__)

__all__ = ["RunCheckpoint", "RunState"]

_FORMAT = 1


@dataclass
class RunCheckpoint:
    """What a resumed job needs: the weights after ``last_completed_round`` and the history."""

    params: dict[str, np.ndarray]
    last_completed_round: int  # -1: no round completed yet
    num_rounds: int
    best_round: int | None = None
    best_loss: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def next_round(self) -> int:
        return self.last_completed_round + 1


class RunState:
    """Reads and writes one run's folder. Only the server workflow writes it."""

    def __init__(self, root: str | Path, run_name: str):
        self.dir = Path(root).expanduser().resolve() / run_name
        self.dir.mkdir(parents=True, exist_ok=True)

    @property
    def global_model_path(self) -> Path:
        return self.dir / "global_model.pt"

    @property
    def best_model_path(self) -> Path:
        return self.dir / "best_model.pt"

    @property
    def rounds_path(self) -> Path:
        return self.dir / "rounds.jsonl"

    @property
    def tensorboard_dir(self) -> Path:
        return self.dir / "tb"

    def load(self) -> RunCheckpoint | None:
        """The last saved checkpoint, or ``None`` for a new run."""
        if not self.global_model_path.is_file():
            return None
        blob = torch.load(self.global_model_path, map_location="cpu", weights_only=True)
        if blob.get("format") != _FORMAT:
            raise RuntimeError(f"{self.global_model_path}: unknown checkpoint format {blob.get('format')!r}")
        meta = json.loads(blob["meta_json"])
        params = {k: v.numpy() for k, v in blob["state_dict"].items()}
        return RunCheckpoint(params=params, **meta)

    def save(self, checkpoint: RunCheckpoint, *, is_best: bool) -> None:
        """Atomically replace the resume point (and the best model when ``is_best``)."""
        meta = asdict(checkpoint)
        meta.pop("params")
        blob = {
            "format": _FORMAT,
            "state_dict": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in checkpoint.params.items()},
            # JSON inside the checkpoint keeps weights_only loading possible.
            "meta_json": json.dumps(meta),
        }
        _atomic_torch_save(blob, self.global_model_path)
        if is_best:
            _atomic_torch_save(blob["state_dict"], self.best_model_path)
        summary = {k: v for k, v in meta.items() if k != "history"}
        summary["rounds_in_history"] = len(checkpoint.history)
        _atomic_write_text(self.dir / "state.json", json.dumps(summary, indent=2))

    def append_round(self, stats: dict[str, Any]) -> None:
        with self.rounds_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(stats) + "\n")

    def rewrite_rounds(self, history: list[dict[str, Any]]) -> None:
        """Make ``rounds.jsonl`` agree with a checkpoint's history (after a crash between the two)."""
        _atomic_write_text(self.rounds_path, "".join(json.dumps(row) + "\n" for row in history))

    def read_rounds(self) -> list[dict[str, Any]]:
        if not self.rounds_path.is_file():
            return []
        return [json.loads(line) for line in self.rounds_path.read_text(encoding="utf-8").splitlines() if line]


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
