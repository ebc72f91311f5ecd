"""Server result filter: write down what each site's reply carries -- names, types and shapes, never values.

For checking what leaves a site, as the server actually receives it (after FLARE's transport,
before our controller sees it): one JSON line per task result with the task, the site, the
DXO's data kind, each parameter's dtype and shape, the DXO meta's keys (with value types), the
Shareable's header names and the return code. Add it to a job with
``job.to_server(ReplyRecorder(record_file=...), filter_type=FilterType.TASK_RESULT, tasks=list(ALL_TASKS))``
(the server matches filters by task name: ``"*"`` matches nothing there);
``tests/flare/test_flare_secagg_sim.py`` does so to show that a secure round's replies carry the
masked payload and nothing else.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from nvflare.apis.dxo import from_shareable
from nvflare.apis.filter import Filter
from nvflare.apis.fl_constant import FLContextKey
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import ReservedHeaderKey, Shareable

from ultrafedfm.fileio import append_line

_logger = logging.getLogger(__name__)

__all__ = ["ReplyRecorder", "read_reply_records"]


class ReplyRecorder(Filter):
    """Appends a description of every result it sees to ``record_file`` and passes the result on unchanged.

    (FLARE reads a component argument called ``path`` as a class path, hence the name.)
    """

    def __init__(self, record_file: str):
        super().__init__()
        self.record_file = record_file

    def process(self, shareable: Shareable, fl_ctx: FLContext) -> Shareable:
        peer = fl_ctx.get_peer_context()
        record = {
            "task": fl_ctx.get_prop(FLContextKey.TASK_NAME) or shareable.get_header(ReservedHeaderKey.TASK_NAME),
            "site": peer.get_identity_name() if peer else None,
            "return_code": shareable.get_return_code(),
            "headers": sorted(str(k) for k in shareable.get(ReservedHeaderKey.HEADERS) or {}),
            "top_level": sorted(str(k) for k in shareable if k != ReservedHeaderKey.HEADERS),
            "data_kind": None, "params": {}, "meta": {},
        }
        try:
            dxo = from_shareable(shareable)
        except ValueError:  # a failure reply carries no DXO
            dxo = None
        if dxo is not None:
            record["data_kind"] = dxo.data_kind
            record["params"] = {str(k): _describe(v) for k, v in (dxo.data or {}).items()}
            record["meta"] = {str(k): type(v).__name__ for k, v in (dxo.meta or {}).items()}
        append_line(Path(self.record_file), json.dumps(record, sort_keys=True))
        return shareable


def _describe(value) -> str:
    array = np.asarray(value) if not isinstance(value, (dict, list, str, bytes)) else None
    return f"{array.dtype}{list(array.shape)}" if array is not None else type(value).__name__


def read_reply_records(path: str | Path) -> list[dict]:
    """The records a :class:`ReplyRecorder` wrote, oldest first."""
    path = Path(path)
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
