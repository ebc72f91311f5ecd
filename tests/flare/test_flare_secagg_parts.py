"""The pieces of secure aggregation in FLARE, without a simulator run: policy, site material, the wire format."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.utils import fobs

from ultrafedfm.config import ConfigError, from_mapping, to_mapping
from ultrafedfm.federation.job_spec import JOB_SPECS, JobSpec
from ultrafedfm.federation.secure_site import SiteSecureAggregation
from ultrafedfm.federation.wire import (
    ROUND_CONTEXT_KEY, SECAGG_KEY, message_from_params, message_to_array, site_key, split_params,
)
from ultrafedfm.flare.deploy.simulation import prepare_workspace, secagg_folder
from ultrafedfm.kit.enroll import SiteFiles, open_site
from ultrafedfm.kit.identity import load_server_members, open_site_material, site_files
from ultrafedfm.kit.simulation_members import make_simulation_members
from ultrafedfm.kit.site_key import ensure_site_key
from ultrafedfm.privacy import JobRequest, PolicyRefusal, PrivacyPolicy, admit_job
from ultrafedfm.secagg import (
    IdentityError, MaskedInput, MembershipError, RoundContext, RoundFigures, SecAggConfig, SecAggServer, model_digest,
)
from ultrafedfm.site_config import SiteConfig, load_site_config


REPO = Path(__file__).resolve().parents[2]


def _request(spec=JOB_SPECS["mae_pretrain_tiny"], **changes) -> JobRequest:
    fields = dict(job=spec.name, secure_aggregation=spec.secure_aggregation,
                  differential_privacy=spec.dp.enabled, secagg=to_mapping(spec.secagg_config()), dp=None)
    fields.update(changes)
    return JobRequest(**fields)


def test_a_strict_site_refuses_a_plaintext_job_naming_its_key_and_the_job(tmp_path):
    strict = SiteConfig(cache=tmp_path)
    plaintext = _request(secure_aggregation=False, secagg=None)
    with pytest.raises(PolicyRefusal) as refusal:
        admit_job(strict.privacy, plaintext, site_name="site-2")
    message = str(refusal.value)
    assert "privacy.require_secure_aggregation" in message and "site.yaml" in message
    assert "job 'mae_pretrain_tiny'" in message and "site-2" in message
    assert refusal.value.key == "privacy.require_secure_aggregation"
    assert str(tmp_path) not in message  # sent to the server: no path
    # The job cannot weaken the policy: a request has no policy field, only the site's own setting counts.
    with pytest.raises(TypeError):
        JobRequest(job="j", secure_aggregation=False, privacy={"require_secure_aggregation": False})
    admission = admit_job(strict.privacy, _request(), site_name="site-2")
    assert admission.secagg == JOB_SPECS["mae_pretrain_tiny"].secagg_config()
    relaxed = SiteConfig(cache=tmp_path, privacy=PrivacyPolicy(require_secure_aggregation=False))
    assert admit_job(relaxed.privacy, plaintext, site_name="site-1").secagg is None


def test_a_site_requiring_dp_refuses_a_job_without_it(tmp_path):
    requires_dp = SiteConfig(cache=tmp_path, privacy=PrivacyPolicy(require_dp=True))
    with pytest.raises(PolicyRefusal, match=r"privacy\.require_dp: true"):
        admit_job(requires_dp.privacy, _request(), site_name="site-3")
    with pytest.raises(PolicyRefusal, match=r"privacy\.require_dp: true"):
        admit_job(requires_dp.privacy, _request(dp={"enabled": False, "noise_multiplier": 1.0}), site_name="site-3")
    # DP switched on without settings is refused too: DP-SGD needs a noise multiplier or a target epsilon.
    with pytest.raises(PolicyRefusal, match="no DP settings"):
        admit_job(requires_dp.privacy, _request(differential_privacy=True), site_name="site-3")
    admission = admit_job(requires_dp.privacy, _request(dp={"enabled": True, "noise_multiplier": 1.0}),
                          site_name="site-3")
    assert admission.dp.enabled and admission.dp.noise_multiplier == 1.0


def test_the_server_cannot_weaken_secure_aggregation_settings_at_a_site(tmp_path):
    policy = PrivacyPolicy()
    settings = to_mapping(JOB_SPECS["mae_pretrain_tiny"].secagg_config())
    with pytest.raises(PolicyRefusal, match="consistency_check") as refusal:
        admit_job(policy, _request(secagg={**settings, "consistency_check": False}), site_name="site-2")
    assert refusal.value.key == "secagg.consistency_check"
    with pytest.raises(PolicyRefusal, match="unknown secure-aggregation settings"):
        admit_job(policy, _request(secagg={**settings, "reveal_everything": True}), site_name="site-2")
    with pytest.raises(PolicyRefusal, match="min_sites"):
        admit_job(policy, _request(secagg={**settings, "min_sites": 1}), site_name="site-2")
    with pytest.raises(PolicyRefusal, match="no secure-aggregation settings"):
        admit_job(policy, _request(secagg=None), site_name="site-2")


def test_secure_aggregation_is_on_in_every_committed_job_folder():
    # What a consortium submits: the folders under jobs/, read as the server's controller reads them.
    folders = sorted(p.parent.parent.parent for p in (REPO / "jobs").glob("*/app/config/config_fed_server.json"))
    assert {f.name for f in folders} >= {"mae_pretrain", "mae_pretrain_tiny", "mae_pretrain_dp", "mae_pretrain_tiny_dp"}
    for folder in folders:
        config = json.loads((folder / "app" / "config" / "config_fed_server.json").read_text())
        spec = from_mapping(JobSpec, config["workflows"][0]["args"]["spec"], source=str(folder))
        assert spec.secure_aggregation and spec.min_sites >= 3, folder.name
        assert isinstance(spec.secagg_config(), SecAggConfig) and spec.secagg_config().consistency_check, folder.name


def test_the_site_floor_privacy_min_sites_defaults_to_3_refuses_less_and_raises_the_jobs_floor(tmp_path):
    assert PrivacyPolicy().min_sites == 3
    for low in (2, 1):
        with pytest.raises(ConfigError, match="min_sites.*at least 3|min_sites.*>= 3"):
            from_mapping(PrivacyPolicy, {"min_sites": low})
    job = _request()  # the tiny job: min_sites 3
    assert admit_job(PrivacyPolicy(), job, site_name="site-1").min_sites == 3
    assert admit_job(PrivacyPolicy(min_sites=5), job, site_name="site-1").min_sites == 5  # the site's floor wins
    bigger = _request(secagg={**to_mapping(JOB_SPECS["mae_pretrain_tiny"].secagg_config()), "min_sites": 4})
    assert admit_job(PrivacyPolicy(), bigger, site_name="site-1").min_sites == 4  # so does a stricter job
    path = tmp_path / "site.yaml"
    path.write_text("cache: /data\nprivacy:\n  min_sites: 2\n")
    with pytest.raises(ConfigError, match=r"privacy\.min_sites"):
        load_site_config(path)


def test_a_site_without_its_enrolled_key_or_member_list_fails_naming_the_file_and_what_to_do(tmp_path):
    kit = tmp_path / "site-1"
    (kit / "local").mkdir(parents=True)
    config = SiteConfig(cache=tmp_path)
    with pytest.raises(IdentityError, match=r"local/secagg_site_key\.pem.*ultrafedfm kit enroll"):
        open_site_material(config, kit_root=kit, site_name="site-1")
    ensure_site_key(site_files(config, kit_root=kit, site_name="site-1").signing_key, site="site-1")
    with pytest.raises(MembershipError, match=r"no member list at .*local/members\.json"):
        open_site_material(config, kit_root=kit, site_name="site-1")
    with pytest.raises(MembershipError, match=r"server/local/members\.json.*kit init"):
        load_server_members(tmp_path / "server" / "local")
    # A member list that does not enrol this site's key is refused before any key is sent.
    files, members = make_simulation_members(tmp_path / "sim", ["site-1", "site-2", "site-3"])
    (kit / "local" / "members.json").write_bytes(members.read_bytes())
    with pytest.raises(IdentityError, match="the member list enrols key .* but .*secagg_site_key.pem holds"):
        open_site_material(config, kit_root=kit, site_name="site-1")


def test_prepare_workspace_gives_every_simulated_site_its_own_key_and_the_server_the_member_list(tmp_path):
    ws = tmp_path / "ws"
    local = prepare_workspace(ws, site_configs={n: {"cache": f"c{i}"} for i, n in enumerate(["site-1", "site-2", "site-3"])})
    server_members = load_server_members(local)  # the simulator copies local/ to the server and every site
    keys = set()
    for name in ("site-1", "site-2", "site-3"):
        config = load_site_config(local / "site.yaml", site_name=name)
        assert config.secagg_dir == secagg_folder(ws) / name
        material = open_site_material(config, kit_root=ws / name, site_name=name)
        assert material.members == server_members and material.signer.site == name
        keys.add(material.signer.public_key)
        assert (config.secagg_dir / "secagg_pins.json").is_file()  # pinned on first use, at the site
    assert len(keys) == 3
    # The throwaway admin key is never written: nothing else can be enrolled under it.
    assert not [p for p in tmp_path.rglob("*") if "admin" in p.name]
    # A second preparation is a new simulated consortium (new keys, fresh pins and ledgers).
    prepare_workspace(ws, site_configs={n: {"cache": "c"} for n in ("site-1", "site-2", "site-3")})
    assert load_server_members(local) != server_members


def test_secagg_messages_cross_flare_serialisation_bit_exactly():
    common_decomposers.register()  # what FLARE's processes do: numpy arrays through FOBS
    rng = np.random.default_rng(0)
    masked = rng.integers(0, 2**32, size=10_001, dtype=np.uint64).astype(np.uint32)
    message = MaskedInput(sender="site-1", job_id="job", round=3, masked=masked)
    sent = FLModel(params={SECAGG_KEY: message_to_array(message)}, params_type=ParamsType.DIFF, meta={})
    received = FLModelUtils.from_shareable(fobs.loads(fobs.dumps(FLModelUtils.to_shareable(sent))))
    back = message_from_params(received.params)
    assert isinstance(back, MaskedInput) and back.masked.dtype == np.uint32
    assert np.array_equal(back.masked, masked) and received.meta == {} and received.metrics is None
    weights, secagg = split_params({"blocks.0.w": np.zeros(2), site_key("site-1"): np.zeros(3, np.uint8)})
    assert list(weights) == ["blocks.0.w"] and list(secagg) == ["__secagg__/site-1"]


def test_site_secure_aggregation_answers_every_phase_and_the_server_gets_the_weighted_mean_and_figures(tmp_path):
    names = ["site-1", "site-2", "site-3"]
    files, members_file = make_simulation_members(tmp_path, names)
    config = SecAggConfig(min_sites=3, max_sites=8, max_weight=100.0)
    weights_sent = {"w": np.linspace(-1, 1, 5).astype(np.float32)}
    context = RoundContext(model_sha256=model_digest(weights_sent), lr=0.01, training={"local_steps": 2})
    meta = {ROUND_CONTEXT_KEY: context.to_mapping()}
    sites = {n: SiteSecureAggregation(site_name=n, job_id="job-7", material=open_site(files[n])) for n in names}
    server = SecAggServer(members=load_server_members(members_file.parent), job_id="job-7", round_number=0,
                          config=config, context=context)
    deltas = {n: {"w": np.full(5, i + 1.0, np.float32) * 1e-2} for i, n in enumerate(names)}
    weights = {"site-1": 10, "site-2": 20, "site-3": 30}
    losses = {"site-1": 1.0, "site-2": 2.0, "site-3": 4.0}

    def phase(task: str, params: dict, receive) -> None:
        for s in sites.values():
            receive(message_from_params(s.handle(task, params=params, meta=meta, config=config, min_sites=3,
                                                 round_index=0)))

    phase("secagg_advertise_keys", {}, server.receive_advertisement)
    phase("secagg_share_keys", {SECAGG_KEY: message_to_array(server.key_roster())}, server.receive_encrypted_shares)
    deliveries = {site_key(n): message_to_array(d) for n, d in server.share_deliveries().items()}
    for n, s in sites.items():
        trained_with = s.check_task(weights=weights_sent, lr=0.01, training={"local_steps": 2}, round_index=0)
        params, clipped = s.mask_update(params=deliveries, delta=deltas[n], weight=weights[n], round_index=0,
                                        figures=RoundFigures(loss=losses[n], steps=2, num_samples=weights[n]),
                                        trained_with=trained_with)
        assert list(params) == [SECAGG_KEY] and clipped == 0
        message = message_from_params(params)
        server.check_masked_input(message)
        server.receive_masked_input(message)
    phase("secagg_consistency_check", {SECAGG_KEY: message_to_array(server.survivor_list())},
          server.receive_survivor_signature)
    phase("secagg_unmask", {SECAGG_KEY: message_to_array(server.unmask_request())}, server.receive_unmask_response)
    result = server.aggregate()
    expected = sum(weights[n] * deltas[n]["w"] for n in names) / sum(weights.values())
    np.testing.assert_allclose(result.mean_delta(), expected, atol=1e-5)
    figures = result.figures
    assert figures.num_samples == 60 and figures.steps == 6
    assert figures.loss == pytest.approx((10 * 1.0 + 20 * 2.0 + 30 * 4.0) / 60, abs=1e-4)
    with pytest.raises(RuntimeError, match="missed the key advertisement"):
        sites["site-1"].handle("secagg_share_keys", params={}, meta={}, config=config, min_sites=3, round_index=5)
