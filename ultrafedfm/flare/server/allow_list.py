"""Server component: only the consortium's sites may register, whatever certificate they hold.

FLARE's server admits any client whose certificate chains to the project's root CA, and has no
allow-list of its own; a certificate issued by mistake (or for a site that has left) would join,
receive jobs and be aggregated. This component, placed in the server kit's ``resources.json`` by
our kit builder, refuses the registration of any site not listed in ``local/consortium.json``
(re-read at every registration, so adding a site needs no restart).
"""
from __future__ import annotations

import json
from pathlib import Path

from nvflare.apis.event_type import EventType
from nvflare.apis.fl_component import FLComponent
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.fl_exception import NotAuthenticated
from nvflare.private.defs import ClientType

__all__ = ["ConsortiumAllowList", "ALLOW_LIST_FILE"]

ALLOW_LIST_FILE = "consortium.json"


class ConsortiumAllowList(FLComponent):
    def __init__(self, allow_list_file: str = ALLOW_LIST_FILE):
        super().__init__()
        self.allow_list_file = allow_list_file

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        if event_type != EventType.CLIENT_REGISTER_RECEIVED:
            return
        if fl_ctx.get_prop(FLContextKey.CLIENT_TYPE) == ClientType.ADMIN:
            return
        peer = fl_ctx.get_peer_context()
        name = peer.get_identity_name() if peer else None
        allowed = self._allowed_sites(fl_ctx)
        if name not in allowed:
            message = (f"site {name!r} is not in the consortium allow-list ({', '.join(sorted(allowed))}); "
                       f"registration refused. Add it with `ultrafedfm kit add-site` and copy the new "
                       f"{self.allow_list_file} to the server's local/ folder")
            self.log_error(fl_ctx, message)
            raise NotAuthenticated(message)

    def _allowed_sites(self, fl_ctx: FLContext) -> set[str]:
        workspace = fl_ctx.get_engine().get_workspace()
        path = Path(workspace.get_site_config_dir()) / self.allow_list_file
        try:
            return set(json.loads(path.read_text())["sites"])
        except (OSError, ValueError, KeyError) as exc:
            # Fail closed: without a readable allow-list nobody joins, and the log says why.
            self.log_error(fl_ctx, f"cannot read the consortium allow-list {path}: {exc}; refusing every site")
            return set()
