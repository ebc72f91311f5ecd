"""The site's audit report: what left this site, in what form, and what privacy it spent.

Built only from files on the site's own disk, all beside its cache (``<cache>/privacy/``): the
DP ledger (``dp_ledger.json``), the outgoing-payload log, the site's own round figures and the
ingest counts, plus the site kit's certificates and member list and the site's policy. The
server's received-payload log (from the server's report) is optional: with it every message is
matched hash by hash. Every figure is recomputed here from those files, never copied from a
summary: epsilon from the ledger's charges through the accountant, bytes from the payload log,
ingest counts from the in-cache list. No file name, path or patient datum enters the report.
"""
from __future__ import annotations

import csv
import datetime as dt
import json
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ultrafedfm.privacy.audit.common import envelope, source_entry
from ultrafedfm.privacy.audit.findings import NEAR_CAP_FRACTION, Finding, sort_findings
from ultrafedfm.privacy.audit.matching import match_payloads
from ultrafedfm.privacy.audit.payloads import PayloadRecord, outgoing_log_path, read_payload_log, verify_chain
from ultrafedfm.privacy.audit.transport import certificate_facts, certificate_findings, membership_facts
from ultrafedfm.privacy.dp.ledger import Ledger, LedgerError, read_ledger, site_ledger_path
from ultrafedfm.privacy.policy import PrivacyPolicy, policy_key

_logger = logging.getLogger(__name__)

__all__ = ["SiteAuditInputs", "build_site_report", "site_figures_file"]

# Written by ``ultrafedfm.federation.site_figures`` (same path; a test keeps them equal).
SITE_FIGURES_FILE = "round_figures.jsonl"
INGEST_REPORT_FILE = "ingest_report.csv"
INGEST_SUMMARY_FILE = "ingest_summary.json"
MANIFEST_FILE = "manifest.jsonl"
EPSILON_TOLERANCE = 1e-3  # relative and absolute: recorded vs recomputed epsilon (accountant round-off)


def site_figures_file(cache: Path) -> Path:
    return Path(cache) / "privacy" / SITE_FIGURES_FILE


@dataclass
class SiteAuditInputs:
    """Where a site's audit reads from.

    Args:
        site: the site's name. cache: its image cache (ledger, logs and ingest counts live there).
        policy: the site's own ``privacy:`` policy (``None``: unknown, caps not reported).
        kit: the site's kit or FLARE workspace (``startup/`` certificates, ``local/members.json``).
        job_id: report one job run (default: every job in the site's logs).
        received: the server's received-payload records, to match every message against.
        now: the time certificates are checked at (default: now).
    """

    site: str
    cache: Path
    policy: PrivacyPolicy | None = None
    kit: Path | None = None
    job_id: str | None = None
    received: Sequence[PayloadRecord] | None = None
    now: dt.datetime | None = None


def build_site_report(inputs: SiteAuditInputs) -> dict[str, Any]:
    """The report as a JSON-ready mapping (schema: ``privacy.audit.schema``)."""
    cache = Path(inputs.cache)
    findings: list[Finding] = []
    sources: list[dict[str, Any]] = []
    ledger = _ledger(cache, inputs.site, findings, sources)
    log_path = outgoing_log_path(cache)
    log = read_payload_log(log_path)
    if log_path.is_file():
        sources.append(source_entry(log_path, role="outgoing payload log", name="privacy/" + log_path.name))
    figures = _site_figures(cache, sources)

    scope = inputs.job_id
    sent = [r for r in log.records if r.site == inputs.site and (scope is None or r.job_id == scope)]
    jobs = _jobs_in_scope(ledger, sent, figures, scope)
    received = None if inputs.received is None else [r for r in inputs.received if scope is None or r.job_id == scope]
    matches = match_payloads(sent, received, sites=[inputs.site])

    report = envelope("site", now=inputs.now)
    report["subject"] = {"site": inputs.site, "jobs": [{"job_id": j, "job": jobs[j]} for j in sorted(jobs)],
                         "scope": f"job {scope}" if scope else "every job in the site's logs"}
    privacy = _privacy_section(ledger, jobs, inputs.policy, findings, inputs.site)
    report["privacy"] = privacy
    report["rounds"] = [f for f in figures if f.get("job_id") in jobs]
    report["messages"] = _messages_section(matches, log, findings)
    report["bytes_by_round"] = _bytes_by_round(sent)
    report["ingestion"] = _ingestion_section(cache, findings, sources)
    certs = certificate_facts(inputs.kit, now=inputs.now)
    findings += certificate_findings(certs)
    report["transport"] = {"certificates": certs, "membership": membership_facts(inputs.kit)}
    _round_findings(sent, jobs, ledger, inputs.policy, findings)
    report["findings"] = [f.to_json() for f in sort_findings(findings)]
    report["sources"] = sources
    return {"schema": report.pop("schema"), "schema_version": report.pop("schema_version"), "kind": report.pop("kind"),
            "findings": report.pop("findings"), **report}


def _ledger(cache: Path, site: str, findings: list[Finding], sources: list) -> Ledger:
    path = site_ledger_path(cache)
    if path.is_file():
        sources.append(source_entry(path, role="DP ledger", name="privacy/" + path.name))
    try:
        return read_ledger(path, site_name=site)
    except LedgerError as exc:
        findings.append(Finding("critical", "ledger_unreadable",
                                "The site's DP ledger cannot be read or is not this site's: "
                                f"{str(exc).replace(str(path), path.name)}"))
        return Ledger(site=site, entries=())


def _site_figures(cache: Path, sources: list) -> list[dict[str, Any]]:
    path = site_figures_file(cache)
    if not path.is_file():
        return []
    sources.append(source_entry(path, role="site round figures", name="privacy/" + path.name))
    keep = ("job", "job_id", "round", "loss", "num_samples", "steps", "masked", "clipped_coordinates", "epsilon",
            "delta", "noise_multiplier", "accountant", "epsilon_lifetime", "recorded_at")
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            data = json.loads(line)
        except ValueError:
            continue  # a torn line; the figures reader warns about it too
        rows.append({k: data.get(k) for k in keep})
    return rows


def _jobs_in_scope(ledger: Ledger, sent: list[PayloadRecord], figures: list[dict], scope: str | None) -> dict[str, str]:
    """job id -> job name, for every job run the site's files mention (or just ``scope``)."""
    jobs: dict[str, str] = {}
    for e in ledger.entries:
        jobs.setdefault(e.job_id, e.job)
    for f in figures:
        if f.get("job_id"):
            jobs.setdefault(f["job_id"], f.get("job") or "")
    for r in sent:
        jobs.setdefault(r.job_id, "")
    return {k: v for k, v in jobs.items() if scope is None or k == scope} or ({scope: ""} if scope else {})


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=EPSILON_TOLERANCE, abs_tol=EPSILON_TOLERANCE)


def _privacy_section(ledger: Ledger, jobs: dict[str, str], policy: PrivacyPolicy | None, findings: list[Finding],
                     site: str) -> dict[str, Any]:
    per_job = []
    for job_id in sorted(jobs):
        charges = ledger.charges(job_id)
        done = [e for e in ledger.entries if e.job_id == job_id and e.kind == "completed"]
        refusals = [e for e in ledger.entries if e.job_id == job_id and e.kind == "refusal"]
        if not charges:
            per_job.append({"job_id": job_id, "job": jobs[job_id], "dp": False,
                            "refusals": [{"round": e.round, "key": e.key, "reason": e.reason} for e in refusals]})
            continue
        spent = ledger.spent(job_id)
        recorded = charges[-1].epsilon_job
        if not _close(spent.epsilon, recorded):
            findings.append(Finding("critical", "ledger_epsilon_mismatch",
                                    f"Job {job_id}: the ledger records epsilon {recorded:.4f}, but its charges give "
                                    f"{spent.epsilon:.4f} when recomputed. The ledger was edited or damaged: restore it "
                                    "from the site's backup before the site trains again."))
        per_job.append({
            "job_id": job_id, "job": jobs[job_id], "dp": True, "accountant": spent.accountant,
            "epsilon": spent.epsilon, "epsilon_recorded": recorded, "delta": spent.delta,
            "noise_multiplier": sorted({c.noise_multiplier for c in charges}),
            "max_grad_norm": sorted({c.max_grad_norm for c in charges}),
            "sample_rate": sorted({c.sample_rate for c in charges}),
            "steps_charged": sum(c.steps for c in charges),
            "steps_taken": sum(e.steps_taken or 0 for e in done),
            "rounds_charged": len(charges), "rounds_completed": len(done),
            "refusals": [{"round": e.round, "key": e.key, "reason": e.reason} for e in refusals],
        })
    lifetime = None
    if ledger.charges():
        spent = ledger.spent()
        recorded = ledger.charges()[-1].epsilon_lifetime
        if not _close(spent.epsilon, recorded):
            findings.append(Finding("critical", "ledger_epsilon_mismatch",
                                    f"The ledger records a lifetime epsilon of {recorded:.4f}, but its charges give "
                                    f"{spent.epsilon:.4f} when recomputed: the ledger was edited or damaged."))
        lifetime = {"epsilon": spent.epsilon, "epsilon_recorded": recorded, "delta": spent.delta,
                    "accountant": spent.accountant, "charges": spent.charges,
                    "jobs": len({c.job_id for c in ledger.charges()})}
    caps = None
    if policy is not None:
        caps = {"require_dp": policy.require_dp, "require_secure_aggregation": policy.require_secure_aggregation,
                "max_epsilon": policy.max_epsilon, "lifetime_epsilon": policy.lifetime_epsilon,
                "max_delta": policy.max_delta, "min_noise_multiplier": policy.min_noise_multiplier,
                "min_sites": policy.min_sites}
        _cap_findings(per_job, lifetime, policy, findings, site)
    budget = {
        "lifetime_left": (policy.lifetime_epsilon - (lifetime["epsilon"] if lifetime else 0.0))
        if policy is not None and policy.lifetime_epsilon is not None else None,
        "job_left": {j["job_id"]: policy.max_epsilon - j["epsilon"] for j in per_job if j["dp"]}
        if policy is not None and policy.max_epsilon is not None else {},
    }
    series = [{"job_id": c.job_id, "round": c.round, "epsilon_job": c.epsilon_job, "epsilon_lifetime": c.epsilon_lifetime}
              for c in ledger.charges() if c.job_id in jobs]
    return {"jobs": per_job, "lifetime": lifetime, "policy": caps, "budget_left": budget, "epsilon_by_round": series}


def _cap_findings(per_job: list[dict], lifetime: dict | None, policy: PrivacyPolicy, findings: list[Finding],
                  site: str) -> None:
    for job in per_job:
        for refusal in job["refusals"]:
            findings.append(Finding("warning", "site_at_cap",
                                    f"Site {site} stopped contributing to job {job['job_id']} before round "
                                    f"{refusal['round'] + 1} ({refusal['key']}): {refusal['reason']}"))
        if job["dp"] and policy.max_epsilon is not None and job["epsilon"] >= NEAR_CAP_FRACTION * policy.max_epsilon:
            findings.append(Finding("warning", "site_near_cap",
                                    f"Job {job['job_id']} has spent epsilon {job['epsilon']:.3f} of this site's "
                                    f"{policy_key('max_epsilon')}: {policy.max_epsilon:g} "
                                    f"({job['epsilon'] / policy.max_epsilon:.0%})."))
    if lifetime and policy.lifetime_epsilon is not None and lifetime["epsilon"] >= NEAR_CAP_FRACTION * policy.lifetime_epsilon:
        findings.append(Finding("warning", "site_near_cap",
                                f"This site has spent a lifetime epsilon of {lifetime['epsilon']:.3f} of its "
                                f"{policy_key('lifetime_epsilon')}: {policy.lifetime_epsilon:g} "
                                f"({lifetime['epsilon'] / policy.lifetime_epsilon:.0%}); it will stop contributing "
                                "to any job before passing it."))


def _round_findings(sent: list[PayloadRecord], jobs: dict[str, str], ledger: Ledger, policy: PrivacyPolicy | None,
                    findings: list[Finding]) -> None:
    """Rounds whose update left unmasked, with values beside the mask, or without DP."""
    trained = [r for r in sent if r.task == "train" and r.form in ("masked", "clear")]
    clear = sorted({(r.job_id, r.round) for r in trained if r.form == "clear"})
    if clear:
        severity = "critical" if policy is None or policy.require_secure_aggregation else "warning"
        findings.append(Finding(severity, "no_secure_aggregation",
                                f"{len(clear)} round(s) sent this site's update WITHOUT secure aggregation: "
                                + _rounds_text(clear) + ". The server received that update in the clear."))
    beside = sorted({(r.job_id, r.round, f) for r in trained if r.form == "masked" for f in r.clear_fields})
    if beside:
        names = sorted({f for _, _, f in beside})
        findings.append(Finding("warning", "values_beside_mask",
                                f"Values left the site in the clear beside the masked update ({', '.join(names)}) in "
                                + _rounds_text(sorted({(j, r) for j, r, _ in beside}))
                                + ". Only the masked vector should leave; update the site's software."))
    charged = {(c.job_id, c.round) for c in ledger.charges()}
    no_dp = sorted({(r.job_id, r.round) for r in trained} - charged)
    if no_dp:
        severity = "critical" if policy is not None and policy.require_dp else "warning"
        findings.append(Finding(severity, "dp_off",
                                f"DP-SGD was OFF in {len(no_dp)} round(s) this site trained and sent: "
                                + _rounds_text(no_dp) + ". Those updates carry no per-image (epsilon, delta) "
                                "guarantee."))


def _rounds_text(pairs: list[tuple[str, int]]) -> str:
    by_job: dict[str, list[int]] = defaultdict(list)
    for job, rnd in pairs:
        by_job[job].append(rnd + 1)
    return "; ".join(f"job {job} round(s) {', '.join(map(str, sorted(rounds)))}" for job, rounds in sorted(by_job.items()))


def _messages_section(matches, log, findings: list[Finding]) -> dict[str, Any]:
    rows = []
    for m in matches:
        r = m.record
        rows.append({"seq": r.seq if m.sent else None, "time": r.time, "job_id": r.job_id, "task": r.task,
                     "round": r.round, "bytes": r.bytes, "sha256": r.sha256, "form": r.form, "masked": r.masked,
                     "clear_fields": list(r.clear_fields), "match": m.state,
                     "server_sha256": m.received.sha256 if m.received is not None else None})
    counts = Counter(m.state for m in matches)
    chain_problems = verify_chain(log.records)
    if chain_problems:
        findings.append(Finding("critical", "payload_log_tampered",
                                "The site's outgoing-payload log was edited: " + "; ".join(chain_problems)
                                + ". What it says this site sent cannot be trusted."))
    if log.unreadable_lines:
        # The writer continues the chain past a torn line, so a crash leaves the chain intact.
        findings.append(Finding("info", "payload_log_torn_lines",
                                f"{len(log.unreadable_lines)} line(s) of the outgoing-payload log are unreadable (lines "
                                f"{', '.join(map(str, log.unreadable_lines))}; a crash while writing), and skipped."))
    mismatched = [m for m in matches if m.state == "hash_mismatch"]
    if mismatched:
        findings.append(Finding("critical", "payload_hash_mismatch",
                                f"{len(mismatched)} message(s) do not match what the server logged as received: "
                                + "; ".join(f"{m.sent.task} of job {m.sent.job_id} round {m.sent.round + 1} "
                                            f"(sent {m.sent.sha256[:16]}..., received {m.received.sha256[:16]}...)"
                                            for m in mismatched)
                                + ". The payload was altered, or a log was edited."))
    foreign = [m for m in matches if m.state == "not_sent_by_site"]
    if foreign:
        findings.append(Finding("critical", "payload_not_sent_by_site",
                                f"The server logged {len(foreign)} message(s) in this site's name that the site never "
                                "sent: " + "; ".join(f"{m.received.task} of job {m.received.job_id} round "
                                                     f"{m.received.round + 1}" for m in foreign) + "."))
    if counts.get("not_received"):
        findings.append(Finding("info", "payload_not_received",
                                f"{counts['not_received']} message(s) this site sent are not in the server's log "
                                "(lost, or late after the server moved on)."))
    if counts.get("unverified"):
        findings.append(Finding("info", "payloads_unverified",
                                f"{counts['unverified']} message(s) could not be matched: the server's received log "
                                "was not given. Run `ultrafedfm audit --site KIT --server-report REPORT.json` with the "
                                "server's report to match every hash."))
    return {"count": len(rows), "by_match": dict(sorted(counts.items())), "chain_intact": not chain_problems,
            "unreadable_lines": list(log.unreadable_lines), "items": rows}


def _bytes_by_round(sent: list[PayloadRecord]) -> list[dict[str, Any]]:
    totals: dict[tuple[str, int], list[int]] = defaultdict(lambda: [0, 0])
    for r in sent:
        totals[(r.job_id, r.round)][0] += r.bytes
        totals[(r.job_id, r.round)][1] += 1
    return [{"job_id": j, "round": rnd, "bytes": b, "messages": n} for (j, rnd), (b, n) in sorted(totals.items())]


def _ingestion_section(cache: Path, findings: list[Finding], sources: list) -> dict[str, Any]:
    summary_path = cache / INGEST_SUMMARY_FILE
    report_path = cache / INGEST_REPORT_FILE
    section: dict[str, Any] = {"images_in_cache": _manifest_lines(cache / MANIFEST_FILE), "last_run": None,
                               "not_used_by_reason": None}
    if (cache / MANIFEST_FILE).is_file():
        sources.append(source_entry(cache / MANIFEST_FILE, role="cache manifest", name=MANIFEST_FILE))
    if summary_path.is_file():
        sources.append(source_entry(summary_path, role="ingest summary", name=INGEST_SUMMARY_FILE))
        data = json.loads(summary_path.read_text(encoding="utf-8"))
        section["last_run"] = {k: data.get(k) for k in ("finished", "files_seen", "added", "images_written",
                                                         "skipped_existing", "rejected")}
    if report_path.is_file():
        sources.append(source_entry(report_path, role="ingest report (keyed hashes and reasons)", name=INGEST_REPORT_FILE))
        with open(report_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or ())
            if columns & {"path", "detail"}:
                findings.append(Finding("warning", "ingest_report_has_paths",
                                        "The cache's ingest report lists source paths (written by an older version): "
                                        "a folder named after a patient would put the name in the cache. Re-run "
                                        "`ultrafedfm ingest` to move them to the LOCAL report beside the cache."))
            counts = Counter(row.get("reason", "") for row in reader)
        section["not_used_by_reason"] = dict(sorted(counts.items()))
        if section["last_run"] and section["last_run"]["rejected"] != section["not_used_by_reason"]:
            findings.append(Finding("warning", "ingest_counts_differ",
                                    "The ingest summary's counts by reason differ from the cache's ingest list: one of "
                                    "them was edited."))
    return section


def _manifest_lines(path: Path) -> int | None:
    if not path.is_file():
        return None
    with open(path, encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())
