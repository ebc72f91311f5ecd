"""``ultrafedfm jobs``: regenerate the FLARE job folders under ``jobs/`` or check them for drift.

    ultrafedfm jobs export            # rewrite jobs/mae_pretrain and jobs/mae_pretrain_tiny
    ultrafedfm jobs check             # exit 1 when a committed folder differs from its definition

The jobs are defined once in ``ultrafedfm.federation.job_spec.JOB_SPECS``; run one on a
provisioned system with ``nvflare job submit -j jobs/<name>`` from an admin startup kit.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "jobs",
        help="export the FLARE job folders (jobs/) from their Python definitions, or check them for drift",
    )
    parser.add_argument("action", choices=["export", "check"])
    parser.add_argument("--dir", type=Path, default=Path("jobs"), help="jobs folder (default: ./jobs)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultrafedfm.flare.deploy.job_builder import check_committed_jobs, export_all

    if args.action == "export":
        for path in export_all(args.dir):
            _logger.info("wrote %s", path)
        return 0
    drift = check_committed_jobs(args.dir)
    bad = {name: problems for name, problems in drift.items() if problems}
    for name, problems in bad.items():
        _logger.error("%s drifted from its definition: %s", args.dir / name, "; ".join(problems))
    if bad:
        _logger.error("run `ultrafedfm jobs export --dir %s` and commit the result", args.dir)
        return 1
    _logger.info("all %d job folders in %s match their definitions", len(drift), args.dir)
    return 0
