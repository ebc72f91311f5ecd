"""The server's audit report: who took part in each round, what the server received, aggregates only.

Built from what the server holds: the run folder (``rounds.jsonl``, the received-payload log), what ``nvflare job download`` returns (FLARE's ``meta.json``, the job's
``config_fed_server.json`` with our job spec, the job's ``audit.log``), and the server's own
workspace (FLARE's ``audit.log`` of admin commands, ``startup/`` certificates, ``local/members.json``).
Per round: targets, participants, dropouts with their reasons, recoveries, the unmask threshold,
whether the round ran with secure aggregation, the aggregate loss/images/steps and the bytes
received. Per-site figures are never copied into the report; if the run folder holds any (an
older server), that is itself a finding.
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

from ultrafedfm.privacy.audit.common import envelope, source_entry
from ultrafedfm.privacy.audit.findings import Finding, sort_findings
from ultrafedfm.privacy.audit.flare_inputs import (
    find_files, job_events, read_flare_audit_log, read_job_meta, read_job_spec,
)
from ultrafedfm.privacy.audit.matching import match_payloads
from ultrafedfm.privacy.audit.payloads import (
    RECEIVED_LOG_FILE, PayloadLogContents, PayloadRecord, read_payload_log, verify_chain,
)
from ultrafedfm.privacy.audit.transport import certificate_facts, certificate_findings, membership_facts

_logger = logging.getLogger(__name__)

__all__ = ["PER_SITE_ROUND_KEYS", "ServerAuditInputs", "build_server_report"]

ROUNDS_FILE = "rounds.jsonl"  # federation.run_state.ROUNDS_FILE
# Keys of a round record that map site -> value: per-site figures a server must not keep.
PER_SITE_ROUND_KEYS = ("loss", "num_samples", "train_seconds", "steps")
_AGGREGATE_KEYS = {"global_loss": "global_loss", "total_images": "total_images", "total_steps": "total_steps"}
_RECOVERED = re.compile(r"recovered from dropped site\(s\) (?P<sites>[^;\]]+)")


@dataclass
class ServerAuditInputs:
    """Where the server's audit reads from.

    Args:
        roots: folders searched for the files: the downloaded job folder (``nvflare job download``), the
            run folder, or both.
        run_dir: the run folder (``rounds.jsonl``, the received log); default: found under ``roots``.
        workspace: the server's kit / FLARE workspace (its ``audit.log``, ``startup/``, ``local/members.json``).
        job_id: the FLARE job id (default: from ``meta.json``, or the received log).
        job_spec: the job's spec mapping (default: from ``config_fed_server.json`` under ``roots``).
        job_meta: FLARE's job meta (default: ``meta.json`` under ``roots``).
        site_logs: sites' outgoing-payload records, when sites shared them with the auditor.
        now: the time certificates are checked at.
    """

    roots: Sequence[Path] = ()
    run_dir: Path | None = None
    workspace: Path | None = None
    job_id: str | None = None
    job_spec: Mapping[str, Any] | None = None
    job_meta: Mapping[str, Any] | None = None
    site_logs: Sequence[PayloadRecord] | None = None
    now: dt.datetime | None = None
    roots_list: list[Path] = field(init=False, default_factory=list)

    def __post_init__(self) -> None:
        self.roots_list = [Path(r) for r in self.roots] + ([Path(self.run_dir)] if self.run_dir else [])


def build_server_report(inputs: ServerAuditInputs) -> dict[str, Any]:
    """The report as a JSON-ready mapping (schema: ``privacy.audit.schema``)."""
    roots = inputs.roots_list
    findings: list[Finding] = []
    sources: list[dict[str, Any]] = []
    meta = dict(inputs.job_meta) if inputs.job_meta else _first(roots, "meta.json", read_job_meta, sources, "FLARE job meta")
    spec = dict(inputs.job_spec) if inputs.job_spec else _first(roots, "config_fed_server.json", read_job_spec,
                                                                  sources, "job configuration")
    rounds = _read_rounds(roots, sources)
    received_all = _received(roots, sources)
    job_id = inputs.job_id or (meta or {}).get("job_id") or _only({r.job_id for r in received_all.records})
    received = [r for r in received_all.records if job_id is None or r.job_id == job_id]
    membership = membership_facts(inputs.workspace)

    report = envelope("server", now=inputs.now)
    report["subject"] = _subject(job_id, meta, spec, rounds)
    report["rounds"] = _rounds_section(rounds, received, spec, membership, findings)
    report["received"] = _received_section(received_all, received, findings)
    if inputs.site_logs is not None:
        report["matching"] = _matching(inputs.site_logs, received, job_id, findings)
    certs = certificate_facts(inputs.workspace, now=inputs.now)
    findings += certificate_findings(certs)
    report["transport"] = {"certificates": certs, "membership": membership}
    report["flare_audit"] = _flare_audit(inputs.workspace, roots, job_id, meta, sources, findings)
    _job_findings(spec, rounds, received, findings)
    report["findings"] = [f.to_json() for f in sort_findings(findings)]
    report["sources"] = sources
    return {"schema": report.pop("schema"), "schema_version": report.pop("schema_version"), "kind": report.pop("kind"),
            "findings": report.pop("findings"), **report}


def _only(values: set) -> Any:
    return next(iter(values)) if len(values) == 1 else None


def _first(roots: list[Path], name: str, reader, sources: list, role: str):
    for path in find_files(roots, name):
        try:
            value = reader(path)
        except (OSError, ValueError) as exc:
            _logger.warning("%s: unreadable (%s); skipped", path, exc)
            continue
        if value is not None:
            sources.append(source_entry(path, role=role, name=name))
            return value
    return None


def _read_rounds(roots: list[Path], sources: list) -> list[dict[str, Any]]:
    for path in find_files(roots, ROUNDS_FILE):
        sources.append(source_entry(path, role="round statistics", name=ROUNDS_FILE))
        rows = []
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                _logger.warning("%s: an unreadable line (torn by a crash?) skipped", path)
        return rows
    return []


def _received(roots: list[Path], sources: list):
    for path in find_files(roots, RECEIVED_LOG_FILE):
        sources.append(source_entry(path, role="received payload log", name=RECEIVED_LOG_FILE))
        return read_payload_log(path)
    return PayloadLogContents()


def _subject(job_id, meta, spec, rounds) -> dict[str, Any]:
    spec = spec or {}
    dp = spec.get("dp") or {}
    return {
        "job_id": job_id, "job": (meta or {}).get("name") or spec.get("name"), "status": (meta or {}).get("status"),
        "submitted_by": (meta or {}).get("submitter_name"), "submitter_org": (meta or {}).get("submitter_org"),
        "submitter_role": (meta or {}).get("submitter_role"), "submitted_at": (meta or {}).get("submit_time_iso"),
        "num_rounds": spec.get("num_rounds") or (rounds[0].get("num_rounds") if rounds else None),
        "rounds_recorded": len(rounds),
        "secure_aggregation": spec.get("secure_aggregation"), "min_sites": spec.get("min_sites"),
        "dp": {"enabled": bool(dp.get("enabled")), "target_epsilon": dp.get("target_epsilon"),
               "noise_multiplier": dp.get("noise_multiplier"), "max_grad_norm": dp.get("max_grad_norm"),
               "accountant": dp.get("accountant")} if spec else None,
    }


def _rounds_section(rounds, received: list[PayloadRecord], spec, membership, findings: list[Finding]) -> list[dict]:
    by_round: dict[int, list[PayloadRecord]] = defaultdict(list)
    for r in received:
        by_round[r.round].append(r)
    secure_job = (spec or {}).get("secure_aggregation")
    min_sites = (spec or {}).get("min_sites")
    out = []
    per_site_seen: set[str] = set()
    for row in rounds:
        rnd = int(row["round"])
        failed = row.get("failed") or {}
        message = row.get("message") or ""
        recovered = row.get("recovered") or row.get("dropped") or _recovered_from(message)
        participants = sorted(row.get("participants") or [])
        train = [r for r in by_round.get(rnd, []) if r.task == "train" and r.form in ("masked", "clear")]
        secure = (all(r.form == "masked" for r in train) if train else secure_job)
        threshold, threshold_source = _threshold(row, membership, secure)
        per_site_seen.update(k for k in PER_SITE_ROUND_KEYS if isinstance(row.get(k), dict) and row[k])
        aggregate = {name: row.get(key) for name, key in _AGGREGATE_KEYS.items()}
        if aggregate["total_images"] is None and isinstance(row.get("num_samples"), dict) and participants:
            aggregate["total_images"] = sum(int(row["num_samples"].get(s, 0)) for s in participants)
        out.append({
            "round": rnd, "applied": bool(row.get("applied")), "targets": sorted(row.get("targets") or []),
            "participants": participants, "dropouts": [{"site": s, "reason": failed[s]} for s in sorted(failed)],
            "recovered": sorted(recovered), "threshold": threshold, "threshold_source": threshold_source,
            "secure_aggregation": secure, "aggregate": aggregate,
            "bytes_received": sum(r.bytes for r in by_round.get(rnd, [])),
            "bytes_received_reported": row.get("bytes_received"), "messages_received": len(by_round.get(rnd, [])),
            "duration_s": row.get("duration_s"), "message": message,
        })
        if row.get("applied") and secure is False and secure_job is not False:  # (a job without it: one finding)
            findings.append(Finding("critical", "no_secure_aggregation",
                                    f"Round {rnd + 1} was aggregated WITHOUT secure aggregation: the server received "
                                    f"each site's update in the clear ({', '.join(participants)})."))
        if row.get("applied") and min_sites and len(participants) < int(min_sites):
            findings.append(Finding("critical", "too_few_sites",
                                    f"Round {rnd + 1} was aggregated over {len(participants)} site(s), fewer than the "
                                    f"job's min_sites {min_sites}."))
        for site, reason in sorted(failed.items()):
            if "refused by the site's policy" in reason and ("epsilon" in reason or "stops contributing" in reason):
                findings.append(Finding("warning", "site_at_cap",
                                        f"Site {site} stopped contributing in round {rnd + 1}: its privacy budget cap "
                                        f"was reached ({reason})."))
    if per_site_seen:
        findings.append(Finding("warning", "per_site_values_stored",
                                "The run's round statistics hold per-site values ("
                                + ", ".join(sorted(per_site_seen)) + "): the server saw them in the clear. They are "
                                "left out of this report; a server with secure aggregation should keep aggregates only."))
    return out


def _recovered_from(message: str) -> list[str]:
    match = _RECOVERED.search(message or "")
    return [s.strip() for s in match["sites"].split(",")] if match else []


def _threshold(row: Mapping[str, Any], membership: Mapping[str, Any] | None, secure: bool | None):
    if not secure:
        return None, None
    if row.get("threshold") is not None:
        return int(row["threshold"]), "round statistics"
    if membership and membership.get("threshold"):
        return int(membership["threshold"]), "member list (strict majority of the consortium)"
    return None, None


def _received_section(all_records, received: list[PayloadRecord], findings: list[Finding]) -> dict[str, Any]:
    problems = verify_chain(all_records.records)
    if problems:
        findings.append(Finding("critical", "payload_log_tampered",
                                "The server's received-payload log was edited: " + "; ".join(problems)
                                + ". What it says the server received cannot be trusted."))
    items = [{"seq": r.seq, "time": r.time, "site": r.site, "task": r.task, "round": r.round, "bytes": r.bytes,
              "sha256": r.sha256, "form": r.form, "masked": r.masked} for r in received]
    return {"count": len(items), "chain_intact": not problems, "unreadable_lines": list(all_records.unreadable_lines),
            "items": items}


def _matching(site_logs: Sequence[PayloadRecord], received: list[PayloadRecord], job_id, findings) -> dict[str, Any]:
    sent = [r for r in site_logs if job_id is None or r.job_id == job_id]
    matches = match_payloads(sent, received, sites={r.site for r in sent})
    counts: dict[str, int] = defaultdict(int)
    for m in matches:
        counts[m.state] += 1
    bad = [m for m in matches if m.state in ("hash_mismatch", "not_sent_by_site")]
    if bad:
        findings.append(Finding("critical", "payload_hash_mismatch",
                                f"{len(bad)} message(s) differ between what the sites logged as sent and what the "
                                "server logged as received: "
                                + "; ".join(f"{m.record.site} {m.record.task} round {m.record.round + 1} ({m.state})"
                                            for m in bad) + "."))
    return {"by_match": dict(sorted(counts.items())), "sites": sorted({r.site for r in sent})}


def _flare_audit(workspace: Path | None, roots: list[Path], job_id, meta, sources, findings) -> dict[str, Any]:
    events = []
    server_log = Path(workspace) / "audit.log" if workspace is not None else None
    if server_log is not None and server_log.is_file():
        sources.append(source_entry(server_log, role="FLARE admin audit log", name="audit.log (server workspace)"))
        events += read_flare_audit_log(server_log, source="server")
    for path in find_files(roots, "audit.log"):
        if server_log is not None and path == server_log.resolve():
            continue
        sources.append(source_entry(path, role="FLARE job audit log", name="audit.log (job workspace)"))
        events += read_flare_audit_log(path, source="job")
    folder = (meta or {}).get("job_folder_name")
    chosen = job_events(events, job_id=job_id, job_folder=folder)
    submissions = [e for e in chosen if e.command.endswith("submit_job")]
    if meta is not None and meta.get("submitter_name") and submissions and all(
            e.user != meta["submitter_name"] for e in submissions):
        findings.append(Finding("critical", "submitter_mismatch",
                                f"FLARE's job meta names {meta['submitter_name']} as the submitter, but its audit log "
                                f"shows the submission by {', '.join(sorted({e.user for e in submissions}))}."))
    if server_log is None or not server_log.is_file():
        findings.append(Finding("info", "flare_audit_log_missing",
                                "FLARE's audit log of admin commands was not given (--workspace SERVER_KIT): who "
                                "submitted the job is taken from the job's meta.json alone."))
    return {"submitted_by": (meta or {}).get("submitter_name"), "submitted_at": (meta or {}).get("submit_time_iso"),
            "submission_events": [_event(e) for e in submissions],
            "events": [_event(e) for e in chosen]}


def _event(e) -> dict[str, str]:
    return {"time": e.time, "user": e.user, "action": e.action, "job": e.job, "source": e.source}


def _job_findings(spec, rounds, received: list[PayloadRecord], findings: list[Finding]) -> None:
    if spec is None:
        findings.append(Finding("info", "job_spec_missing",
                                "The job's configuration (config_fed_server.json) was not found: whether the job "
                                "asked for secure aggregation and DP is unknown to this report."))
        return
    if not spec.get("secure_aggregation"):
        findings.append(Finding("critical", "no_secure_aggregation",
                                f"Job {spec.get('name')} ran WITHOUT secure aggregation: the server received each "
                                "site's update in the clear."))
    if not (spec.get("dp") or {}).get("enabled"):
        findings.append(Finding("warning", "dp_off",
                                f"Job {spec.get('name')} ran with DP-SGD OFF: the global model carries no per-image "
                                "(epsilon, delta) guarantee for any site."))
