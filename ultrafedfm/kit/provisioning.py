"""Provision a consortium with FLARE's provisioner and our site-kit builder (run as ``nvflare provision``).

``provision_consortium`` writes FLARE's project.yml from the consortium file and runs
``nvflare provision`` in a workspace that keeps the project's root CA (``state/cert.json``).
Adding a site re-runs it with the new site and copies out only that site's kit: every other
kit stays as issued, and the root CA is checked to be unchanged (re-provisioning that silently
replaces the CA is the classic way to lock every hospital out).

Secure aggregation's member list is not FLARE's: the first provisioning also creates the project
admin's *membership key* and version 1 of the signed ``members.json`` (no member yet) in
``<workspace>/membership/`` (``ultrafedfm.kit.membership.init_membership``), and the kit builder
copies the current ``members.json`` into every kit. Sites then enrol their own keys
(``ultrafedfm kit enroll``; the admin runs ``ultrafedfm kit membership add``) and the admin sends
the new list to every kit. The membership key may be moved off the workspace machine: provisioning
needs only ``members.json``.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from ultrafedfm.kit.certs import ca_fingerprint
from ultrafedfm.kit.consortium import ConsortiumConfig, SiteSpec, add_site, project_dict
from ultrafedfm.kit.membership import MEMBERS_FILE, init_membership

_logger = logging.getLogger(__name__)

__all__ = ["MEMBERSHIP_DIR", "ProvisionResult", "add_site_kit", "default_template_dir", "ensure_membership",
           "project_yaml", "provision_consortium"]

MEMBERSHIP_DIR = "membership"  # <workspace>/membership/: what `ultrafedfm kit membership ...` reads and writes

FLARE_BUILDERS = [
    {"path": "nvflare.lighter.impl.workspace.WorkspaceBuilder"},
    {"path": "nvflare.lighter.impl.static_file.StaticFileBuilder", "args": {"config_folder": "config"}},
]


@dataclass(frozen=True)
class ProvisionResult:
    kits_dir: Path  # folder holding one kit per participant (this provisioning's prod_NN)
    root_ca_sha256: str
    kits: dict[str, Path]
    members: Path | None = None  # the member list copied into every kit (<workspace>/membership/members.json)
    membership_key: Path | None = None  # the admin's membership key, when this provisioning created it


def default_template_dir() -> Path:
    """The project's ``site_templates/`` folder (next to the package in a checkout)."""
    return Path(__file__).resolve().parents[2] / "site_templates"


def project_yaml(config: ConsortiumConfig, *, template_dir: str | Path,
                 members_file: str | Path | None = None) -> str:
    """FLARE's project.yml for ``config``: FLARE's builders, then our site-kit builder (which copies
    ``members_file`` into every kit)."""
    return yaml.safe_dump(project_dict(config, builders=_builders(config, template_dir, members_file)), sort_keys=False)


def _builders(config: ConsortiumConfig, template_dir: str | Path, members_file: str | Path | None) -> list[dict]:
    kit_args = {"template_dir": str(template_dir), "server_store_dir": config.server.store_dir}
    if members_file is not None:
        kit_args["members_file"] = str(members_file)
    return [
        *FLARE_BUILDERS,
        {"path": "nvflare.lighter.impl.cert.CertBuilder", "args": {"root_valid_days": config.cert_valid_days}},
        {"path": "nvflare.lighter.impl.signature.SignatureBuilder"},
        {"path": "ultrafedfm.flare.deploy.kit_builder.SiteKitBuilder", "args": kit_args},
    ]


def ensure_membership(config: ConsortiumConfig, *, workspace: Path) -> tuple[Path, Path | None]:
    """``<workspace>/membership/members.json``, created with the admin's membership key the first time.

    Returns (member list, key path if created now, else ``None``). An existing list (perhaps with its
    key moved elsewhere) is kept as it is.
    """
    folder = Path(workspace) / MEMBERSHIP_DIR
    members = folder / MEMBERS_FILE
    if members.is_file():
        return members, None
    folder.mkdir(parents=True, exist_ok=True)
    key, members = init_membership(folder, consortium=config.name, server=config.server.host)
    _logger.info("membership key %s (0600) and member list v1 %s created", key, members)
    return members, key


def provision_consortium(
    config: ConsortiumConfig, *, workspace: Path, template_dir: Path | None = None
) -> ProvisionResult:
    """Provision every participant of ``config`` into ``workspace`` (created when absent)."""
    template_dir = (template_dir or default_template_dir()).resolve()
    workspace = workspace.resolve()
    workspace.mkdir(parents=True, exist_ok=True)
    members, created_key = ensure_membership(config, workspace=workspace)
    project_file = workspace / "project.yml"
    project_file.write_text(project_yaml(config, template_dir=template_dir, members_file=members))
    before = set(_prod_dirs(workspace, config.name))
    cmd = [sys.executable, "-m", "nvflare.cli", "provision", "-p", str(project_file), "-w", str(workspace), "--force"]
    proc = subprocess.run(cmd, cwd=workspace, capture_output=True, text=True, env=_env())
    new = sorted(set(_prod_dirs(workspace, config.name)) - before)
    if proc.returncode != 0 or not new:
        raise RuntimeError(
            f"FLARE provisioning failed (exit {proc.returncode}) for {project_file}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}"
        )
    kits_dir = new[-1]
    kits = {p.name: p for p in kits_dir.iterdir() if p.is_dir()}
    fingerprint = ca_fingerprint(kits[config.server.host] / "startup" / "rootCA.pem")
    _logger.info("provisioned %d kits in %s (root CA %s...)", len(kits), kits_dir, fingerprint[:16])
    return ProvisionResult(kits_dir=kits_dir, root_ca_sha256=fingerprint, kits=kits, members=members,
                           membership_key=created_key)


def add_site_kit(
    config: ConsortiumConfig, site: SiteSpec, *, workspace: Path, out_dir: Path, template_dir: Path | None = None
) -> tuple[ConsortiumConfig, Path]:
    """Issue a kit for ``site`` under the consortium's existing root CA; returns the new config and kit path.

    Refuses when the workspace has no root CA yet (that would mint a new CA) and fails loudly
    if the CA changed. Only the new site's kit is copied to ``out_dir``.
    """
    workspace = workspace.resolve()
    state = workspace / config.name / "state" / "cert.json"
    if not state.is_file():
        raise FileNotFoundError(
            f"{state} not found: this is not the consortium's provisioning workspace (no root CA). "
            "Run `ultrafedfm kit add-site` with the --workspace that `kit init` created; never re-initialise."
        )
    previous = _prod_dirs(workspace, config.name)
    old_ca = ca_fingerprint(previous[-1] / config.server.host / "startup" / "rootCA.pem")
    updated = add_site(config, site)
    result = provision_consortium(updated, workspace=workspace, template_dir=template_dir)
    if result.root_ca_sha256 != old_ca:
        raise RuntimeError(
            f"the root CA changed ({old_ca[:16]}... -> {result.root_ca_sha256[:16]}...): every kit would stop "
            f"working. Restore {state} from backup; do not distribute {result.kits_dir}."
        )
    target = out_dir / site.name
    if target.exists():
        raise FileExistsError(f"{target} exists; move it away before issuing the kit again")
    shutil.copytree(result.kits[site.name], target)
    return updated, target


def _prod_dirs(workspace: Path, project: str) -> list[Path]:
    root = workspace / project
    return sorted(p for p in root.glob("prod_*") if p.is_dir()) if root.is_dir() else []


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # The builder is imported by the provisioner process: make our package importable there.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")]))
    return env
