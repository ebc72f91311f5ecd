"""Write a report: ``report.json`` (the versioned schema) and ``report.html`` (one self-contained page).

The HTML is rendered with Jinja2 (autoescaped) from :data:`~ultrafedfm.privacy.audit.template.REPORT_TEMPLATE`,
its plots embedded as PNG data URIs (:mod:`~ultrafedfm.privacy.audit.plots`), with a content security
policy that allows nothing but inline styles and ``data:`` images: it opens from a USB stick
in any browser and fetches nothing.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jinja2

from ultrafedfm.fileio import atomic_write_text
from ultrafedfm.privacy.audit.schema import validate_report
from ultrafedfm.privacy.audit.template import REPORT_TEMPLATE

_logger = logging.getLogger(__name__)

__all__ = ["REPORT_HTML", "REPORT_JSON", "ReportFiles", "render_html", "write_report"]

REPORT_JSON = "report.json"
REPORT_HTML = "report.html"


@dataclass(frozen=True)
class ReportFiles:
    json: Path
    html: Path


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value):
            return "∞"
        return f"{value:.4g}"
    return str(value)


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters["fmt"] = _fmt
    env.filters["join_fmt"] = lambda values: ", ".join(_fmt(v) for v in (values or []))
    return env


def _plots(report: dict[str, Any]) -> dict[str, str | None]:
    from ultrafedfm.privacy.audit.plots import bytes_plot, empirical_plot, epsilon_plot, participation_plot

    kind = report["kind"]
    if kind == "site":
        policy = report["privacy"]["policy"] or {}
        return {"epsilon": epsilon_plot(report["privacy"]["epsilon_by_round"], max_epsilon=policy.get("max_epsilon"),
                                        lifetime_epsilon=policy.get("lifetime_epsilon")),
                "bytes": bytes_plot(report["bytes_by_round"], title="bytes sent per round")}
    if kind == "server":
        return {"participation": participation_plot(report["rounds"]),
                "bytes": bytes_plot([{"round": r["round"], "bytes": r["bytes_received"]} for r in report["rounds"]
                                     if r["messages_received"]], title="bytes received per round")}
    if kind == "empirical":
        return {"empirical": empirical_plot(report["canary_audit"]["runs"])}
    return {}


def render_html(report: dict[str, Any]) -> str:
    """The report as one HTML page (findings first)."""
    kind = report["kind"]
    subject = report.get("subject") or {}
    title = {"site": f"Privacy audit: site {subject.get('site')}",
             "server": f"Privacy audit: server, job {subject.get('job') or ''} {subject.get('job_id') or ''}".rstrip(),
             "empirical": "Empirical privacy audit: what an attacker can learn"}.get(kind, "Privacy audit")
    return _environment().from_string(REPORT_TEMPLATE).render(report=report, plots=_plots(report), title=title)


def write_report(report: dict[str, Any], out_dir: str | Path) -> ReportFiles:
    """Validate ``report`` against its schema, then write ``report.json`` and ``report.html`` into ``out_dir``."""
    validate_report(report)
    out_dir = Path(out_dir)
    json_path = atomic_write_text(out_dir / REPORT_JSON, json.dumps(report, indent=2, allow_nan=False) + "\n", mode=0o644)
    html_path = atomic_write_text(out_dir / REPORT_HTML, render_html(report), mode=0o644)
    severities = [f["severity"] for f in report["findings"]]
    _logger.info("audit report (%s) written to %s: %d finding(s) (%d critical, %d warning)", report["kind"], html_path,
                 len(severities), severities.count("critical"), severities.count("warning"))
    return ReportFiles(json=json_path, html=html_path)
