"""DPConfig validation and its mapping round trip; plan_job resolves rate, delta and noise from the site's data."""
from __future__ import annotations

import math

import pytest

from ultrafedfm.config import ConfigError, from_mapping, to_mapping
from ultrafedfm.privacy import DPConfig, PolicyRefusal, PrivacyPolicy, plan_job
from ultrafedfm.privacy.dp import compute_epsilon, default_delta
from ultrafedfm.privacy.dp.accounting import Mechanism


def test_dp_config_survives_to_mapping_and_from_mapping():
    config = DPConfig(enabled=True, target_epsilon=4.0, max_grad_norm=0.5, delta=1e-6, accountant="rdp",
                      clipping="hooks")
    mapping = to_mapping(config)
    assert mapping == {"enabled": True, "noise_multiplier": None, "target_epsilon": 4.0, "max_grad_norm": 0.5,
                       "delta": 1e-6, "accountant": "rdp", "clipping": "hooks"}
    assert from_mapping(DPConfig, mapping) == config
    assert from_mapping(DPConfig, {"enabled": True, "noise_multiplier": 1}).noise_multiplier == 1.0
    assert DPConfig().enabled is False and DPConfig().accountant == "prv" and DPConfig().clipping == "ghost"


@pytest.mark.parametrize("mapping,key", [
    ({"enabled": True}, "noise_multiplier"),                                        # neither
    ({"enabled": True, "noise_multiplier": 1.0, "target_epsilon": 2.0}, "noise_multiplier"),  # both
    ({"enabled": True, "noise_multiplier": 0.0}, "noise_multiplier"),               # no noise at all
    ({"enabled": True, "noise_multiplier": float("nan")}, "noise_multiplier"),
    ({"enabled": True, "target_epsilon": -1.0}, "target_epsilon"),
    ({"enabled": True, "noise_multiplier": 1.0, "max_grad_norm": 0.0}, "max_grad_norm"),
    ({"enabled": True, "noise_multiplier": 1.0, "delta": 1.0}, "delta"),
    ({"enabled": True, "noise_multiplier": 1.0, "accountant": "gdp"}, "accountant"),
    ({"enabled": True, "noise_multiplier": 1.0, "clipping": "ew"}, "clipping"),
    ({"enabled": True, "noise_multiplier": 1.0, "poisson_sampling": False}, "poisson_sampling"),  # no off switch
])
def test_invalid_dp_settings_name_the_key(mapping, key):
    with pytest.raises(ConfigError) as info:
        from_mapping(DPConfig, mapping, prefix="dp")
    assert info.value.key == f"dp.{key}"


def test_default_delta_is_a_tenth_of_one_over_n_or_the_policy_cap():
    assert default_delta(500) == pytest.approx(2e-4)
    assert default_delta(500, max_delta=1e-5) == 1e-5
    assert default_delta(500, max_delta=1.0) == pytest.approx(2e-4)
    with pytest.raises(ValueError):
        default_delta(0)


def test_plan_resolves_rate_steps_and_default_delta_from_the_site_image_count():
    plan = plan_job(DPConfig(enabled=True, noise_multiplier=1.1, accountant="rdp"), PrivacyPolicy(),
                    site_name="a", job="j", num_images=50, batch_size=8, rounds=3, local_epochs=2)
    assert plan.steps_per_epoch == 7 and plan.sample_rate == 1 / 7 and plan.steps_per_round == 14
    assert plan.delta == pytest.approx(1 / 500) and plan.noise_multiplier == 1.1
    expected, _ = compute_epsilon([Mechanism(1.1, 1 / 7, 42)], 1 / 500, "rdp")
    assert plan.planned_epsilon == pytest.approx(expected)
    by_steps = plan_job(DPConfig(enabled=True, noise_multiplier=1.1), PrivacyPolicy(max_delta=1e-4),
                        site_name="a", job="j", num_images=50, batch_size=8, rounds=3, local_steps=5)
    assert by_steps.steps_per_round == 5 and by_steps.delta == 1e-4


def test_plan_calibrates_noise_to_the_job_target_over_all_rounds():
    config = DPConfig(enabled=True, target_epsilon=3.0, accountant="rdp")
    plan = plan_job(config, PrivacyPolicy(), site_name="a", job="j", num_images=200, batch_size=20, rounds=5,
                    local_epochs=1)
    spent, _ = compute_epsilon([Mechanism(plan.noise_multiplier, 0.1, 50)], plan.delta, "rdp")
    assert 3.0 - 0.05 <= spent <= 3.0  # reaches the target from below
    assert plan.planned_epsilon == pytest.approx(spent)
    # More rounds need more noise for the same target.
    longer = plan_job(config, PrivacyPolicy(), site_name="a", job="j", num_images=200, batch_size=20, rounds=20,
                      local_epochs=1)
    assert longer.noise_multiplier > plan.noise_multiplier


def test_plan_refuses_calibrated_noise_below_the_site_minimum_without_naming_the_image_count():
    policy = PrivacyPolicy(min_noise_multiplier=2.0)
    with pytest.raises(PolicyRefusal) as info:
        plan_job(DPConfig(enabled=True, target_epsilon=8.0, accountant="rdp"), policy, site_name="a", job="j",
                 num_images=1234, batch_size=32, rounds=2, local_epochs=1)
    assert info.value.key == "privacy.min_noise_multiplier"
    assert "target epsilon 8" in str(info.value) and "privacy.min_noise_multiplier: 2" in str(info.value)
    assert "1234" not in str(info.value)


def test_plan_refuses_a_job_whose_rounds_would_pass_the_job_cap_or_a_delta_of_one_over_n():
    with pytest.raises(PolicyRefusal) as info:
        plan_job(DPConfig(enabled=True, noise_multiplier=0.7, accountant="rdp"), PrivacyPolicy(max_epsilon=1.0),
                 site_name="a", job="j", num_images=100, batch_size=10, rounds=50, local_epochs=1)
    assert info.value.key == "privacy.max_epsilon" and "privacy.max_epsilon: 1" in str(info.value)
    with pytest.raises(PolicyRefusal) as info:
        plan_job(DPConfig(enabled=True, noise_multiplier=1.0, delta=0.02), PrivacyPolicy(), site_name="a",
                 job="j", num_images=100, batch_size=10, rounds=1, local_epochs=1)
    assert info.value.key == "dp.delta"
    with pytest.raises(PolicyRefusal) as info:
        plan_job(DPConfig(enabled=True, noise_multiplier=1.0, delta=1e-3), PrivacyPolicy(max_delta=1e-4),
                 site_name="a", job="j", num_images=100, batch_size=10, rounds=1, local_epochs=1)
    assert info.value.key == "privacy.max_delta"
    assert math.isfinite(plan_job(DPConfig(enabled=True, noise_multiplier=1.0, delta=1e-4),
                                  PrivacyPolicy(max_delta=1e-4), site_name="a", job="j", num_images=100,
                                  batch_size=10, rounds=1, local_epochs=1).planned_epsilon)
