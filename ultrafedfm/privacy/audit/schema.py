"""The versioned JSON Schema of ``report.json`` (``schema: ultrafedfm-audit-report``, ``schema_version: 1``).

One schema, three kinds of report (``site``, ``server``, ``empirical``), each with its own required
sections. A change that removes or renames a field, or changes its meaning, bumps
``schema_version``; adding an optional field does not. ``ultrafedfm audit --print-schema`` prints it.
:func:`validate_report` checks the envelope and the required sections of each kind without any
dependency; the tests validate every report against the full schema with ``jsonschema``.
"""
from __future__ import annotations

import logging
from typing import Any

from ultrafedfm.privacy.audit.common import SCHEMA_ID, SCHEMA_VERSION

_logger = logging.getLogger(__name__)

__all__ = ["REPORT_SCHEMA", "ReportSchemaError", "validate_report"]

_NUM = {"type": ["number", "null"]}
_INT = {"type": ["integer", "null"]}
_STR = {"type": ["string", "null"]}
_HEX64 = {"type": "string", "pattern": "^[0-9a-f]{64}$"}

_FINDING = {"type": "object", "required": ["severity", "code", "message"], "additionalProperties": False,
            "properties": {"severity": {"enum": ["critical", "warning", "info"]}, "code": {"type": "string"},
                           "message": {"type": "string"}}}
_SOURCE = {"type": "object", "required": ["role", "name", "bytes", "sha256"],
           "properties": {"role": {"type": "string"}, "name": {"type": "string"}, "bytes": {"type": "integer"},
                          "sha256": _HEX64}}
_FORM = {"enum": ["masked", "protocol", "clear", "failure"]}
_CERT = {"type": "object", "required": ["file", "subject", "issuer", "fingerprint_sha256", "not_after", "days_left",
                                        "state"],
         "properties": {"fingerprint_sha256": _HEX64, "days_left": {"type": "integer"},
                        "state": {"enum": ["ok", "expiring", "expired", "not_yet_valid"]}}}
_TRANSPORT = {"type": "object", "required": ["certificates", "membership"],
              "properties": {"certificates": {"type": "array", "items": _CERT},
                             "membership": {"type": ["object", "null"]}}}

_SITE_JOB = {"type": "object", "required": ["job_id", "dp", "refusals"], "properties": {
    "job_id": {"type": "string"}, "dp": {"type": "boolean"}, "epsilon": {"type": "number", "minimum": 0},
    "delta": _NUM, "accountant": _STR, "noise_multiplier": {"type": "array", "items": {"type": "number"}},
    "max_grad_norm": {"type": "array", "items": {"type": "number"}},
    "sample_rate": {"type": "array", "items": {"type": "number"}}, "steps_charged": {"type": "integer"},
    "steps_taken": {"type": "integer"}, "rounds_charged": {"type": "integer"}, "rounds_completed": {"type": "integer"},
    "refusals": {"type": "array"}}}
_MESSAGE = {"type": "object", "required": ["job_id", "task", "round", "bytes", "sha256", "form", "masked", "match"],
            "properties": {"round": {"type": "integer", "minimum": 0}, "bytes": {"type": "integer", "minimum": 0},
                           "sha256": _HEX64, "form": _FORM, "masked": {"type": "boolean"},
                           "match": {"enum": ["matched", "hash_mismatch", "not_received", "unverified",
                                              "not_sent_by_site"]}}}
_SITE = {
    "required": ["subject", "privacy", "rounds", "messages", "bytes_by_round", "ingestion", "transport"],
    "properties": {
        "subject": {"type": "object", "required": ["site", "jobs", "scope"]},
        "privacy": {"type": "object", "required": ["jobs", "lifetime", "policy", "budget_left", "epsilon_by_round"],
                    "properties": {"jobs": {"type": "array", "items": _SITE_JOB}}},
        "messages": {"type": "object", "required": ["count", "by_match", "chain_intact", "items"],
                     "properties": {"items": {"type": "array", "items": _MESSAGE}}},
        "ingestion": {"type": "object", "required": ["images_in_cache", "last_run", "not_used_by_reason"]},
        "transport": _TRANSPORT,
    },
}
_ROUND = {"type": "object", "required": ["round", "applied", "targets", "participants", "dropouts", "recovered",
                                         "threshold", "secure_aggregation", "aggregate", "bytes_received"],
          "properties": {"round": {"type": "integer", "minimum": 0},
                         "participants": {"type": "array", "items": {"type": "string"}},
                         # Aggregates only: a per-site field here would be a schema violation.
                         "aggregate": {"type": "object", "required": ["global_loss", "total_images", "total_steps"],
                                       "properties": {"global_loss": _NUM, "total_images": _INT, "total_steps": _INT},
                                       "additionalProperties": False},
                         "threshold": _INT, "bytes_received": {"type": "integer"}}}
_SERVER = {
    "required": ["subject", "rounds", "received", "transport", "flare_audit"],
    "properties": {
        "subject": {"type": "object", "required": ["job_id", "job", "submitted_by", "submitted_at",
                                                   "secure_aggregation", "dp"]},
        "rounds": {"type": "array", "items": _ROUND},
        "received": {"type": "object", "required": ["count", "chain_intact", "items"]},
        "transport": _TRANSPORT,
        "flare_audit": {"type": "object", "required": ["submitted_by", "submitted_at", "events"]},
    },
}
_RUN = {"type": "object", "required": ["label", "dp", "epsilon_accountant", "delta", "epsilon_lower_bound", "canaries",
                                       "inserted", "guesses", "correct"],
        "properties": {"epsilon_lower_bound": {"type": "number", "minimum": 0}, "epsilon_accountant": _NUM}}
_EMPIRICAL = {
    "required": ["subject", "canary_audit", "inversion"],
    "properties": {
        "canary_audit": {"type": "object", "required": ["method", "runs"],
                         "properties": {"runs": {"type": "array", "items": _RUN}}},
        "inversion": {"type": "object", "required": ["method", "attacks"]},
    },
}

REPORT_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": f"https://ultrafedfm.invalid/schemas/{SCHEMA_ID}/v{SCHEMA_VERSION}.json",
    "title": "UltraFedFM privacy audit report",
    "type": "object",
    "required": ["schema", "schema_version", "kind", "findings", "generated", "generator", "sources"],
    "properties": {
        "schema": {"const": SCHEMA_ID}, "schema_version": {"const": SCHEMA_VERSION},
        "kind": {"enum": ["site", "server", "empirical"]}, "generated": {"type": "string"},
        "generator": {"type": "string"}, "findings": {"type": "array", "items": _FINDING},
        "sources": {"type": "array", "items": _SOURCE},
    },
    "allOf": [
        {"if": {"properties": {"kind": {"const": "site"}}}, "then": _SITE},
        {"if": {"properties": {"kind": {"const": "server"}}}, "then": _SERVER},
        {"if": {"properties": {"kind": {"const": "empirical"}}}, "then": _EMPIRICAL},
    ],
}

_REQUIRED_BY_KIND = {"site": _SITE["required"], "server": _SERVER["required"], "empirical": _EMPIRICAL["required"]}


class ReportSchemaError(ValueError):
    """A report does not follow its schema (a bug in the builder: the message names the field)."""


def validate_report(report: dict[str, Any]) -> None:
    """The envelope and each kind's required sections (the full schema is checked by the tests)."""
    for key in REPORT_SCHEMA["required"]:
        if key not in report:
            raise ReportSchemaError(f"report has no '{key}'")
    if report["schema"] != SCHEMA_ID or report["schema_version"] != SCHEMA_VERSION:
        raise ReportSchemaError(f"report is {report['schema']} v{report['schema_version']}, expected {SCHEMA_ID} "
                                f"v{SCHEMA_VERSION}")
    kind = report["kind"]
    if kind not in _REQUIRED_BY_KIND:
        raise ReportSchemaError(f"unknown report kind {kind!r}")
    missing = [k for k in _REQUIRED_BY_KIND[kind] if k not in report]
    if missing:
        raise ReportSchemaError(f"{kind} report has no {', '.join(missing)}")
    for f in report["findings"]:
        if f.get("severity") not in ("critical", "warning", "info") or not f.get("message"):
            raise ReportSchemaError(f"malformed finding {f!r}")
