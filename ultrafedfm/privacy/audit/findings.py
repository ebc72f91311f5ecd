"""Findings: what is off in a run, said plainly, at the top of every report.

A finding has a severity (``critical``: a privacy guarantee did not hold or its evidence was
tampered with; ``warning``: a guarantee is weaker than it should be or will soon stop;
``info``: worth knowing), a stable code (what tests and scripts key on) and one sentence that
says what happened and what to do.
"""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Literal

_logger = logging.getLogger(__name__)

__all__ = ["NEAR_CAP_FRACTION", "SEVERITIES", "Finding", "sort_findings"]

Severity = Literal["critical", "warning", "info"]
SEVERITIES = ("critical", "warning", "info")
NEAR_CAP_FRACTION = 0.8  # a site that has spent this share of a cap is "near its cap"


@dataclass(frozen=True)
class Finding:
    """One thing the reader must know, first."""

    severity: Severity
    code: str
    message: str

    def to_json(self) -> dict[str, str]:
        return asdict(self)


def sort_findings(findings: list[Finding]) -> list[Finding]:
    """Critical first, then warnings, then information; the order found within each."""
    return sorted(findings, key=lambda f: SEVERITIES.index(f.severity))
