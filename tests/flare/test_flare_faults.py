"""Faults in the FLARE simulator: a failing site, a killed site process, too few sites, and the
whole simulator (server and sites) killed mid-job, whose resubmitted job continues the run.

Killing only the server process, restarting it from its kit and resubmitting is the end-to-end
test's (``tests/e2e/test_e2e_deployment.py``): the simulator has no kit to restart from.
Each run asserts ``left_running == []``: nothing was still running when the simulator had shut
down by itself (recorded before the helper ends leftovers)."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from flare_helpers import make_cache, simulate, site, site_trainer_pids, tiny_spec
from ultrafedfm.federation.model_io import model_params
from ultrafedfm.flare.deploy.simulation import workspace_processes

pytestmark = pytest.mark.slow


def test_a_site_whose_training_raises_is_reported_and_the_round_completes(tmp_path):
    good = {n: make_cache(tmp_path / n, n_images=8, seed=i) for i, n in enumerate(["site-1", "site-2"])}
    broken = tmp_path / "no-such-cache"  # a real mistake: site.yaml points at a missing cache
    spec = tiny_spec(tmp_path, num_rounds=2, min_sites=2)
    configs = {n: site(c) for n, c in good.items()} | {"site-3": site(broken)}
    result, state = simulate(tmp_path, spec, configs)
    assert result.left_running == []
    rows = state.read_rounds()
    assert len(rows) == 2, result.server_log
    for row in rows:
        assert row["applied"] and row["participants"] == ["site-1", "site-2"]
        assert "CacheNotFoundError" in row["failed"]["site-3"]
        assert str(broken) not in row["failed"]["site-3"]  # no path leaves the site
    server_log = result.server_log.read_text()
    assert "site site-3 failed" in server_log


def test_fewer_than_min_sites_ends_the_round_without_updating_the_model(tmp_path):
    cache = make_cache(tmp_path / "c1", n_images=8, seed=1)
    spec = tiny_spec(tmp_path, num_rounds=1, warmup_rounds=0, min_sites=2)
    result, state = simulate(tmp_path, spec, {"site-1": site(cache), "site-2": site(tmp_path / "missing")})
    rows = state.read_rounds()
    assert len(rows) == 1 and not rows[0]["applied"], result.server_log
    assert "CacheNotFoundError" in rows[0]["failed"]["site-2"]  # site-2 got the task and tried
    assert "fewer than min_sites=2" in rows[0]["message"]
    assert "fewer than min_sites=2" in result.server_log.read_text()
    initial = model_params(spec.training_contract().initial_model())
    final = state.load().params
    assert all(np.array_equal(final[k], initial[k]) for k in initial)
    assert not state.best_model_path.exists()


def test_a_site_process_killed_mid_round_is_reported_and_the_others_go_on(tmp_path):
    caches = {n: make_cache(tmp_path / n, n_images=8, seed=i) for i, n in enumerate(["site-1", "site-2"])}
    # Enough steps that the kill (1 s into round 2) lands while site-2 still trains, even on an
    # idle machine where 150 steps could finish first.
    spec = tiny_spec(tmp_path, num_rounds=2, min_sites=1, local_epochs=None, local_steps=600)
    state_rounds = Path(spec.run_state_dir) / "test" / "rounds.jsonl"
    workspace = tmp_path / "ws"
    killed: list[int] = []

    def kill_site_2_in_round_2() -> None:
        if killed or not state_rounds.is_file() or not state_rounds.read_text().strip():
            return
        time.sleep(1.0)
        for pid in site_trainer_pids(workspace, "site-2"):
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    result, state = simulate(tmp_path, spec, {n: site(c) for n, c in caches.items()}, poll=kill_site_2_in_round_2)
    assert killed, "the site-2 training process was not found"
    assert result.left_running == []
    rows = state.read_rounds()
    assert [r["round"] for r in rows] == [0, 1], result.server_log
    assert rows[0]["participants"] == ["site-1", "site-2"]
    assert rows[1]["participants"] == ["site-1"] and rows[1]["applied"]
    assert "EXECUTION_EXCEPTION" in rows[1]["failed"]["site-2"]


def test_the_whole_simulator_killed_mid_job_loses_no_round_when_the_job_is_resubmitted(tmp_path):
    caches = {n: make_cache(tmp_path / n, n_images=8, seed=i) for i, n in enumerate(["site-1", "site-2"])}
    spec = tiny_spec(tmp_path, num_rounds=3, min_sites=2, local_epochs=None, local_steps=40)
    configs = {n: site(c) for n, c in caches.items()}
    rounds_file = Path(spec.run_state_dir) / "test" / "rounds.jsonl"

    def one_round_done() -> bool:
        return rounds_file.is_file() and len(rounds_file.read_text().splitlines()) >= 1

    first, state = simulate(tmp_path / "first", spec, configs, stop_when=one_round_done)
    assert first.returncode is None  # we killed its process group: server and site clients
    # The sites' training processes run in their own sessions, out of reach of that kill; the
    # helper ends them (left_running names them), and nothing survives it:
    assert workspace_processes(first.workspace) == []
    done = state.load().last_completed_round
    assert 0 <= done < 2
    params_at_kill = state.load().params

    second, state = simulate(tmp_path / "second", spec, configs)  # the job resubmitted
    assert second.left_running == []
    log = second.server_log.read_text()
    assert f"continuing with round {done + 2}/3" in log
    rows = state.read_rounds()
    assert [r["round"] for r in rows] == [0, 1, 2]  # each round exactly once
    assert all(r["applied"] for r in rows)
    final = state.load()
    assert final.last_completed_round == 2 and len(final.history) == 3
    assert any(not np.array_equal(final.params[k], params_at_kill[k]) for k in params_at_kill)
