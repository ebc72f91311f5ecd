"""Atomic writes leave the old file or the new one; seeds differ for different parts."""
from __future__ import annotations

import os

import pytest
import torch

from ultrafedfm.fileio import append_line, atomic_torch_save, atomic_write_bytes, atomic_write_json
from ultrafedfm.seeds import mix_seed


def test_atomic_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "state.json"
    atomic_write_json(target, {"round": 1})
    atomic_write_json(target, {"round": 2})
    assert target.read_text() == '{\n  "round": 2\n}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path, monkeypatch):
    target = tmp_path / "ledger.json"
    atomic_write_bytes(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ledger.json"]


def test_atomic_write_sets_the_requested_mode(tmp_path):
    path = atomic_write_bytes(tmp_path / "salt", b"x", mode=0o600)
    assert path.stat().st_mode & 0o777 == 0o600


def test_atomic_torch_save_round_trips(tmp_path):
    path = atomic_torch_save({"w": torch.arange(3)}, tmp_path / "m.pt")
    assert torch.equal(torch.load(path, weights_only=True)["w"], torch.arange(3))


def test_append_line_appends_one_line_per_call(tmp_path):
    log = tmp_path / "log.jsonl"
    append_line(log, "a")
    append_line(log, "b\n")
    assert log.read_text() == "a\nb\n"


def test_mix_seed_is_stable_and_separates_parts():
    assert mix_seed(1, "site-1", 2) == mix_seed(1, "site-1", 2)
    seeds = {mix_seed(1, "site-1", 2), mix_seed(1, "site-12"), mix_seed(12, "site-1"), mix_seed(1, 2, "site-1"),
             mix_seed("1", "site-1", 2)}
    assert len(seeds) == 5
    assert 0 <= mix_seed(3, bits=31) < 2**31
    with pytest.raises(TypeError):
        mix_seed(1.5)


def test_append_line_after_a_torn_line_starts_a_fresh_line(tmp_path):
    log = tmp_path / "log.jsonl"
    log.write_text('{"a": 1}\n{"b": ')  # a crash mid-append
    append_line(log, '{"c": 3}')
    assert log.read_text().splitlines() == ['{"a": 1}', '{"b": ', '{"c": 3}']
