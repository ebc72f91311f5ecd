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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ultrafedfm.fileio import append_line, atomic_torch_save, atomic_write_json, atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = ["BEST_MODEL_FILE", "GLOBAL_MODEL_FILE", "ROUNDS_FILE", "RunCheckpoint", "RunState"]

_FORMAT = 1
GLOBAL_MODEL_FILE = "global_model.pt"
BEST_MODEL_FILE = "best_model.pt"
STATE_FILE = "state.json"
ROUNDS_FILE = "rounds.jsonl"
TENSORBOARD_FOLDER = "tb"


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
        return self.dir / GLOBAL_MODEL_FILE

    @property
    def best_model_path(self) -> Path:
        return self.dir / BEST_MODEL_FILE

    @property
    def rounds_path(self) -> Path:
        return self.dir / ROUNDS_FILE

    @property
    def tensorboard_dir(self) -> Path:
        return self.dir / TENSORBOARD_FOLDER

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
        atomic_torch_save(blob, self.global_model_path)
        if is_best:
            atomic_torch_save(blob["state_dict"], self.best_model_path)
        summary = {k: v for k, v in meta.items() if k != "history"}
        summary["rounds_in_history"] = len(checkpoint.history)
        atomic_write_json(self.dir / STATE_FILE, summary)

    def append_round(self, stats: dict[str, Any]) -> None:
        append_line(self.rounds_path, json.dumps(stats))

    def rewrite_rounds(self, history: list[dict[str, Any]]) -> None:
        """Make ``rounds.jsonl`` agree with a checkpoint's history (after a crash between the two)."""
        atomic_write_text(self.rounds_path, "".join(json.dumps(row) + "\n" for row in history))

    def read_rounds(self) -> list[dict[str, Any]]:
        if not self.rounds_path.is_file():
            return []
        rows = []
        for line in self.rounds_path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line torn by a crash mid-append; the checkpoint's history is authoritative
                _logger.warning("%s: skipping an unreadable line (torn by a crash?)", self.rounds_path)
        return rows

