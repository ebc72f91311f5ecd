"""Secure aggregation inside the FLARE jobs, in the real simulator with real cryptography.

The sites sign with their own keys, enrolled in a member list signed by a throwaway admin key
(``prepare_workspace``); each keeps its pins, contribution ledger and round figures on its own
disk; the server holds only sums of masked vectors. Each test judges by what the server saved,
logged and received, and by what each site recorded.
"""
from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flare_helpers import make_cache, secure_site, simulate, site, site_trainer_pids, tiny_spec
from ultrafedfm.federation.fedavg import apply_delta, weighted_mean_delta
from ultrafedfm.federation.model_io import model_params
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.federation.site_training import SiteTrainer
from ultrafedfm.federation.wire import SECAGG_KEY
from ultrafedfm.flare.deploy.simulation import workspace_processes
from ultrafedfm.flare.server.reply_record import read_reply_records
from ultrafedfm.site_config import SiteConfig
from ultrafedfm.train.schedule import round_learning_rate

pytestmark = pytest.mark.slow


# Headers FLARE 2.9 itself puts on a task result (routing, audit, round numbers); none comes from our site code.
FLARE_HEADERS = {"__audit_event_id__", "__content_type__", "__cookie_jar__", "__msg_root_id__", "__peer_ctx__",
                 "__peer_props__", "__task_id__", "__task_name__", "current_round", "fl_client", "start_round"}


def secure_spec(tmp: Path, **changes):
    base = dict(num_rounds=1, warmup_rounds=0, min_sites=3, base_lr=0.1, secure_aggregation=True, secagg_max_weight=1000.0,
                secagg_phase_timeout_s=30, task_request_interval_s=0.1)
    return tiny_spec(tmp, **{**base, **changes})


def own_figures(caches: dict[str, Path]) -> dict:
    """What each site recorded on its own disk for round 1 (never sent)."""
    out = {}
    for name, cache in caches.items():
        [figures] = [f for f in read_site_figures(site_figures_path(cache)) if f.round == 0]
        out[name] = figures
    return out


def hand_deltas(spec, caches: dict[str, Path], params: dict, seeds: dict[str, int]) -> dict[str, dict[str, np.ndarray]]:
    """Each site's round-1 delta recomputed outside FLARE from the training seed the site recorded
    (with secure aggregation it mixes in fresh entropy; training is deterministic given it)."""
    torch.set_num_threads(1)
    lr = round_learning_rate(0, base_lr=spec.base_lr, batch_size=spec.batch_size, warmup_rounds=spec.warmup_rounds,
                             total_rounds=spec.num_rounds)
    out = {}
    for name, cache in caches.items():
        trainer = SiteTrainer(site_name=name, site_config=SiteConfig(cache=cache, num_workers=0, num_threads=1))
        update = trainer.train_round(global_params=params, contract=spec.training_contract(), lr=lr, round_index=0,
                                     generator_seed=seeds[name])
        out[name] = {k: v.numpy() for k, v in update.delta.items()}
    return out


def quantisation_bound(spec, num_sites: int, total_weight: float) -> float:
    """|secure mean - plaintext mean| per coordinate: n * 2^-f * max_weight / sum(w), twice for the weight slot."""
    cfg = spec.secagg_config()
    return 2 * num_sites * 2.0 ** -cfg.frac_bits * cfg.max_weight / total_weight


def max_abs_diff(a: dict, b: dict) -> float:
    return max(float(np.max(np.abs(np.asarray(a[k], np.float64) - np.asarray(b[k], np.float64)))) for k in b)


def float_chunks(delta: dict[str, np.ndarray], *, count: int = 12, length: int = 8) -> list[np.ndarray]:
    """Runs of ``length`` consecutive, clearly non-zero float32 values of the delta (recognisable fingerprints)."""
    chunks = []
    for name in sorted(delta):
        flat = np.asarray(delta[name], dtype=np.float32).reshape(-1)
        for start in range(0, flat.size - length, max(flat.size // 3, length)):
            piece = flat[start:start + length]
            if np.all(np.abs(piece) > 1e-7):
                chunks.append(piece.copy())
        if len(chunks) >= count:
            break
    return chunks


def file_contains_chunk(data: bytes, chunk: np.ndarray, rtol: float = 1e-3) -> bool:
    """Whether ``data`` holds ``chunk`` as float32 (at any 4-byte alignment), allowing tiny float differences."""
    with np.errstate(invalid="ignore", over="ignore"):  # arbitrary bytes read as floats hold NaN and inf
        return any(_contains_at(data, chunk, rtol, offset) for offset in range(4))


def _contains_at(data: bytes, chunk: np.ndarray, rtol: float, offset: int) -> bool:
    usable = (len(data) - offset) // 4
    if usable < len(chunk):
        return False
    values = np.frombuffer(data, dtype=np.float32, count=usable, offset=offset)
    tol = np.abs(chunk) * rtol
    first = np.flatnonzero(np.abs(values[: usable - len(chunk) + 1] - chunk[0]) <= tol[0])
    return any(np.all(np.abs(values[i:i + len(chunk)] - chunk) <= tol) for i in first)


def server_side_files(result, spec) -> list[Path]:
    roots = [result.workspace / "server", result.workspace / "startup", result.workspace / "local",
             Path(spec.run_state_dir)]
    return [p for root in roots for p in root.rglob("*") if p.is_file()]


def test_a_secure_round_equals_fedavg_and_the_server_receives_and_keeps_nothing_of_one_site_in_the_clear(tmp_path):
    sizes = {"site-1": 8, "site-2": 16, "site-3": 24}
    caches = {n: make_cache(tmp_path / n, n_images=k, seed=i, brightness=0.25 + 0.25 * i)
              for i, (n, k) in enumerate(sizes.items())}
    spec = secure_spec(tmp_path)
    replies_file = tmp_path / "replies.jsonl"
    result, state = simulate(tmp_path, spec, {n: secure_site(c) for n, c in caches.items()},
                             record_replies=replies_file)
    assert result.left_running == []
    rows = state.read_rounds()
    assert len(rows) == 1 and rows[0]["applied"], result.server_log.read_text()[-3000:]
    assert rows[0]["participants"] == sorted(sizes) and rows[0]["failed"] == {}
    server_log = result.server_log.read_text()
    assert "securely aggregated 3 sites (sum of weights 48.0, 48 images" in server_log

    # (a) what each site sent, as the server received it (a FLARE result filter ahead of our
    # controller): in every task, the one protocol message and nothing of the site's own.
    replies = read_reply_records(replies_file)
    tasks = {"secagg_advertise_keys", "secagg_share_keys", "train", "secagg_consistency_check", "secagg_unmask"}
    assert {(r["task"], r["site"]) for r in replies} == {(t, n) for t in tasks for n in sizes}, replies
    for reply in replies:
        assert reply["return_code"] == "OK" and reply["data_kind"] == "WEIGHT_DIFF", reply
        assert list(reply["params"]) == [SECAGG_KEY] and reply["params"][SECAGG_KEY].startswith("uint8["), reply
        assert reply["meta"] == {}, reply  # no loss, image count, steps or time beside the mask
        assert reply["top_level"] == ["DXO"], reply
        assert set(reply["headers"]) <= FLARE_HEADERS, reply  # the transport's own, set by FLARE

    # (b) the round's statistics are the aggregates the sum decodes to, nothing per site
    own = own_figures(caches)
    assert set(rows[0]) & {"loss", "num_samples", "train_seconds"} == set()
    assert rows[0]["total_images"] == 48 and rows[0]["total_steps"] == sum(f.steps for f in own.values())
    weighted = sum(f.loss * f.num_samples for f in own.values()) / 48
    assert abs(rows[0]["global_loss"] - weighted) < 1e-4

    # (c) the unmasked mean equals plaintext weighted FedAvg within the quantisation bound
    initial = model_params(spec.training_contract().initial_model())
    deltas = hand_deltas(spec, caches, initial, {n: f.generator_seed for n, f in own.items()})
    expected = apply_delta(initial, weighted_mean_delta([deltas[n] for n in sizes], weights=list(sizes.values())))
    final = state.load().params
    bound = quantisation_bound(spec, 3, sum(sizes.values()))
    error = max_abs_diff(final, expected)
    assert error <= bound + 2e-5, (error, bound)
    unweighted = apply_delta(initial, weighted_mean_delta(list(deltas.values()), weights=[1, 1, 1]))
    gap = max_abs_diff(unweighted, expected)
    assert gap > 5 * (bound + 2e-5), (gap, error, bound)  # the check tells weighted from unweighted

    # (d) nothing the server stores or logs holds a recognisable piece of one site's delta
    files = server_side_files(result, spec)
    assert any(p.name == "global_model.pt" for p in files)
    global_chunk = float_chunks({k: v for k, v in final.items() if "decoder" in k}, count=1)[0]
    assert file_contains_chunk(state.global_model_path.read_bytes(), global_chunk)  # the scan finds what is there
    for name, delta in deltas.items():
        chunks = float_chunks(delta)
        assert len(chunks) >= 10
        for path in files:
            data = path.read_bytes()
            leaked = [i for i, chunk in enumerate(chunks) if file_contains_chunk(data, chunk)]
            assert not leaked, f"{path} holds pieces of {name}'s delta"


def test_a_site_dying_after_its_masked_input_is_recovered_by_the_others(tmp_path):
    # site-4 has few images, so it masks and sends long before the others finish training;
    # we kill its process as soon as it logs that its masked input was sent.
    sizes = {"site-1": 96, "site-2": 96, "site-3": 96, "site-4": 8}
    caches = {n: make_cache(tmp_path / n, n_images=k, seed=i) for i, (n, k) in enumerate(sizes.items())}
    spec = secure_spec(tmp_path, local_epochs=2, secagg_phase_timeout_s=20)
    workspace, sim_log = tmp_path / "ws", tmp_path / "ws.simulator.log"
    killed: list[int] = []
    done = threading.Event()

    def kill_site_4_after_its_masked_input() -> None:
        while not done.is_set():
            text = sim_log.read_text(errors="replace") if sim_log.is_file() else ""
            if "site-4: round 1: masked input sent" in text:
                for pid in site_trainer_pids(workspace, "site-4"):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_site_4_after_its_masked_input, daemon=True)
    watcher.start()
    try:
        result, state = simulate(tmp_path, spec, {n: secure_site(c) for n, c in caches.items()})
    finally:
        done.set()
        watcher.join()
    assert killed, "site-4's process was not found after its masked input"
    assert result.left_running == []
    rows = state.read_rounds()
    assert len(rows) == 1 and rows[0]["applied"], result.server_log.read_text()[-3000:]
    row = rows[0]
    # site-4's masked input is in the sum; it dropped in the consistency check (or the unmask).
    assert row["participants"] == sorted(sizes) and row["total_images"] == sum(sizes.values())
    assert row["failed"]["site-4"].startswith(("secagg_consistency_check", "secagg_unmask")), row["failed"]
    assert set(row["failed"]) == {"site-4"}

    initial = model_params(spec.training_contract().initial_model())
    deltas = hand_deltas(spec, caches, initial, {n: f.generator_seed for n, f in own_figures(caches).items()})
    expected = apply_delta(initial, weighted_mean_delta([deltas[n] for n in sizes], weights=list(sizes.values())))
    assert max_abs_diff(state.load().params, expected) <= quantisation_bound(spec, 4, sum(sizes.values())) + 2e-5


def test_too_few_masked_inputs_abort_the_round_and_leave_the_model_unchanged(tmp_path):
    caches = {n: make_cache(tmp_path / n, n_images=8, seed=i) for i, n in enumerate(["site-1", "site-2"])}
    spec = secure_spec(tmp_path)
    configs = {n: secure_site(c) for n, c in caches.items()} | {"site-3": secure_site(tmp_path / "missing")}
    result, state = simulate(tmp_path, spec, configs)
    assert result.left_running == []
    rows = state.read_rounds()
    assert len(rows) == 1 and not rows[0]["applied"], result.server_log.read_text()[-3000:]
    assert "CacheNotFoundError" in rows[0]["failed"]["site-3"]
    assert "only 2 masked inputs arrived" in rows[0]["message"] and "unchanged" in rows[0]["message"]
    log = result.server_log.read_text()
    assert "only 2 masked inputs arrived" in log and "secagg_unmask" not in log  # nothing was unmasked
    initial = model_params(spec.training_contract().initial_model())
    final = state.load().params
    assert all(np.array_equal(final[k], initial[k]) for k in initial)


def test_a_site_requiring_secure_aggregation_refuses_a_plaintext_job(tmp_path):
    caches = {n: make_cache(tmp_path / n, n_images=8, seed=i) for i, n in enumerate(["site-1", "site-2"])}
    spec = tiny_spec(tmp_path, num_rounds=1, warmup_rounds=0, min_sites=1)  # secure_aggregation off
    configs = {"site-1": site(caches["site-1"]), "site-2": secure_site(caches["site-2"])}
    result, state = simulate(tmp_path, spec, configs)
    assert result.left_running == []
    row = state.read_rounds()[0]
    assert row["participants"] == ["site-1"]
    refusal = row["failed"]["site-2"]
    assert "refused by the site's policy" in refusal
    assert "privacy.require_secure_aggregation" in refusal and "job 'flare_test'" in refusal
    server_log = result.server_log.read_text()
    assert "site site-2 refused by the site's policy" in server_log and "ERROR" in server_log
    site_output = (tmp_path / "ws.simulator.log").read_text(errors="replace")
    assert "site 'site-2' refuses job 'flare_test'" in site_output
