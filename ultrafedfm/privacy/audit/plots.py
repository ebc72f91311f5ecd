"""The report's plots, as PNG data URIs the HTML carries inline (matplotlib, no pyplot state, no network).

- :func:`epsilon_plot`: epsilon per round of each job at the site, and the site's lifetime epsilon, with caps.
- :func:`participation_plot`: participants and dropouts per round at the server, with the unmask threshold.
- :func:`bytes_plot`: bytes sent (site) or received (server) per round.
- :func:`empirical_plot`: the empirical lower bounds beside the accountant's epsilons.
"""
from __future__ import annotations

import base64
import io
import logging
from collections import defaultdict
from typing import Any, Sequence

from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

_logger = logging.getLogger(__name__)

__all__ = ["bytes_plot", "empirical_plot", "epsilon_plot", "participation_plot"]

_SIZE = (7.0, 3.0)


def _data_uri(fig: Figure) -> str:
    for ax in fig.axes:
        if ax.get_xlabel() in ("round", "charged round (ledger order)"):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=96, metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def epsilon_plot(series: Sequence[dict[str, Any]], *, max_epsilon: float | None,
                 lifetime_epsilon: float | None) -> str | None:
    """``series``: the ledger's charges in order (job_id, round, epsilon_job, epsilon_lifetime)."""
    if not series:
        return None
    fig = Figure(figsize=(_SIZE[0], _SIZE[1] * 1.2))
    left, right = fig.subplots(1, 2)
    by_job: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for row in series:
        by_job[row["job_id"]].append((row["round"] + 1, row["epsilon_job"]))
    for job, points in by_job.items():
        xs, ys = zip(*points)
        left.plot(xs, ys, marker="o", markersize=3, label=f"job {job[:12]}")
    if max_epsilon is not None:
        left.axhline(max_epsilon, color="red", linestyle="--", linewidth=1, label=f"max_epsilon {max_epsilon:g}")
    left.set(title="epsilon of each job, by round", xlabel="round", ylabel="epsilon")
    left.legend(fontsize=7)
    right.plot(range(1, len(series) + 1), [row["epsilon_lifetime"] for row in series], marker="o", markersize=3,
               color="tab:purple", label="lifetime")
    if lifetime_epsilon is not None:
        right.axhline(lifetime_epsilon, color="red", linestyle="--", linewidth=1,
                      label=f"lifetime_epsilon {lifetime_epsilon:g}")
    right.set(title="the site's lifetime epsilon", xlabel="charged round (ledger order)", ylabel="epsilon")
    right.legend(fontsize=7)
    return _data_uri(fig)


def participation_plot(rounds: Sequence[dict[str, Any]]) -> str | None:
    """``rounds``: the server report's rounds (participants, dropouts, threshold)."""
    if not rounds:
        return None
    fig = Figure(figsize=_SIZE)
    ax = fig.subplots()
    xs = [r["round"] + 1 for r in rounds]
    took_part = [len(r["participants"]) for r in rounds]
    dropped = [len(r["dropouts"]) for r in rounds]
    ax.bar(xs, took_part, color="tab:green", label="participants")
    ax.bar(xs, dropped, bottom=took_part, color="tab:red", label="dropouts")
    thresholds = [(x, r["threshold"]) for x, r in zip(xs, rounds) if r.get("threshold") is not None]
    if thresholds:
        ax.plot(*zip(*thresholds), color="black", marker="_", markersize=18, linestyle="none", label="threshold t")
    ax.set(title="participants and dropouts per round", xlabel="round", ylabel="sites")
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return _data_uri(fig)


def bytes_plot(rows: Sequence[dict[str, Any]], *, title: str) -> str | None:
    """``rows``: (round, bytes) per round; one bar per round (job runs side by side by round number)."""
    rows = [r for r in rows if r.get("bytes") is not None]
    if not rows:
        return None
    totals: dict[int, int] = defaultdict(int)
    for r in rows:
        totals[r["round"] + 1] += int(r["bytes"])
    largest = max(totals.values()) or 1
    unit, scale = next((u, s) for u, s in (("MiB", 2 ** 20), ("KiB", 2 ** 10), ("bytes", 1)) if largest >= s)
    fig = Figure(figsize=_SIZE)
    ax = fig.subplots()
    ax.bar(list(totals), [v / scale for v in totals.values()], color="tab:blue")
    ax.set(title=title, xlabel="round", ylabel=unit)
    return _data_uri(fig)


def empirical_plot(runs: Sequence[dict[str, Any]]) -> str | None:
    """``runs``: label, accountant epsilon (None: no DP) and empirical lower bound of each audited run."""
    if not runs:
        return None
    fig = Figure(figsize=_SIZE)
    ax = fig.subplots()
    labels = [r["label"] for r in runs]
    xs = range(len(runs))
    lower = [r["epsilon_lower_bound"] for r in runs]
    upper = [r["epsilon_accountant"] for r in runs]
    ax.bar([x - 0.2 for x in xs], lower, width=0.4, color="tab:orange", label="empirical lower bound")
    finite = [u for u in upper if u is not None]
    top = max([*finite, *lower, 1.0]) * 1.3
    ax.bar([x + 0.2 for x, u in zip(xs, upper) if u is not None], finite, width=0.4, color="tab:blue",
           label="accountant's epsilon (upper bound)")
    for x, u in zip(xs, upper):
        if u is None:  # no DP: no upper bound at all
            ax.bar(x + 0.2, top, width=0.4, color="white", edgecolor="tab:blue", hatch="//")
            ax.text(x + 0.2, top * 0.5, "no DP:\nunbounded", ha="center", va="center", fontsize=8)
    for x, value in zip(xs, lower):
        ax.text(x - 0.2, value, f"{value:.2f}", ha="center", va="bottom", fontsize=8)
    ax.set_xticks(list(xs), labels)
    ax.set(title="epsilon: what an attack proves vs. what the accountant guarantees", ylabel="epsilon", ylim=(0, top))
    ax.legend(fontsize=7, loc="upper left")
    return _data_uri(fig)
