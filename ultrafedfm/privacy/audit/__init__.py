"""The privacy audit of a run: what left each site, in what form, what privacy it spent, what an attack learns.

A site's report and the server's report are different documents, because each side knows
different things (only the site knows its epsilon, its image count and what it sent; the server
knows the participants, the aggregates and what it received). The calls the transport layer
makes, in order::

    record_outgoing(cache, site=..., job_id=..., task=..., round_index=..., params=..., meta=..., metrics=...)
                                                     # the site, for every reply, before sending it
    record_received(run_dir, site=..., job_id=..., task=..., round_index=..., params=..., metrics=..., meta=...)
                                                     # the server, for every reply, before using it
    write_server_report(run_dir=..., job_id=..., job_spec=..., job_meta=..., workspace=..., out_dir=...)
                                                     # the server, when the job ends
    write_site_report(site=..., cache=..., policy=..., kit=..., job_id=...)
                                                     # each site, when the job ends

``ultrafedfm audit`` builds the same reports afterwards (``--server`` from what ``nvflare job
download`` returns plus the run folder, ``--site`` from a site's kit), and ``--empirical`` runs
the canary membership-inference and gradient-inversion audit (:mod:`.empirical`).

Modules: :mod:`.payloads` (the logs), :mod:`.matching`, :mod:`.site_report`, :mod:`.server_report`,
:mod:`.flare_inputs`, :mod:`.transport`, :mod:`.findings`, :mod:`.schema`, :mod:`.render`,
:mod:`.plots`, :mod:`.empirical` (imports torch; import it from its module).
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

from ultrafedfm.privacy.audit.findings import Finding
from ultrafedfm.privacy.audit.payloads import (
    PayloadLog, PayloadRecord, outgoing_log_path, payload_digest, read_payload_log, received_log_path, record_outgoing,
    record_received,
)
from ultrafedfm.privacy.audit.schema import REPORT_SCHEMA, validate_report
from ultrafedfm.privacy.audit.server_report import ServerAuditInputs, build_server_report
from ultrafedfm.privacy.audit.site_report import SiteAuditInputs, build_site_report
from ultrafedfm.privacy.policy import PrivacyPolicy

_logger = logging.getLogger(__name__)

__all__ = [
    "REPORT_SCHEMA", "Finding", "PayloadLog", "PayloadRecord", "ReportFiles", "ServerAuditInputs", "SiteAuditInputs",
    "build_server_report", "build_site_report", "outgoing_log_path", "payload_digest", "read_payload_log",
    "read_received_records", "received_log_path", "record_outgoing", "record_received", "site_report_dir",
    "server_report_dir", "validate_report", "write_report", "write_server_report", "write_site_report",
]


def __getattr__(name: str) -> Any:
    """``write_report`` and ``ReportFiles`` load Jinja2 and matplotlib: only when a report is written, so the
    sites and the server can log payloads without importing them."""
    if name in ("write_report", "ReportFiles"):
        from ultrafedfm.privacy.audit import render

        return getattr(render, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def site_report_dir(cache: str | Path, job_id: str | None) -> Path:
    """Where a site keeps its reports: ``<cache>/privacy/audit/<job id>`` (``all`` for every job)."""
    return Path(cache) / "privacy" / "audit" / (job_id or "all")


def server_report_dir(run_dir: str | Path, job_id: str | None) -> Path:
    """Where the server keeps its report: ``<run folder>/audit/<job id>``."""
    return Path(run_dir) / "audit" / (job_id or "run")


def write_site_report(*, site: str, cache: str | Path, policy: PrivacyPolicy | None = None,
                      kit: str | Path | None = None, job_id: str | None = None,
                      received: Sequence[PayloadRecord] | None = None,
                      out_dir: str | Path | None = None) -> "ReportFiles":
    """Build and write a site's report (default folder: :func:`site_report_dir`)."""
    from ultrafedfm.privacy.audit.render import write_report

    report = build_site_report(SiteAuditInputs(site=site, cache=Path(cache), policy=policy,
                                               kit=Path(kit) if kit else None, job_id=job_id, received=received))
    return write_report(report, out_dir or site_report_dir(cache, job_id))


def write_server_report(*, run_dir: str | Path, job_id: str | None = None, job_spec: Mapping[str, Any] | None = None,
                        job_meta: Mapping[str, Any] | None = None, workspace: str | Path | None = None,
                        roots: Sequence[str | Path] = (), out_dir: str | Path | None = None) -> "ReportFiles":
    """Build and write the server's report (default folder: :func:`server_report_dir`)."""
    from ultrafedfm.privacy.audit.render import write_report

    report = build_server_report(ServerAuditInputs(
        roots=[Path(r) for r in roots], run_dir=Path(run_dir), workspace=Path(workspace) if workspace else None,
        job_id=job_id, job_spec=job_spec, job_meta=job_meta))
    return write_report(report, out_dir or server_report_dir(run_dir, job_id))


def read_received_records(path: str | Path) -> list[PayloadRecord]:
    """The server's received records, from its ``report.json`` or its ``received_payloads.jsonl``."""
    path = Path(path)
    if path.suffix == ".jsonl":
        return read_payload_log(path).records
    report = json.loads(path.read_text(encoding="utf-8"))
    if report.get("kind") != "server":
        raise ValueError(f"{path}: not a server audit report (kind {report.get('kind')!r})")
    job_id = report["subject"].get("job_id") or ""
    return [PayloadRecord(seq=m["seq"], time=m["time"], direction="received", site=m["site"], job_id=job_id,
                          task=m["task"], round=m["round"], bytes=m["bytes"], sha256=m["sha256"], form=m["form"])
            for m in report["received"]["items"]]
