"""FedAvg maths, the round schedule, JobSpec and site.yaml validation (no FLARE run)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from ultrafedfm.config import ConfigError
from ultrafedfm.federation.job_spec import JOB_SPECS, JobSpec
from ultrafedfm.site_config import find_site_config, load_site_config
from ultrafedfm.federation.fedavg import apply_delta, weighted_mean_delta
from ultrafedfm.train.schedule import round_learning_rate


def test_weighted_mean_matches_hand_computed_average():
    d1 = {"w": np.array([1.0, 2.0], dtype=np.float32), "b": np.array([0.0], dtype=np.float32)}
    d2 = {"w": np.array([4.0, -1.0], dtype=np.float32), "b": np.array([3.0], dtype=np.float32)}
    mean = weighted_mean_delta([d1, d2], weights=[10, 30])
    # (10 * d1 + 30 * d2) / 40, by hand
    np.testing.assert_allclose(mean["w"], [3.25, -0.25])
    np.testing.assert_allclose(mean["b"], [2.25])
    assert mean["w"].dtype == np.float32


def test_weighted_mean_rejects_mismatched_inputs():
    d = {"w": np.zeros(2, dtype=np.float32)}
    with pytest.raises(ValueError, match="one weight per delta"):
        weighted_mean_delta([d, d], weights=[1])
    with pytest.raises(ValueError, match="positive"):
        weighted_mean_delta([d], weights=[0])
    with pytest.raises(ValueError, match="different parameter names"):
        weighted_mean_delta([d, {"v": np.zeros(2)}], weights=[1, 1])


def test_apply_delta_adds_and_refuses_unknown_names():
    params = {"w": np.ones(3, dtype=np.float32)}
    out = apply_delta(params, {"w": np.full(3, 0.5, dtype=np.float32)})
    np.testing.assert_allclose(out["w"], 1.5)
    assert params["w"][0] == 1.0  # the input is not modified
    with pytest.raises(ValueError, match="lacks"):
        apply_delta(params, {"x": np.ones(1)})


def test_round_schedule_warms_up_then_decays_like_the_reference():
    spec = JOB_SPECS["mae_pretrain"]
    kw = dict(base_lr=spec.base_lr, batch_size=spec.batch_size, warmup_rounds=spec.warmup_rounds,
              total_rounds=spec.num_rounds)
    peak = 1.5e-4 * 64 / 256
    lrs = [round_learning_rate(r, **kw) for r in range(spec.num_rounds)]
    assert lrs[0] == pytest.approx(peak * 0.5 / 40)
    assert all(a < b for a, b in zip(lrs[:40], lrs[1:41]))  # warm-up rises
    assert max(lrs) == pytest.approx(peak, rel=1e-3)
    assert all(a >= b for a, b in zip(lrs[40:], lrs[41:]))  # cosine falls
    assert lrs[-1] < peak * 1e-3
    assert lrs[170] == pytest.approx(peak * 0.5 * (1 + math.cos(math.pi * 130.5 / 260)))
    with pytest.raises(ValueError):
        round_learning_rate(300, **kw)


def test_paper_job_spec_matches_the_paper_setup():
    spec = JOB_SPECS["mae_pretrain"]
    assert (spec.preset, spec.img_size, spec.num_rounds, spec.local_epochs) == ("base", 224, 300, 1)
    assert (spec.mask_ratio, spec.batch_size, spec.min_sites, spec.warmup_rounds) == (0.75, 64, 3, 40)
    assert spec.secure_aggregation is True  # on by default


@pytest.mark.parametrize(
    "changes, key",
    [
        ({"local_epochs": 1, "local_steps": 5}, "local_epochs"),
        ({"min_sites": 0}, "min_sites"),
        ({"secure_aggregation": True, "min_sites": 1}, "min_sites"),
        ({"secure_aggregation": True, "secagg_max_sites": 1}, "secagg_max_sites"),
        ({"secure_aggregation": True, "secagg_max_weight": 0.0}, "secagg_max_weight"),
        ({"mask_ratio": 1.0}, "mask_ratio"),
    ],
)
def test_job_spec_rejects_bad_knobs_naming_the_key(changes, key):
    with pytest.raises(ConfigError, match=key):
        JobSpec(name="x", **changes)


def test_site_config_per_site_map_and_relative_paths(tmp_path):
    (tmp_path / "local").mkdir()
    path = tmp_path / "local" / "site.yaml"
    path.write_text("sites:\n  site-1:\n    cache: c1\n    num_workers: 0\n  site-2:\n    cache: /abs/c2\n")
    one = load_site_config(path, site_name="site-1")
    assert one.cache == (tmp_path / "local" / "c1").resolve() and one.num_workers == 0
    assert str(load_site_config(path, site_name="site-2").cache) == "/abs/c2"
    with pytest.raises(ConfigError, match="site-9"):
        load_site_config(path, site_name="site-9")
    app_dir = tmp_path / "job-1" / "app_site-1"
    app_dir.mkdir(parents=True)
    assert find_site_config(app_dir) == path


def test_site_config_errors_name_file_and_key(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("cache: /data\ndevise: cpu\n")
    with pytest.raises(ConfigError, match=r"site.yaml.*devise"):
        load_site_config(path)
    path.write_text("sites:\n  site-1:\n    cache: /c\n    num_threads: 0\n")
    with pytest.raises(ConfigError, match=r"sites.site-1.num_threads"):
        load_site_config(path, site_name="site-1")
    with pytest.raises(ConfigError, match="no local/site.yaml"):
        find_site_config(tmp_path / "nowhere")


def test_the_site_template_loads_as_a_site_config():
    template = Path(__file__).resolve().parents[2] / "site_templates" / "site.yaml"
    config = load_site_config(template)
    assert config.privacy.require_secure_aggregation is True and config.privacy.min_sites == 3
    assert config.resources is not None and config.resources.min_free_disk_gb == 20


def test_job_spec_dp_settings_are_validated_naming_the_dp_key():
    from ultrafedfm.config import from_mapping, to_mapping

    with pytest.raises(ConfigError, match=r"dp\.noise_multiplier"):
        from_mapping(JobSpec, {"name": "x", "dp": {"enabled": True}})
    with pytest.raises(ConfigError, match=r"dp\.max_grad_norm"):
        from_mapping(JobSpec, {"name": "x", "dp": {"enabled": True, "target_epsilon": 4.0, "max_grad_norm": 0}})
    spec = from_mapping(JobSpec, {"name": "x", "dp": {"enabled": True, "target_epsilon": 4.0}})
    assert spec.dp.enabled and spec.training_contract().dp == spec.dp
    assert from_mapping(JobSpec, to_mapping(spec)) == spec
