"""Transport evidence for a report: the TLS certificates of a kit and the secure-aggregation member list.

Certificates (FLARE's mutual TLS) are read with :mod:`ultrafedfm.kit.certs`: subject, issuing
CA, SHA-256 fingerprint, validity window and days to expiry. The member list
(``local/members.json``, :mod:`ultrafedfm.kit.membership`) gives the consortium's sites and
their key fingerprints, which hospitals compare out of band. Private keys are never opened.
"""
from __future__ import annotations

import datetime as dt
import logging
from pathlib import Path
from typing import Any

from ultrafedfm.privacy.audit.findings import Finding

_logger = logging.getLogger(__name__)

__all__ = ["certificate_facts", "certificate_findings", "membership_facts"]


def certificate_facts(kit: Path | None, *, now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """One entry per certificate in ``kit/startup`` (``*.crt``, ``rootCA.pem``), named relative to the kit."""
    from ultrafedfm.kit.certs import read_certificate, validity

    if kit is None:
        return []
    kit = Path(kit)
    startup = kit / "startup"
    candidates = sorted([*startup.glob("*.crt"), *startup.glob("rootCA.pem")]) if startup.is_dir() else []
    facts = []
    for path in candidates:
        try:
            info = read_certificate(path)
        except (OSError, ValueError) as exc:
            _logger.warning("%s: not a readable certificate (%s); left out of the report", path, exc)
            continue
        state = validity(info, now=now)
        facts.append({
            "file": path.relative_to(kit).as_posix(), "subject": info.subject_cn, "issuer": info.issuer_cn,
            "fingerprint_sha256": info.fingerprint, "not_before": info.not_before.isoformat() if info.not_before else None,
            "not_after": info.not_after.isoformat(), "days_left": state.days, "state": state.state,
            "validity": state.text,
        })
    return facts


def certificate_findings(facts: list[dict[str, Any]]) -> list[Finding]:
    findings = []
    for c in facts:
        if c["state"] in ("expired", "not_yet_valid"):
            findings.append(Finding("critical", "certificate_invalid",
                                    f"The certificate {c['file']} ({c['subject']}, issued by {c['issuer']}) "
                                    f"{c['validity']}: the site or server using it cannot connect. Re-issue it "
                                    "(provisioning/README.md)."))
        elif c["state"] == "expiring":
            findings.append(Finding("warning", "certificate_expiring",
                                    f"The certificate {c['file']} ({c['subject']}, issued by {c['issuer']}) "
                                    f"{c['validity']}. Re-issue it before then, or that participant drops out."))
    return findings


def membership_facts(kit: Path | None) -> dict[str, Any] | None:
    """The member list in ``kit/local/members.json``: version, consortium, admin key and member fingerprints."""
    if kit is None:
        return None
    path = Path(kit) / "local" / "members.json"
    if not path.is_file():
        return None
    from ultrafedfm.kit.membership import read_member_list
    from ultrafedfm.secagg.signing import format_fingerprint

    try:
        members = read_member_list(path)
    except Exception as exc:  # a damaged or unsigned list is a fact for the report, not a crash
        return {"file": "local/members.json", "error": f"{type(exc).__name__}: {exc}".replace(str(path), "members.json")}
    size = len(members.members)
    return {
        "file": "local/members.json", "consortium": members.consortium, "version": members.version,
        "admin_fingerprint": format_fingerprint(members.admin_fingerprint), "size": size,
        "threshold": size // 2 + 1,
        "members": [{"name": m.name, "fingerprint": format_fingerprint(m.fingerprint)} for m in members.members],
    }
