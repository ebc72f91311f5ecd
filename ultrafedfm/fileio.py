"""Atomic, crash-safe file writes: a reader sees the old file or the new one, never half of one.

Every file the project replaces in place -- training checkpoints, the server's run state, an
exported model, a site's privacy ledger -- goes through :func:`atomic_write_bytes`: write a
temporary file beside the target, ``fsync`` it, ``os.replace`` it over the target, then
``fsync`` the folder so the rename itself survives a power cut or SIGKILL.
"""
from __future__ import annotations

import io
import json
import logging
import os
from pathlib import Path
from typing import Any

_logger = logging.getLogger(__name__)

__all__ = ["append_line", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems cannot open folders; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | Path, data: bytes, *, mode: int | None = None) -> Path:
    """Replace ``path`` with ``data`` atomically and durably (``mode``: permission bits, e.g. 0o600)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    fd = os.open(tmp, flags, 0o600 if mode is None else mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, *, mode: int | None = None) -> Path:
    """:func:`atomic_write_bytes` for UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"), mode=mode)


def atomic_write_json(path: str | Path, data: Any, *, mode: int | None = None) -> Path:
    """:func:`atomic_write_text` of ``data`` as indented JSON with a final newline."""
    return atomic_write_text(path, json.dumps(data, indent=2) + "\n", mode=mode)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (serialised in memory, then written once)."""
    import torch  # deferred: callers without torch (kit tools) import this module too

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write_bytes(path, buffer.getvalue(), mode=0o644)


def append_line(path: str | Path, line: str, *, durable: bool = True) -> None:
    """Append one line (``\\n`` added) to ``path``; with ``durable``, fsync before returning.

    A crash can leave at most a torn last line, which readers of append-only logs must skip; the
    next append starts on a fresh line, so a torn line never swallows the record after it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+b") as f:
        data = line.rstrip("\n").encode("utf-8") + b"\n"
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
        f.write(data)
        if durable:
            f.flush()
            os.fsync(f.fileno())
