"""Small pieces every report shares: its envelope, the inputs it was built from, number formatting."""
from __future__ import annotations

import datetime as dt
import hashlib
import logging
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

__all__ = ["SCHEMA_ID", "SCHEMA_VERSION", "envelope", "source_entry"]

SCHEMA_ID = "ultrafedfm-audit-report"
SCHEMA_VERSION = 1


def envelope(kind: str, *, now: dt.datetime | None = None) -> dict[str, Any]:
    """The fields every report starts with: schema, version, kind and when it was generated."""
    from ultrafedfm import __version__

    now = now or dt.datetime.now(dt.timezone.utc)
    return {"schema": SCHEMA_ID, "schema_version": SCHEMA_VERSION, "kind": kind,
            "generated": now.isoformat(timespec="seconds"), "generator": f"ultrafedfm {__version__}"}


def source_entry(path: Path, *, role: str, name: str) -> dict[str, Any]:
    """An input the report was computed from: its role, a name without the site's folders, its size and SHA-256.

    Anyone holding the same file can check it is the one the figures came from.
    """
    data = Path(path).read_bytes()
    return {"role": role, "name": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
