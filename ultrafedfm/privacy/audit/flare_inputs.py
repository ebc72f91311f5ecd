"""What the server's audit reads from NVIDIA FLARE's own files, parsed without importing FLARE.

- FLARE's ``audit.log`` (the server workspace keeps one of admin commands; each job's run folder
  one of job events). A line is ``[E:event][R:ref][T:time][U:user][A:action]message`` for an
  admin command (``job_mgmt.submit_job <folder>``, ``abort_job <job id>``, ...) and
  ``[E:..][T:..][S:scope][J:job][A:task#id]message`` for a job event.
- The job's ``meta.json`` (what ``nvflare job download`` returns beside ``job/`` and
  ``workspace/``): who submitted the job (``submitter_name``/``org``/``role``), when
  (``submit_time_iso``), its status and the folder name the submission's audit line names.
- The job's ``config_fed_server.json``: our controller's ``spec`` (the ``JobSpec`` as a mapping),
  which says whether the job ran with secure aggregation and DP.
"""
from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

_logger = logging.getLogger(__name__)

__all__ = ["FlareAuditEvent", "find_files", "job_events", "read_flare_audit_log", "read_job_meta", "read_job_spec"]

_LINE = re.compile(
    r"^\[E:(?P<event>[^\]]*)\](?:\[R:(?P<ref>[^\]]*)\])?\[T:(?P<time>[^\]]*)\](?:\[S:(?P<scope>[^\]]*)\])?"
    r"(?:\[U:(?P<user>[^\]]*)\])?(?:\[J:(?P<job>[^\]]*)\])?(?:\[A:(?P<action>[^\]]*)\])?(?P<message>.*)$")


@dataclass(frozen=True)
class FlareAuditEvent:
    """One line of a FLARE ``audit.log``: when, who (admin commands) or which job (job events), what."""

    time: str
    user: str
    action: str
    job: str = ""
    scope: str = ""
    message: str = ""
    source: str = ""  # which audit.log: "server" (admin commands) or "job"

    @property
    def command(self) -> str:
        return self.action.split(" ", 1)[0]


def read_flare_audit_log(path: str | Path, *, source: str = "server") -> list[FlareAuditEvent]:
    """Every parseable line of a FLARE ``audit.log`` (others are skipped with a warning)."""
    path = Path(path)
    events = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        match = _LINE.match(line.strip())
        if not line.strip():
            continue
        if match is None:
            _logger.warning("%s line %d: not a FLARE audit line; skipped", path, number)
            continue
        events.append(FlareAuditEvent(time=_iso(match["time"]), user=match["user"] or "", action=match["action"] or "",
                                      job=match["job"] or "", scope=match["scope"] or "",
                                      message=(match["message"] or "").strip(), source=source))
    return events


def _iso(text: str) -> str:
    """FLARE writes local ``datetime.now()``; keep it, in ISO form, as written (no zone is recorded)."""
    try:
        return datetime.fromisoformat(text.strip()).isoformat(timespec="seconds")
    except ValueError:
        return text.strip()


_JOB_COMMANDS = ("submit_job", "abort_job", "delete_job", "download_job", "clone_job", "get_job_meta", "list_jobs",
                 "show_stats", "show_errors", "abort_task", "download_job_components")


def job_events(events: Iterable[FlareAuditEvent], *, job_id: str | None, job_folder: str | None) -> list[FlareAuditEvent]:
    """The events about one job: its submission (matched by the folder name FLARE's meta records), every
    admin command that names the job id, and the job's own events; logins, logouts and listings are left out."""
    chosen = []
    for e in events:
        if e.command in ("_cert_login", "_logout", "list_jobs", "_login"):
            continue
        about_job = bool(job_id) and (e.job == job_id or job_id in e.action or job_id in e.message)
        submitted = e.command.endswith("submit_job") and (job_folder is None or e.action.endswith(" " + job_folder))
        if about_job or submitted:
            chosen.append(e)
    return chosen


def read_job_meta(path: str | Path) -> dict[str, Any]:
    """FLARE's job ``meta.json``: the keys the report uses (missing ones are ``None``)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    keys = ("job_id", "name", "submitter_name", "submitter_org", "submitter_role", "submit_time_iso", "start_time",
            "duration", "status", "job_folder_name", "min_clients", "study")
    return {k: data.get(k) for k in keys}


def read_job_spec(path: str | Path) -> dict[str, Any] | None:
    """Our controller's ``spec`` in a ``config_fed_server.json`` (``None`` if the job has no such workflow)."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    for workflow in data.get("workflows", []):
        spec = (workflow.get("args") or {}).get("spec")
        if isinstance(spec, dict):
            return spec
    return None


def find_files(roots: Iterable[Path], name: str) -> list[Path]:
    """Files called ``name`` under any of ``roots`` (sorted, each once)."""
    found: set[Path] = set()
    for root in roots:
        root = Path(root)
        if root.is_file() and root.name == name:
            found.add(root.resolve())
        elif root.is_dir():
            found.update(p.resolve() for p in root.rglob(name) if p.is_file())
    return sorted(found)
