"""What left a site and what reached the server: append-only payload logs with a hash chain.

Every message a site sends (a masked update, a secure-aggregation protocol message, a plain
delta, a refusal) is recorded by the site, after it is built and before it is handed to the
transport, in ``<cache>/privacy/outgoing_payloads.jsonl``; every reply the server receives is
recorded by the server in ``<run folder>/received_payloads.jsonl``. A record holds the task, the
round, the payload's size and SHA-256 (:func:`payload_digest`, over the arrays exactly as they
travel), its form (``masked``, ``protocol``, ``clear`` or ``failure``) and the *names* of any
values that travelled beside the payload -- never a value, a path or an image count.

Records are chained: ``chain = SHA-256(previous chain || canonical JSON of the record)``, so an
edited, removed or reordered record breaks the chain from that point (:func:`verify_chain`).
That catches a careless edit; someone who rewrites the whole chain is caught by the other
side's log, which the audit matches hash by hash (``privacy.audit.matching``). Appends are
durable (:func:`ultrafedfm.fileio.append_line`, fsync) and serialised by a file lock, so two
jobs at one site never fork the chain; a line torn by a crash is skipped by the reader.

Example (the calls the transport layer makes)::

    record_outgoing(cache, site="hospital-a", job_id=job_id, task="train", round_index=3,
                    params=reply.params, meta=reply.meta, metrics=reply.metrics)      # at the site
    record_received(run_dir, site=reply.site, job_id=job_id, task="train", round_index=3,
                    params=reply.params, metrics=reply.metrics)                        # at the server
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, fields, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping

import numpy as np

from ultrafedfm.fileio import append_line

_logger = logging.getLogger(__name__)

__all__ = [
    "FORMS", "OUTGOING_LOG_FILE", "RECEIVED_LOG_FILE", "PayloadLog", "PayloadRecord", "classify_payload",
    "outgoing_log_path", "payload_digest", "read_payload_log", "received_log_path", "record_outgoing",
    "record_received", "verify_chain",
]

OUTGOING_LOG_FILE = "outgoing_payloads.jsonl"
RECEIVED_LOG_FILE = "received_payloads.jsonl"
FORMS = ("masked", "protocol", "clear", "failure")
Form = Literal["masked", "protocol", "clear", "failure"]
GENESIS = "0" * 64
# The params key under which a secure-aggregation message travels (``federation.wire.SECAGG_KEY``;
# a test keeps the two equal -- privacy/ imports nothing from federation/).
SECAGG_PARAMS_KEY = "__secagg__"
TRAIN_TASK = "train"


def outgoing_log_path(cache: str | Path) -> Path:
    """Where a site logs what it sent: beside its privacy ledger, in its cache folder."""
    return Path(cache) / "privacy" / OUTGOING_LOG_FILE


def received_log_path(run_dir: str | Path) -> Path:
    """Where the server logs what it received: in the run's folder (``federation.run_state.RunState.dir``)."""
    return Path(run_dir) / RECEIVED_LOG_FILE


def _as_array(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor, without importing torch
        value = value.detach().cpu().numpy()
    array = np.ascontiguousarray(np.asarray(value))
    if array.dtype.byteorder == ">":
        array = array.astype(array.dtype.newbyteorder("<"))
    return array


def payload_digest(params: Mapping[str, Any] | None) -> tuple[str, int]:
    """(SHA-256 hex, bytes) of a message's arrays as they travel.

    The hash covers, in sorted-name order, each name, dtype, shape and the raw little-endian
    bytes, each length-prefixed; ``bytes`` is the sum of the arrays' sizes (FLARE's framing is
    not counted). Site and server compute it alike, so equal hashes mean equal payloads.
    """
    h = hashlib.sha256(b"ultrafedfm-payload/v1")
    total = 0
    for name in sorted(params or {}):
        array = _as_array(params[name])
        header = json.dumps([name, array.dtype.str, list(array.shape)], separators=(",", ":")).encode()
        h.update(len(header).to_bytes(8, "little") + header + array.nbytes.to_bytes(8, "little"))
        h.update(array.reshape(-1).view(np.uint8).data)  # no copy: a masked vector can be hundreds of MB
        total += array.nbytes
    return h.hexdigest(), total


def classify_payload(task: str, params: Mapping[str, Any] | None, meta: Mapping[str, Any] | None = None) -> Form:
    """The form of a reply: ``failure`` (an error or a refusal), ``masked`` (a training reply that is one
    secure-aggregation message), ``clear`` (any other training reply: a plain delta) or ``protocol``."""
    meta = meta or {}
    if meta.get("error") or meta.get("refused"):
        return "failure"
    if task != TRAIN_TASK:
        return "protocol"
    names = list(params or {})
    if names and all(n == SECAGG_PARAMS_KEY or n.startswith(SECAGG_PARAMS_KEY + "/") for n in names):
        return "masked"
    return "clear"


def _clear_fields(meta: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None) -> tuple[str, ...]:
    """Names (never values) of what travelled beside the payload."""
    return tuple(sorted([f"meta.{k}" for k in (meta or {})] + [f"metrics.{k}" for k in (metrics or {})]))


@dataclass(frozen=True)
class PayloadRecord:
    """One message, as one side logged it.

    Args:
        seq: position in the log, from 1. time: UTC, ISO 8601.
        direction: ``outgoing`` (a site's log) or ``received`` (the server's).
        site: the sending site. job_id: the transport's job id. task / round: the task and round (0-based).
        bytes / sha256: :func:`payload_digest` of the message's arrays.
        form: ``masked``, ``protocol``, ``clear`` or ``failure`` (:func:`classify_payload`).
        clear_fields: names of values that travelled beside the payload (``meta.*``, ``metrics.*``).
        chain: SHA-256 over the previous record's chain and this record's other fields.
    """

    seq: int
    time: str
    direction: Literal["outgoing", "received"]
    site: str
    job_id: str
    task: str
    round: int
    bytes: int
    sha256: str
    form: Form
    clear_fields: tuple[str, ...] = ()
    chain: str = ""

    @property
    def masked(self) -> bool:
        return self.form == "masked"

    @property
    def key(self) -> tuple[str, str, str, int]:
        """What identifies one message on both sides: (job id, site, task, round)."""
        return (self.job_id, self.site, self.task, self.round)

    def body(self) -> dict[str, Any]:
        """Every field but ``chain``, JSON-ready (what the chain hashes)."""
        data = asdict(self)
        data.pop("chain")
        data["clear_fields"] = list(self.clear_fields)
        return data

    def to_json(self) -> dict[str, Any]:
        return {**self.body(), "chain": self.chain, "masked": self.masked}


def chain_hash(previous: str, record: PayloadRecord) -> str:
    body = json.dumps(record.body(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(previous.encode("ascii") + body.encode("utf-8")).hexdigest()


def _parse(data: Mapping[str, Any]) -> PayloadRecord:
    names = {f.name for f in fields(PayloadRecord)}
    values = {k: v for k, v in data.items() if k in names}
    values["clear_fields"] = tuple(values.get("clear_fields") or ())
    record = PayloadRecord(**values)
    if record.form not in FORMS or not isinstance(record.seq, int) or not isinstance(record.round, int):
        raise ValueError(f"not a payload record: form {record.form!r}, seq {record.seq!r}")
    return record


@dataclass
class PayloadLogContents:
    """A payload log as read: its records, and the line numbers that could not be read (torn or edited)."""

    records: list[PayloadRecord] = field(default_factory=list)
    unreadable_lines: list[int] = field(default_factory=list)


def read_payload_log(path: str | Path) -> PayloadLogContents:
    """Every record of the log at ``path`` (missing file: none), oldest first."""
    path = Path(path)
    contents = PayloadLogContents()
    if not path.is_file():
        return contents
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            contents.records.append(_parse(json.loads(line)))
        except (ValueError, TypeError, KeyError):
            _logger.warning("%s line %d: unreadable payload record (torn by a crash, or edited); skipped", path, number)
            contents.unreadable_lines.append(number)
    return contents


def verify_chain(records: list[PayloadRecord]) -> list[str]:
    """Why the records do not form one unbroken chain (empty: intact). Each problem names the record."""
    problems = []
    previous = GENESIS
    for position, record in enumerate(records, start=1):
        if record.seq != position:
            problems.append(f"record {position} is numbered {record.seq} (records removed, added or reordered)")
        expected = chain_hash(previous, record)
        if record.chain != expected:
            problems.append(f"record {record.seq} ({record.task}, round {record.round + 1}) does not match the chain: "
                            "it, or a record before it, was edited")
            break  # every later record would be reported too
        previous = record.chain
    return problems


class PayloadLog:
    """One append-only, chained payload log (a site's outgoing or the server's received messages).

    Args:
        path: the log file (created with its folder, mode 0600).
        direction: ``outgoing`` or ``received``.
    """

    def __init__(self, path: str | Path, *, direction: Literal["outgoing", "received"]):
        self.path = Path(path)
        self.direction = direction

    def append(self, *, site: str, job_id: str, task: str, round_index: int, params: Mapping[str, Any] | None,
               form: Form | None = None, meta: Mapping[str, Any] | None = None,
               metrics: Mapping[str, Any] | None = None) -> PayloadRecord:
        """Hash ``params`` and append the record durably; ``form`` default: :func:`classify_payload`."""
        sha256, size = payload_digest(params)
        form = form or classify_payload(task, params, meta)
        if form not in FORMS:
            raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
        with self._locked():
            last = _last_record(self.path)
            record = PayloadRecord(
                seq=(last.seq + 1) if last else 1, time=datetime.now(timezone.utc).isoformat(timespec="milliseconds"),
                direction=self.direction, site=site, job_id=str(job_id), task=task, round=int(round_index),
                bytes=size, sha256=sha256, form=form, clear_fields=_clear_fields(meta, metrics))
            record = replace(record, chain=chain_hash(last.chain if last else GENESIS, record))
            append_line(self.path, json.dumps(record.to_json(), sort_keys=True))
            os.chmod(self.path, 0o600)
        return record

    def read(self) -> PayloadLogContents:
        return read_payload_log(self.path)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)  # released by close, also when the process dies
            yield
        finally:
            os.close(fd)


def _last_record(path: Path) -> PayloadRecord | None:
    """The last readable record (a torn last line is skipped: the chain continues from the record before it)."""
    if not path.is_file():
        return None
    with path.open("rb") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(max(0, size - 65536))
        tail = f.read().decode("utf-8", errors="replace").splitlines()
    for line in reversed(tail):
        try:
            return _parse(json.loads(line))
        except (ValueError, TypeError, KeyError):
            continue
    if size > 65536:  # no readable line in the tail: fall back to the whole file
        records = read_payload_log(path).records
        return records[-1] if records else None
    return None


def record_outgoing(cache: str | Path, *, site: str, job_id: str, task: str, round_index: int,
                    params: Mapping[str, Any] | None, meta: Mapping[str, Any] | None = None,
                    metrics: Mapping[str, Any] | None = None, form: Form | None = None) -> PayloadRecord:
    """At a site, after a reply is built and before it is sent: log it in ``<cache>/privacy/``."""
    return PayloadLog(outgoing_log_path(cache), direction="outgoing").append(
        site=site, job_id=job_id, task=task, round_index=round_index, params=params, form=form, meta=meta,
        metrics=metrics)


def record_received(run_dir: str | Path, *, site: str, job_id: str, task: str, round_index: int,
                    params: Mapping[str, Any] | None, metrics: Mapping[str, Any] | None = None,
                    form: Form | None = None, meta: Mapping[str, Any] | None = None) -> PayloadRecord:
    """At the server, for each reply as it arrives (before it is used): log it in the run's folder.

    Pass ``meta`` only to recognise a failure reply (its keys are not recorded: the transport adds its own).
    """
    form = form or classify_payload(task, params, meta)
    return PayloadLog(received_log_path(run_dir), direction="received").append(
        site=site, job_id=job_id, task=task, round_index=round_index, params=params, form=form, metrics=metrics)
