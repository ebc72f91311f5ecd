"""Federated fine-tuning in the FLARE simulator, with secure aggregation (and DP-SGD): the committed jobs' shape, tiny."""
from __future__ import annotations

import dataclasses

import pytest

from flare_helpers import make_cache, secure_site, simulate
from ultrafedfm.downstream.synthetic import write_labelled_folder
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.federation.model_io import FINETUNED_FOLDER
from ultrafedfm.models.downstream.spec import load_downstream
from ultrafedfm.models.export import save_encoder
from ultrafedfm.models.mae import build_mae
from ultrafedfm.privacy.dp import read_ledger, site_ledger_path


@pytest.mark.slow
@pytest.mark.parametrize("job", ["finetune_cls", "finetune_seg", "finetune_seg_dp"])
def test_a_committed_fine_tuning_job_shrunk_to_tiny_runs_secure_rounds_from_a_pretrained_encoder(tmp_path, job):
    encoder = save_encoder(build_mae("tiny", img_size=32), tmp_path / "encoder.safetensors")
    spec = dataclasses.replace(JOB_SPECS[job], preset="tiny", img_size=32, num_rounds=2, warmup_rounds=0,
                               batch_size=8, base_lr=5e-3, round_timeout_s=300, secagg_phase_timeout_s=60,
                               secagg_max_weight=100.0, run_name=job, run_state_dir=str(tmp_path / "run"),
                               init_encoder=str(encoder))
    assert spec.secure_aggregation and spec.min_sites == 3  # the committed job's switches, unchanged
    dp = spec.dp.enabled
    assert dp == job.endswith("_dp") and (not dp or spec.dp.target_epsilon == 8.0)
    configs = {}
    for i, name in enumerate(["site-1", "site-2", "site-3"]):
        folder = write_labelled_folder(tmp_path / "labelled" / name, n=20, seed=50 + i, frame=(64, 96))
        configs[name] = secure_site(make_cache(tmp_path / "caches" / name, n_images=2), labelled=str(folder),
                                    privacy={"require_dp": dp})
    result, state = simulate(tmp_path, spec, configs, timeout_s=600)
    rows = state.read_rounds()
    assert [r["round"] for r in rows] == [0, 1], result.server_log.read_text()[-3000:]
    assert all(r["applied"] and r["participants"] == ["site-1", "site-2", "site-3"] for r in rows), rows
    assert all(r["total_images"] and r["total_images"] < 60 for r in rows)  # training splits only
    model, loaded = load_downstream(state.dir / FINETUNED_FOLDER)
    assert loaded.task == JOB_SPECS[job].finetune.task and loaded.dp_compatible == dp
    for name in configs:  # DP: every site charged both rounds to its own ledger, within the job's epsilon 8
        charges = read_ledger(site_ledger_path(tmp_path / "caches" / name)).charges()
        assert [c.round for c in charges] == ([0, 1] if dp else [])
        assert all(0 < c.epsilon_job <= 8.0 + 1e-6 for c in charges)
    assert "epsilon" not in (state.dir / "rounds.jsonl").read_text()  # the server holds no site's figure
