"""A real federated run in one process (the federation core over ``LocalExchange``), with the audit wired in.

The product makes the audit calls itself: each site's ``SiteSession`` logs every reply it returns
(``record_outgoing``, into its cache) and the server's ``RoundContext`` every reply it receives
(``record_received``, into the run folder); at the end the server and every site write their reports. Used by the audit's integration test and to generate
the example report of docs/privacy-audit.md::

    .venv/bin/python tests/audit/local_run.py --out docs/audit-example
"""
from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the shared cache helper

from caches import make_cache  # noqa: E402
from ultrafedfm.config import to_mapping  # noqa: E402
from ultrafedfm.federation.aggregation import make_aggregation  # noqa: E402
from ultrafedfm.federation.job_spec import JOB_SPECS  # noqa: E402
from ultrafedfm.federation.local import LocalExchange  # noqa: E402
from ultrafedfm.federation.run_state import RunState  # noqa: E402
from ultrafedfm.federation.server import FederatedRun  # noqa: E402
from ultrafedfm.federation.site_session import SiteSession  # noqa: E402
from ultrafedfm.kit.enroll import load_server_membership  # noqa: E402
from ultrafedfm.kit.simulation_members import make_simulation_members  # noqa: E402
from ultrafedfm.privacy.audit import (  # noqa: E402
    ReportFiles, read_received_records, write_server_report, write_site_report,
)
from ultrafedfm.privacy.dp import DPConfig  # noqa: E402
from ultrafedfm.site_config import load_site_config  # noqa: E402

SIZES = {"hospital-a": 24, "hospital-b": 32, "hospital-c": 40}
JOB_ID = "5f0c2d1e-local-example"


@dataclass
class LocalRun:
    server: ReportFiles
    sites: dict[str, ReportFiles]
    run_dir: Path
    caches: dict[str, Path]


def run(root: Path, *, out: Path, rounds: int = 2, secure: bool = True, dp: bool = True) -> LocalRun:
    torch.set_num_threads(1)
    spec = dataclasses.replace(
        JOB_SPECS["mae_pretrain_tiny"], name="mae_pretrain_tiny_dp", img_size=16, num_rounds=rounds, warmup_rounds=0,
        batch_size=8, base_lr=1.5e-2, min_sites=3, round_timeout_s=120, run_name="example",
        run_state_dir=str(root / "runs"), degradations=False, secure_aggregation=secure, secagg_max_weight=64.0,
        dp=DPConfig(enabled=dp, noise_multiplier=1.1 if dp else None, max_grad_norm=1.0, accountant="rdp",
                    clipping="hooks"))
    files = make_simulation_members(root / "secagg", sorted(SIZES), consortium="example")[0]
    caches, sessions = {}, {}
    for i, (name, n) in enumerate(SIZES.items()):
        kit = root / "kits" / name
        (kit / "local").mkdir(parents=True, exist_ok=True)
        caches[name] = make_cache(root / "caches" / name, n_images=n, seed=i, brightness=0.3 + 0.2 * i)
        entry = {"cache": str(caches[name]), "num_workers": 0, "num_threads": 1,
                 "privacy": {"require_secure_aggregation": secure, "max_epsilon": 10.0, "lifetime_epsilon": 20.0},
                 "secagg_dir": str(files[name].signing_key.parent)}
        (kit / "local" / "site.yaml").write_text(yaml.safe_dump(entry))
        sessions[name] = SiteSession(site_name=name, job_id=JOB_ID, start_dir=kit)
    state = RunState(spec.run_state_dir, spec.effective_run_name)
    # The product logs both ends itself: the session every reply it returns, the round every reply it gets.
    exchange = LocalExchange(sessions)
    members = lambda: load_server_membership(root / "secagg" / "members.json")  # noqa: E731
    federated = FederatedRun(job=spec, state=state, aggregation=make_aggregation(spec, members=members),
                             exchange=exchange, job_id=JOB_ID)
    assert federated.run(connected_sites=exchange.connected_sites, aborted=lambda: False)
    # At the end of the job: the server's report, then each site's (matched against the server's hashes).
    server_kit = root / "server-kit"  # the server's kit holds the member list (no FLARE certificates here)
    (server_kit / "local").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / "secagg" / "members.json", server_kit / "local" / "members.json")
    server = write_server_report(run_dir=state.dir, job_id=JOB_ID, job_spec=to_mapping(spec), workspace=server_kit,
                                 out_dir=out / "server")
    received = read_received_records(server.json)
    sites = {}
    for name in SIZES:
        config = load_site_config(root / "kits" / name / "local" / "site.yaml", site_name=name)
        sites[name] = write_site_report(site=name, cache=config.cache, policy=config.privacy, job_id=JOB_ID,
                                        received=received, out_dir=out / name)
    return LocalRun(server=server, sites=sites, run_dir=state.dir, caches=caches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--work", type=Path, default=Path("/tmp/ufm-audit-example"))
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    result = run(args.work, out=args.out)
    print(result.server.html, *[f.html for f in result.sites.values()], sep="\n")


if __name__ == "__main__":
    main()
