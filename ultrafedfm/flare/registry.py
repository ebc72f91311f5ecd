"""Everything FLARE must be told about our jobs, in one place: task names, classes, the class allow-list.

No FLARE import and no torch, so the kit builder (which writes every site's ``resources.json``)
stays light. The task names are the federation core's (``ultrafedfm.federation.tasks``).
"""
from __future__ import annotations

from ultrafedfm.federation.tasks import ALL_TASKS, SECAGG_TASKS, TRAIN_TASK

__all__ = [
    "ALL_TASKS", "ALLOW_LIST_COMPONENT", "CLIENT_SCRIPT_MODULE", "CONTROLLER_COMPONENT", "REQUIRED_CLASS_ALLOW_LIST",
    "SECAGG_TASKS", "TRAIN_TASK",
]

# The server's components and the site's script, by the path FLARE loads them from.
CONTROLLER_COMPONENT = "ultrafedfm.flare.server.controller.MaePretrainController"
ALLOW_LIST_COMPONENT = "ultrafedfm.flare.server.allow_list.ConsortiumAllowList"
CLIENT_SCRIPT_MODULE = "ultrafedfm.flare.site.client_script"

# What a server's / site's resources.json ``class_allow_list`` must admit besides FLARE's
# defaults for our jobs to start (FLARE 2.9 refuses other component classes in jobs without
# custom code, and its defaults leave out ClientAPIExecutor, which runs a command).
REQUIRED_CLASS_ALLOW_LIST = (
    "nvflare.app_common.executors.client_api_executor.ClientAPIExecutor",
    "ultrafedfm.",
)
