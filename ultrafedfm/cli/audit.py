"""``ultrafedfm audit``: the privacy audit report of a run, at the server, at a site, or an empirical attack.

    ultrafedfm audit --server DOWNLOAD/JOB_ID --run RUN_FOLDER --workspace SERVER_KIT --out audit-server
    ultrafedfm audit --site SITE_KIT --server-report audit-server/report.json --out audit-site
    ultrafedfm audit --empirical --out audit-empirical [--quick]
    ultrafedfm audit --print-schema

Each report is ``report.json`` (versioned schema) and ``report.html`` (one self-contained page,
findings first). The command exits 0 when the report has no critical finding, 1 when it has one,
2 when the inputs cannot be read.
"""
from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "audit", help="write the privacy audit report of a run (server, site) or run the empirical audit",
        description="Build the privacy audit report of a finished job: at the server from the folder `nvflare job "
        "download` gives plus the run folder, at a site from the site's kit (its ledger, its outgoing-payload log, "
        "its ingest counts). --empirical runs a small training with canaries and a gradient-inversion attempt and "
        "reports what an attacker learns beside what the accountant guarantees. Exit code 1: a critical finding.")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--server", type=Path, nargs="+", metavar="DIR",
                      help="what `nvflare job download` wrote (and/or the run folder); searched for the job's files")
    what.add_argument("--site", type=Path, metavar="KIT_OR_WORKSPACE",
                      help="a site's kit or FLARE workspace (holding local/site.yaml)")
    what.add_argument("--empirical", action="store_true", help="run the empirical audit (canaries, gradient inversion)")
    what.add_argument("--print-schema", action="store_true", help="print the JSON Schema of report.json and exit")
    parser.add_argument("--out", type=Path, help="folder for report.json and report.html")
    parser.add_argument("--job-id", help="the FLARE job id to report (default: the downloaded job's; at a site: all)")
    server = parser.add_argument_group("server")
    server.add_argument("--run", type=Path, help="the run folder (rounds.jsonl, received_payloads.jsonl), when "
                        "not under --server")
    server.add_argument("--workspace", type=Path, help="the server's kit / FLARE workspace (audit.log, startup/ "
                        "certificates, local/members.json)")
    server.add_argument("--site-log", type=Path, nargs="*", default=[], metavar="JSONL",
                        help="sites' outgoing_payloads.jsonl files, when sites shared them, to match hash by hash")
    site = parser.add_argument_group("site")
    site.add_argument("--site-name", help="the site's name (default: from the kit's startup/fed_client.json)")
    site.add_argument("--server-report", type=Path, metavar="REPORT_OR_JSONL",
                      help="the server's report.json (or received_payloads.jsonl) to match every message against")
    empirical = parser.add_argument_group("empirical")
    empirical.add_argument("--quick", action="store_true", help="a smaller empirical run (a smoke test, ~1 min)")
    empirical.add_argument("--seed", type=int, default=0, help="seed of the canaries, the data and the training")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultrafedfm.privacy.audit.schema import REPORT_SCHEMA
    from ultrafedfm.secagg.errors import SecAggError

    if args.print_schema:
        print(json.dumps(REPORT_SCHEMA, indent=2))
        return 0
    if args.out is None:
        _logger.error("--out DIR is required: the folder report.json and report.html are written to")
        return 2
    try:
        if args.server:
            files = _server(args)
        elif args.site:
            files = _site(args)
        else:
            from ultrafedfm.privacy.audit.empirical import run_empirical_audit

            files = run_empirical_audit(out_dir=args.out, quick=args.quick, seed=args.seed)
    except (FileNotFoundError, ValueError, SecAggError) as exc:  # a kit or file that cannot be read
        _logger.error("%s", exc)
        return 2
    report = json.loads(files.json.read_text(encoding="utf-8"))
    for finding in report["findings"]:
        print(f"{finding['severity'].upper():8s} {finding['message']}")
    if not report["findings"]:
        print("no findings")
    print(f"report: {files.html}\n        {files.json}")
    return 1 if any(f["severity"] == "critical" for f in report["findings"]) else 0


def _server(args: argparse.Namespace):
    from ultrafedfm.privacy.audit import ServerAuditInputs, build_server_report, read_payload_log, write_report

    for folder in [*args.server, *([args.run] if args.run else []), *([args.workspace] if args.workspace else [])]:
        if not folder.exists():
            raise FileNotFoundError(f"{folder} does not exist")
    site_logs = None
    if args.site_log:
        site_logs = [r for path in args.site_log for r in read_payload_log(path).records]
    report = build_server_report(ServerAuditInputs(roots=args.server, run_dir=args.run, workspace=args.workspace,
                                                   job_id=args.job_id, site_logs=site_logs))
    return write_report(report, args.out)


def _site(args: argparse.Namespace):
    from ultrafedfm.kit.enroll import kit_site_name
    from ultrafedfm.privacy.audit import SiteAuditInputs, build_site_report, read_received_records, write_report
    from ultrafedfm.site_config import find_site_config, load_site_config

    config_path = find_site_config(args.site)
    kit = config_path.parent.parent  # the folder holding local/site.yaml
    name = args.site_name or kit_site_name(kit)
    config = load_site_config(config_path, site_name=name)
    received = read_received_records(args.server_report) if args.server_report else None
    report = build_site_report(SiteAuditInputs(site=name, cache=config.cache, policy=config.privacy, kit=kit,
                                               job_id=args.job_id, received=received))
    return write_report(report, args.out)
