"""The pieces of secure aggregation in FLARE, without a simulator run: policy, identities, the wire format."""
from __future__ import annotations

import numpy as np
import pytest

from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.decomposers import common_decomposers
from nvflare.app_common.utils.fl_model_utils import FLModelUtils
from nvflare.fuel.utils import fobs

from ultrafedfm.config import to_mapping
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.kit.identity import load_server_root_ca, load_site_identity, make_simulation_identities
from ultrafedfm.federation.secure_site import SiteSecureAggregation
from ultrafedfm.federation.wire import SECAGG_KEY, message_from_params, message_to_array, site_key, split_params
from ultrafedfm.flare.deploy.simulation import prepare_workspace
from ultrafedfm.privacy import JobRequest, PolicyRefusal, PrivacyPolicy, admit_job
from ultrafedfm.secagg import IdentityError, MaskedInput, SecAggConfig, SecAggServer
from ultrafedfm.site_config import IdentityFiles, SiteConfig, load_site_config


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


def test_secure_aggregation_is_on_in_both_committed_jobs():
    for spec in JOB_SPECS.values():
        assert spec.secure_aggregation and spec.min_sites >= 3
        assert isinstance(spec.secagg_config(), SecAggConfig) and spec.secagg_config().consistency_check


def test_a_site_without_its_kit_files_fails_naming_the_missing_file(tmp_path):
    kit = tmp_path / "site-1"
    (kit / "startup").mkdir(parents=True)
    entries = make_simulation_identities(tmp_path / "ids", ["site-1", "site-2"])
    (kit / "startup" / "client.crt").write_bytes(open(entries["site-1"]["certificate"], "rb").read())
    with pytest.raises(IdentityError, match=r"private key.*startup/client\.key.*does not exist"):
        load_site_identity(SiteConfig(cache=tmp_path), kit_root=kit, site_name="site-1")
    with pytest.raises(IdentityError, match=r"startup/rootCA\.pem"):
        load_server_root_ca(tmp_path / "server")
    # A certificate issued to another site is refused before any key is sent.
    other = IdentityFiles(certificate=entries["site-2"]["certificate"], private_key=entries["site-2"]["private_key"],
                          root_ca=entries["site-2"]["root_ca"])
    with pytest.raises(IdentityError, match="issued to 'site-2'"):
        load_site_identity(SiteConfig(cache=tmp_path, identity=other), kit_root=kit, site_name="site-1")


def test_prepare_workspace_gives_every_simulated_site_and_the_server_an_identity(tmp_path):
    ws = tmp_path / "ws"
    local = prepare_workspace(ws, site_configs={"site-1": {"cache": "c1"}, "site-2": {"cache": "c2"}})
    root_ca = load_server_root_ca(ws)  # the simulator copies startup/ to the server and the sites
    for name in ("site-1", "site-2"):
        config = load_site_config(local / "site.yaml", site_name=name)
        identity, site_root = load_site_identity(config, kit_root=ws, site_name=name)
        assert identity.name == name and site_root == root_ca
    assert not (local / "rootCA.key").exists() and not list(tmp_path.rglob("*ca*.key"))  # no CA key is kept


def test_secagg_messages_cross_flare_serialisation_bit_exactly():
    common_decomposers.register()  # what FLARE's processes do: numpy arrays through FOBS
    rng = np.random.default_rng(0)
    masked = rng.integers(0, 2**32, size=10_001, dtype=np.uint64).astype(np.uint32)
    message = MaskedInput(sender="site-1", job_id="job", round=3, masked=masked)
    sent = FLModel(params={SECAGG_KEY: message_to_array(message)}, params_type=ParamsType.DIFF, meta={"num_samples": 5})
    received = FLModelUtils.from_shareable(fobs.loads(fobs.dumps(FLModelUtils.to_shareable(sent))))
    back = message_from_params(received.params)
    assert isinstance(back, MaskedInput) and back.masked.dtype == np.uint32
    assert np.array_equal(back.masked, masked) and received.meta["num_samples"] == 5
    weights, secagg = split_params({"blocks.0.w": np.zeros(2), site_key("site-1"): np.zeros(3, np.uint8)})
    assert list(weights) == ["blocks.0.w"] and list(secagg) == ["__secagg__/site-1"]


def test_site_secure_aggregation_answers_every_phase_and_the_server_gets_the_weighted_mean(tmp_path):
    names = ["site-1", "site-2", "site-3"]
    entries = make_simulation_identities(tmp_path, names)
    config = SecAggConfig(min_sites=3, max_sites=8, max_weight=100.0)
    sites = {n: SiteSecureAggregation(site_name=n, job_id="job-7", kit_root=tmp_path,
                                      site_config=SiteConfig(cache=tmp_path, identity=IdentityFiles(**entries[n])))
             for n in names}
    server = SecAggServer(root_ca=load_site_identity(SiteConfig(cache=tmp_path, identity=IdentityFiles(**entries["site-1"])),
                                                     kit_root=tmp_path, site_name="site-1")[1],
                          job_id="job-7", round_number=0, config=config)
    deltas = {n: {"w": np.full(5, i + 1.0, np.float32) * 1e-2} for i, n in enumerate(names)}
    weights = {"site-1": 10, "site-2": 20, "site-3": 30}

    def phase(task: str, params: dict, receive) -> None:
        for n, s in sites.items():
            receive(message_from_params(s.handle(task, params=params, config=config, round_index=0)))

    phase("secagg_advertise_keys", {}, server.receive_advertisement)
    phase("secagg_share_keys", {SECAGG_KEY: message_to_array(server.key_roster())}, server.receive_encrypted_shares)
    deliveries = {site_key(n): message_to_array(d) for n, d in server.share_deliveries().items()}
    for n, s in sites.items():
        server.receive_masked_input(message_from_params(
            s.mask_update(params=deliveries, delta=deltas[n], num_samples=weights[n], round_index=0)))
    phase("secagg_consistency_check", {SECAGG_KEY: message_to_array(server.survivor_list())},
          server.receive_survivor_signature)
    phase("secagg_unmask", {SECAGG_KEY: message_to_array(server.unmask_request())}, server.receive_unmask_response)
    mean = server.aggregate().mean_delta()
    expected = sum(weights[n] * deltas[n]["w"] for n in names) / sum(weights.values())
    np.testing.assert_allclose(mean, expected, atol=1e-5)
    with pytest.raises(RuntimeError, match="missed the key advertisement"):
        sites["site-1"].handle("secagg_share_keys", params={}, config=config, round_index=5)
