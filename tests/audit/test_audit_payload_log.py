"""The payload logs: the digest as documented, a chain that an edit breaks, torn lines, forms, matching."""
from __future__ import annotations

import hashlib
import json
import multiprocessing
from pathlib import Path

import numpy as np
import pytest

from ultrafedfm.federation.site_figures import site_figures_path
from ultrafedfm.federation.wire import SECAGG_KEY
from ultrafedfm.privacy.audit.matching import match_payloads
from ultrafedfm.privacy.audit.payloads import (
    SECAGG_PARAMS_KEY, PayloadLog, classify_payload, outgoing_log_path, payload_digest, read_payload_log,
    record_outgoing, record_received, received_log_path, verify_chain,
)
from ultrafedfm.privacy.audit.site_report import site_figures_file


def _digest_by_the_doc(params: dict) -> tuple[str, int]:
    """The digest as payload_digest's docstring specifies it, written out independently."""
    h = hashlib.sha256(b"ultrafedfm-payload/v1")
    size = 0
    for name in sorted(params):
        a = np.ascontiguousarray(params[name])
        header = json.dumps([name, a.dtype.str, list(a.shape)], separators=(",", ":")).encode()
        h.update(len(header).to_bytes(8, "little") + header + a.nbytes.to_bytes(8, "little") + a.tobytes())
        size += a.nbytes
    return h.hexdigest(), size


def test_the_payload_digest_is_the_documented_hash_and_sees_dtype_shape_and_every_byte():
    rng = np.random.default_rng(0)
    params = {"b": rng.normal(size=(3, 4)).astype(np.float32), "a": np.arange(7, dtype=np.uint8)}
    assert payload_digest(params) == _digest_by_the_doc(params)
    digest, size = payload_digest(params)
    assert size == 3 * 4 * 4 + 7
    flipped = {**params, "a": params["a"].copy()}
    flipped["a"][3] ^= 1
    assert payload_digest(flipped)[0] != digest
    assert payload_digest({**params, "a": params["a"].astype(np.int8)})[0] != digest
    assert payload_digest({**params, "b": params["b"].reshape(4, 3)})[0] != digest
    assert payload_digest({"c" if k == "a" else k: v for k, v in params.items()})[0] != digest


def test_the_audit_reads_the_files_and_keys_the_federation_writes():
    assert SECAGG_PARAMS_KEY == SECAGG_KEY
    assert site_figures_file(Path("/c")) == site_figures_path(Path("/c"))


def test_forms_of_replies():
    masked = {SECAGG_KEY: np.zeros(9, np.uint8)}
    assert classify_payload("train", masked) == "masked"
    assert classify_payload("train", {"w": np.zeros(3, np.float32)}) == "clear"
    assert classify_payload("train", {**masked, "w": np.zeros(3)}) == "clear"  # anything beside the mask
    assert classify_payload("secagg_share_keys", masked) == "protocol"
    assert classify_payload("train", None, {"refused": "policy says no"}) == "failure"


def _append(log: PayloadLog, n: int, start: int = 0) -> None:
    for i in range(start, start + n):
        log.append(site="site-1", job_id="job", task="train", round_index=i, params={"w": np.full(4, i, np.float32)})


def test_an_intact_log_verifies_and_an_edited_record_breaks_the_chain(tmp_path):
    log = PayloadLog(tmp_path / "out.jsonl", direction="outgoing")
    _append(log, 4)
    records = log.read().records
    assert [r.seq for r in records] == [1, 2, 3, 4] and verify_chain(records) == []
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 == 0o600
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    edited = json.loads(lines[1])
    edited["sha256"] = "0" * 64
    (tmp_path / "out.jsonl").write_text("\n".join([lines[0], json.dumps(edited), *lines[2:]]) + "\n")
    problems = verify_chain(read_payload_log(tmp_path / "out.jsonl").records)
    assert problems and "record 2" in problems[0]
    (tmp_path / "out.jsonl").write_text("\n".join([lines[0], *lines[2:]]) + "\n")  # one record removed
    assert verify_chain(read_payload_log(tmp_path / "out.jsonl").records)


def test_a_torn_line_is_skipped_and_the_chain_continues_past_it(tmp_path):
    path = tmp_path / "out.jsonl"
    log = PayloadLog(path, direction="outgoing")
    _append(log, 2)
    with path.open("a") as f:
        f.write('{"seq": 3, "time": "2026')  # a crash mid-append
    _append(log, 2, start=2)
    contents = read_payload_log(path)
    assert contents.unreadable_lines == [3]
    assert [r.seq for r in contents.records] == [1, 2, 3, 4] and verify_chain(contents.records) == []


def _append_many(path: str, site: str) -> None:
    log = PayloadLog(path, direction="outgoing")
    for i in range(15):
        log.append(site=site, job_id="job", task="train", round_index=i, params={"w": np.zeros(2, np.float32)})


def test_two_processes_appending_at_once_keep_one_unbroken_chain(tmp_path):
    path = str(tmp_path / "out.jsonl")
    ctx = multiprocessing.get_context("spawn")
    workers = [ctx.Process(target=_append_many, args=(path, s)) for s in ("site-a", "site-b")]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=120)
        assert w.exitcode == 0
    records = read_payload_log(path).records
    assert len(records) == 30 and verify_chain(records) == []


def test_site_and_server_logs_match_message_by_message(tmp_path):
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    params = {SECAGG_KEY: np.arange(20, dtype=np.uint8)}
    for task in ("secagg_advertise_keys", "train"):
        record_outgoing(cache, site="site-1", job_id="j", task=task, round_index=0, params=params)
    record_received(run_dir, site="site-1", job_id="j", task="secagg_advertise_keys", round_index=0, params=params)
    record_received(run_dir, site="site-1", job_id="j", task="train", round_index=0,
                    params={SECAGG_KEY: np.arange(1, 21, dtype=np.uint8)})  # altered on the way
    record_received(run_dir, site="site-1", job_id="j", task="secagg_unmask", round_index=0, params=params)
    sent = read_payload_log(outgoing_log_path(cache)).records
    received = read_payload_log(received_log_path(run_dir)).records
    states = sorted((m.record.task, m.state) for m in match_payloads(sent, received))
    assert states == [("secagg_advertise_keys", "matched"), ("secagg_unmask", "not_sent_by_site"),
                      ("train", "hash_mismatch")]
    assert {m.state for m in match_payloads(sent, None)} == {"unverified"}
    assert [m.state for m in match_payloads(sent, [])] == ["not_received", "not_received"]


def test_the_log_records_names_of_values_beside_the_payload_never_the_values(tmp_path):
    record = record_outgoing(tmp_path, site="site-1", job_id="j", task="train", round_index=0,
                             params={"w": np.zeros(2, np.float32)}, meta={"num_samples": 4321},
                             metrics={"loss": 0.123456})
    assert record.form == "clear" and record.clear_fields == ("meta.num_samples", "metrics.loss")
    text = outgoing_log_path(tmp_path).read_text()
    assert "4321" not in text and "0.123456" not in text


@pytest.mark.parametrize("bad", ["seq", "form"])
def test_a_record_with_a_wrong_type_is_unreadable_not_trusted(tmp_path, bad):
    log = PayloadLog(tmp_path / "out.jsonl", direction="outgoing")
    _append(log, 1)
    data = json.loads((tmp_path / "out.jsonl").read_text())
    data[bad] = "x" if bad == "seq" else "sideways"
    (tmp_path / "out.jsonl").write_text(json.dumps(data) + "\n")
    assert read_payload_log(tmp_path / "out.jsonl").unreadable_lines == [1]


def test_logging_a_payload_imports_neither_torch_nor_the_report_renderers():
    import subprocess
    import sys

    code = ("import sys, numpy as np; from ultrafedfm.privacy.audit import record_outgoing, record_received; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'jinja2', 'nvflare') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip() == "[]"
