"""A FLARE provisioning builder that puts UltraFedFM's site template into every kit.

Runs after FLARE's own builders (``nvflare provision`` with our project.yml). For each site it
writes into the kit's ``local/`` folder: the filled-in ``site.yaml``, ``privacy.json``,
``authorization.json``, ``resources.json`` (FLARE's default with our overlay applied),
``consortium.json`` (the consortium's name, server, site allow-list and root-CA fingerprint, which
``ultrafedfm kit check`` compares against), the consortium's current ``members.json`` (the member
list the project admin's membership key signed; a new kit's own site is enrolled after it ran
``ultrafedfm kit enroll``, and the admin then sends every kit the new list) and ``README.md`` for
the hospital's IT. The server kit gets ``consortium.json`` (its allow-list, enforced at
registration by :class:`ultrafedfm.flare.server.allow_list.ConsortiumAllowList`), the same
``members.json`` and job/snapshot stores inside its own workspace instead of FLARE's shared
``/tmp/nvflare`` default. No private key of any kind is written by this builder.
"""
from __future__ import annotations

import json
import logging
import shutil
import string
from pathlib import Path
from typing import Any

from nvflare.lighter.spec import Builder, Project, ProvisionContext

from ultrafedfm.flare.registry import ALLOW_LIST_COMPONENT, REQUIRED_CLASS_ALLOW_LIST
from ultrafedfm.kit.certs import ca_fingerprint

_logger = logging.getLogger(__name__)

__all__ = ["SiteKitBuilder"]

SITE_FILES = ("site.yaml", "privacy.json", "authorization.json")
MEMBERS_FILE = "members.json"  # ultrafedfm.kit.membership.MEMBERS_FILE (not imported: this builder stays light)
RESOURCES_OVERLAY = "resources.json"
KIT_README = "README_KIT.md"


class SiteKitBuilder(Builder):
    """Args (from project.yml): ``template_dir`` — a folder laid out like ``site_templates/``;
    ``server_store_dir`` — absolute path on the server machine for its job and snapshot stores;
    ``members_file`` — the consortium's signed ``members.json`` (``<workspace>/membership/``),
    copied into every kit's ``local/`` (``None``: none is copied)."""

    def __init__(self, template_dir: str, server_store_dir: str = "/var/lib/ultrafedfm",
                 members_file: str | None = None):
        self.template_dir = Path(template_dir)
        self.server_store_dir = server_store_dir
        self.members_file = members_file

    def initialize(self, project: Project, ctx: ProvisionContext) -> None:
        missing = [n for n in (*SITE_FILES, RESOURCES_OVERLAY, KIT_README) if not (self.template_dir / n).is_file()]
        if missing:
            raise ValueError(f"site template folder {self.template_dir} lacks {', '.join(missing)}")
        if self.members_file is not None and not Path(self.members_file).is_file():
            raise ValueError(f"member list {self.members_file} not found; `ultrafedfm kit init` creates it "
                             "(`ultrafedfm kit membership init` on its own)")

    def build(self, project: Project, ctx: ProvisionContext) -> None:
        server = project.get_server()
        sites = [c.name for c in project.get_clients()]
        fingerprint = ca_fingerprint(Path(ctx.get_kit_dir(server)) / "rootCA.pem")
        consortium = {
            "consortium": project.name,
            "server": {
                "host": server.name,
                "fed_learn_port": server.get_prop("fed_learn_port"),
                "admin_port": server.get_prop("admin_port"),
            },
            "sites": sites,
            "root_ca_sha256": fingerprint,
        }
        self._build_server(server, ctx, consortium)
        for client in project.get_clients():
            self._build_site(client, ctx, consortium)

    def _build_server(self, server, ctx: ProvisionContext, consortium: dict[str, Any]) -> None:
        project_name = consortium["consortium"]
        local = Path(ctx.get_local_dir(server))
        _write_json(local / "consortium.json", consortium)
        resources = json.loads((local / "resources.json.default").read_text())
        # Each deployment keeps its own job and snapshot stores (FLARE defaults to /tmp/nvflare,
        # shared by every deployment on the machine; FLARE requires absolute paths here).
        store = f"{self.server_store_dir.rstrip('/')}/{project_name}"
        resources["snapshot_persistor"]["args"]["storage"]["args"]["root_dir"] = f"{store}/snapshot-storage"
        for component in resources["components"]:
            if component.get("id") == "job_manager":
                component["args"]["uri_root"] = f"{store}/jobs-storage"
        resources["components"].append({"id": "consortium_allow_list", "path": ALLOW_LIST_COMPONENT, "args": {}})
        _allow_classes(resources, [ALLOW_LIST_COMPONENT, *REQUIRED_CLASS_ALLOW_LIST])
        _write_json(local / "resources.json", resources)
        self._copy_members(local)

    def _build_site(self, client, ctx: ProvisionContext, consortium: dict[str, Any]) -> None:
        local = Path(ctx.get_local_dir(client))
        values = {
            "site_name": client.name,
            "site_org": client.org,
            "consortium": consortium["consortium"],
            "server_host": consortium["server"]["host"],
            "fed_learn_port": str(consortium["server"]["fed_learn_port"]),
            "root_ca_sha256": consortium["root_ca_sha256"],
        }
        for name in SITE_FILES:
            (local / name).write_text(_fill(self.template_dir / name, values))
        (Path(ctx.get_ws_dir(client)) / "README.md").write_text(_fill(self.template_dir / KIT_README, values))
        _write_json(local / "consortium.json", consortium)
        resources = json.loads((local / "resources.json.default").read_text())
        overlay = json.loads(_fill(self.template_dir / RESOURCES_OVERLAY, values))
        resources = _merge_resources(resources, overlay)
        _allow_classes(resources, list(REQUIRED_CLASS_ALLOW_LIST))
        _write_json(local / "resources.json", resources)
        self._copy_members(local)

    def _copy_members(self, local: Path) -> None:
        if self.members_file is not None:
            shutil.copyfile(self.members_file, local / MEMBERS_FILE)


def _fill(path: Path, values: dict[str, str]) -> str:
    try:
        return string.Template(path.read_text()).substitute(values)
    except (KeyError, ValueError) as exc:
        raise ValueError(f"{path}: unknown or malformed placeholder {exc}; allowed: {', '.join(values)}") from exc


def _merge_resources(resources: dict[str, Any], overlay: dict[str, Any]) -> dict[str, Any]:
    """Apply ``overlay`` ({"components": {id: {arg: value}}, other keys replace}) to FLARE's default."""
    overlay = dict(overlay)
    overlay.pop("_comment", None)
    by_id = overlay.pop("components", {})
    for component in resources.get("components", []):
        if component.get("id") in by_id:
            component.setdefault("args", {}).update(by_id.pop(component["id"]))
    if by_id:
        raise ValueError(f"resources.json overlay names unknown components: {', '.join(by_id)}")
    resources.update(overlay)
    return resources


def _allow_classes(resources: dict[str, Any], classes: list[str]) -> None:
    """Admit our job components (FLARE 2.9 enforces ``class_allow_list`` for jobs without custom code)."""
    allowed = resources.setdefault("class_allow_list", [])
    allowed += [c for c in classes if c not in allowed]


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
