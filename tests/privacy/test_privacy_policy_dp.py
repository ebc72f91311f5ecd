"""admit_job and DP: a job under the site's floor is refused naming the policy key and both values, no paths."""
from __future__ import annotations

import pytest

from ultrafedfm.privacy import DPConfig, JobRequest, PolicyRefusal, PrivacyPolicy, admit_job


def _request(dp: dict | None, **fields) -> JobRequest:
    return JobRequest(job="mae_pretrain", secure_aggregation=False, dp=dp, **fields)


OPEN = PrivacyPolicy(require_secure_aggregation=False)


@pytest.mark.parametrize("policy,dp,key,values", [
    (PrivacyPolicy(require_secure_aggregation=False, min_noise_multiplier=1.0),
     {"enabled": True, "noise_multiplier": 0.5}, "privacy.min_noise_multiplier", ("0.5", "min_noise_multiplier: 1")),
    (PrivacyPolicy(require_secure_aggregation=False, max_epsilon=4.0),
     {"enabled": True, "target_epsilon": 8.0}, "privacy.max_epsilon", ("8", "max_epsilon: 4")),
    (PrivacyPolicy(require_secure_aggregation=False, max_delta=1e-5),
     {"enabled": True, "noise_multiplier": 1.0, "delta": 1e-3}, "privacy.max_delta", ("0.001", "max_delta: 1e-05")),
    (PrivacyPolicy(require_secure_aggregation=False, require_dp=True),
     {"enabled": False, "noise_multiplier": 1.0}, "privacy.require_dp", ("require_dp: true",)),
    (PrivacyPolicy(require_secure_aggregation=False, require_dp=True), None, "privacy.require_dp",
     ("require_dp: true",)),
])
def test_a_job_under_the_site_floor_is_refused_naming_the_key_and_both_values(tmp_path, policy, dp, key, values):
    with pytest.raises(PolicyRefusal) as info:
        admit_job(policy, _request(dp), site_name="hospital-a")
    message = str(info.value)
    assert info.value.key == key
    assert key in message and "site.yaml" in message and "hospital-a" in message and "mae_pretrain" in message
    for value in values:
        assert value in message, (value, message)
    assert str(tmp_path) not in message and "/" not in message.replace("1/(10 N)", "")


def test_a_job_at_the_site_floor_is_admitted_with_its_typed_dp_settings():
    policy = PrivacyPolicy(require_secure_aggregation=False, require_dp=True, min_noise_multiplier=1.0,
                           max_epsilon=4.0, max_delta=1e-5)
    admission = admit_job(policy, _request({"enabled": True, "noise_multiplier": 1.0, "delta": 1e-5}),
                          site_name="a")
    assert admission.dp == DPConfig(enabled=True, noise_multiplier=1.0, delta=1e-5)
    assert admit_job(policy, _request({"enabled": True, "target_epsilon": 4.0}), site_name="a").dp.target_epsilon == 4
    # DP off at a site that does not require it: admitted, no DP.
    assert admit_job(OPEN, _request({"enabled": False}), site_name="a").dp is None
    assert admit_job(OPEN, _request(None), site_name="a").dp is None


@pytest.mark.parametrize("dp,key", [
    ({"enabled": True}, "dp.noise_multiplier"),
    ({"enabled": True, "noise_multiplier": 0.0}, "dp.noise_multiplier"),
    ({"enabled": True, "noise_multiplier": 1.0, "secure_rng": False}, "dp.secure_rng"),
    ({"enabled": True, "noise_multiplier": "lots"}, "dp.noise_multiplier"),
])
def test_malformed_dp_settings_from_the_server_are_refused_naming_the_setting(dp, key):
    with pytest.raises(PolicyRefusal) as info:
        admit_job(OPEN, _request(dp), site_name="a")
    assert info.value.key == key


def test_the_legacy_switch_needs_dp_settings_and_must_agree_with_them():
    with pytest.raises(PolicyRefusal) as info:
        admit_job(OPEN, _request(None, differential_privacy=True), site_name="a")
    assert info.value.key == "dp"
    with pytest.raises(PolicyRefusal) as info:
        admit_job(OPEN, _request({"enabled": False}, differential_privacy=True), site_name="a")
    assert info.value.key == "dp.enabled"
    admission = admit_job(OPEN, _request({"enabled": True, "noise_multiplier": 2.0}, differential_privacy=True),
                          site_name="a")
    assert admission.dp.noise_multiplier == 2.0


def test_the_privacy_package_imports_neither_torch_nor_opacus():
    # site.yaml loading and the kit tools import the policy; only a training round may pull in torch.
    import subprocess
    import sys

    code = ("import sys, ultrafedfm.privacy, ultrafedfm.privacy.dp; "
            "print(sorted(m for m in ('torch', 'opacus') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
