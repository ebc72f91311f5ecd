"""Short model cards for the weights we hand out (encoder, fine-tuned classifier or segmenter).

A card says what a file is and what it is worth: the data it saw, the model size, how long it
trained (rounds or epochs), its metrics with 95% intervals, and the privacy spent. It is
written twice from one :class:`ModelCard`: as ``card`` inside the JSON sidecar (for programs)
and as a Markdown file (for people). Unknown facts are written as "not recorded", never guessed.

Example::

    card = ModelCard(title="UltraFedFM encoder", kind="encoder", preset="tiny", rounds=20,
                     data=["busi (538 images, labels not used)"], privacy="secure aggregation, no DP")
    write_card_markdown(card, "out/encoder.md")
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from ultrafedfm.fileio import atomic_write_text

_logger = logging.getLogger(__name__)

__all__ = ["Metric", "ModelCard", "card_from_mapping", "render_card", "write_card_markdown"]

_UNKNOWN = "not recorded"


@dataclass(frozen=True)
class Metric:
    """One metric on one evaluation set, with an optional 95% interval and the number of cases."""

    value: float
    ci_low: float | None = None
    ci_high: float | None = None
    n: int | None = None
    dataset: str = ""

    def text(self) -> str:
        interval = (f" (95% CI {self.ci_low:.3f}-{self.ci_high:.3f})"
                    if self.ci_low is not None and self.ci_high is not None else "")
        cases = f", n={self.n}" if self.n is not None else ""
        where = f" on {self.dataset}" if self.dataset else ""
        return f"{self.value:.3f}{interval}{where}{cases}"


@dataclass(frozen=True)
class ModelCard:
    """What a weights file is and what it is worth.

    Args:
        title: one line naming the model.
        kind: ``encoder``, ``classifier`` or ``segmenter``.
        preset: MAE preset of the encoder (tiny/small/base), or another architecture name.
        architecture: e.g. the timm model name and its keyword arguments.
        data: one line per data set seen in training (name, size, what of it was used).
        training: how it was trained (centralized / federated, recipe).
        rounds: federated rounds, if federated. ``epochs``: epochs (or image-epochs).
        metrics: name -> :class:`Metric`.
        privacy: privacy spent, e.g. "secure aggregation; no DP (epsilon = inf)".
        classes: class names in output order (classifiers).
        citations: data sets and papers to cite when using the model.
        notes: caveats (limits, known failure modes).
    """

    title: str
    kind: str
    preset: str = _UNKNOWN
    architecture: Mapping[str, Any] = field(default_factory=dict)
    data: tuple[str, ...] = ()
    training: str = _UNKNOWN
    rounds: int | None = None
    epochs: float | None = None
    metrics: Mapping[str, Metric] = field(default_factory=dict)
    privacy: str = _UNKNOWN
    classes: tuple[str, ...] = ()
    citations: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()

    def to_mapping(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["metrics"] = {k: dataclasses.asdict(v) for k, v in self.metrics.items()}
        out["architecture"] = dict(self.architecture)
        return out


def card_from_mapping(data: Mapping[str, Any]) -> ModelCard:
    """Inverse of :meth:`ModelCard.to_mapping`."""
    values = dict(data)
    values["metrics"] = {k: Metric(**v) for k, v in (values.get("metrics") or {}).items()}
    for name in ("data", "classes", "citations", "notes"):
        values[name] = tuple(values.get(name) or ())
    return ModelCard(**values)


def render_card(card: ModelCard, *, weights_file: str | None = None) -> str:
    """The card as Markdown."""
    lines = [f"# {card.title}", ""]
    if weights_file:
        lines += [f"Weights: `{weights_file}` (safetensors)" if weights_file.endswith(".safetensors")
                  else f"Weights: `{weights_file}`", ""]
    lines += [
        f"- kind: {card.kind}",
        f"- preset / architecture: {card.preset}"
        + (f" ({', '.join(f'{k}={v}' for k, v in card.architecture.items())})" if card.architecture else ""),
        f"- training: {card.training}",
        f"- rounds: {card.rounds if card.rounds is not None else 'not federated / ' + _UNKNOWN}",
        f"- epochs: {card.epochs if card.epochs is not None else _UNKNOWN}",
        f"- privacy spent: {card.privacy}",
    ]
    if card.classes:
        lines.append(f"- classes (output order): {', '.join(card.classes)}")
    lines += ["", "## Data", ""]
    lines += [f"- {d}" for d in card.data] or [f"- {_UNKNOWN}"]
    lines += ["", "## Metrics", ""]
    lines += [f"- {name}: {m.text()}" for name, m in card.metrics.items()] or [f"- {_UNKNOWN}"]
    if card.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in card.notes]
    if card.citations:
        lines += ["", "## Cite", ""] + [f"- {c}" for c in card.citations]
    return "\n".join(lines) + "\n"


def write_card_markdown(card: ModelCard, path: str | Path, *, weights_file: str | None = None) -> Path:
    """Write :func:`render_card` to ``path`` atomically."""
    return atomic_write_text(path, render_card(card, weights_file=weights_file))
