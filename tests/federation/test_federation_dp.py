"""DP-SGD in a site's round: planned and charged by the site's own ledger, caps stop the site, not the round."""
from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from caches import make_cache
from ultrafedfm.federation.aggregation import PlainFedAvg
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.federation.local import LocalExchange
from ultrafedfm.federation.model_io import model_params
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.server import FederatedRun
from ultrafedfm.federation.site_session import SiteSession
from ultrafedfm.federation.site_training import SiteTrainer
from ultrafedfm.privacy import PolicyRefusal, PrivacyPolicy
from ultrafedfm.privacy.dp import BudgetExhausted, DPConfig, read_ledger, site_ledger_path
from ultrafedfm.site_config import SiteConfig


def _spec(tmp_path, **changes):
    base = dict(name="dp_test", img_size=16, num_rounds=2, warmup_rounds=0, batch_size=4, base_lr=1.5e-2,
                min_sites=2, round_timeout_s=60, run_name="dp", run_state_dir=str(tmp_path / "run"),
                degradations=False, secure_aggregation=False,
                dp=DPConfig(enabled=True, noise_multiplier=1.0, max_grad_norm=1.0, accountant="rdp", clipping="hooks"))
    base.update(changes)
    return dataclasses.replace(JOB_SPECS["mae_pretrain_tiny"], **base)


def test_each_dp_round_is_charged_in_the_sites_own_ledger_before_it_trains(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(tmp_path)
    cache = make_cache(tmp_path / "cache", n_images=12)
    trainer = SiteTrainer(site_name="site-1", site_config=SiteConfig(cache=cache, num_workers=0, num_threads=1))
    params = model_params(spec.training_contract().initial_model())
    updates = [trainer.train_round(global_params=params, contract=spec.training_contract(), lr=spec.learning_rate(r),
                                   round_index=r, job_id="job-7") for r in range(2)]
    ledger = read_ledger(site_ledger_path(cache))
    charges = ledger.charges("job-7")
    assert [c.round for c in charges] == [0, 1]
    assert charges[0].noise_multiplier == 1.0 and charges[0].accountant == "rdp"
    assert 0 < updates[0].privacy.epsilon_job < updates[1].privacy.epsilon_job == pytest.approx(charges[1].epsilon_job)
    assert updates[1].privacy.delta <= 1 / (10 * 12)  # the site's default delta for its 12 images


def test_a_round_past_the_lifetime_cap_does_not_train_and_names_the_key(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(tmp_path)
    cache = make_cache(tmp_path / "cache", n_images=12)
    site_config = SiteConfig(cache=cache, num_workers=0, num_threads=1,
                             privacy=PrivacyPolicy(require_secure_aggregation=False))
    trainer = SiteTrainer(site_name="site-1", site_config=site_config)
    contract = spec.training_contract()
    params = model_params(contract.initial_model())
    first = trainer.train_round(global_params=params, contract=contract, lr=1e-3, round_index=0, job_id="a")
    # The hospital lowers its lifetime cap below what one more round would reach.
    site_config.privacy = PrivacyPolicy(require_secure_aggregation=False,
                                        lifetime_epsilon=first.privacy.epsilon_lifetime * 1.01)
    trainer = SiteTrainer(site_name="site-1", site_config=site_config)
    model_before = {k: v.clone() for k, v in trainer.model(contract).state_dict().items()}
    with pytest.raises(BudgetExhausted) as refusal:
        trainer.train_round(global_params=params, contract=contract, lr=1e-3, round_index=1, job_id="a")
    assert isinstance(refusal.value, PolicyRefusal) and refusal.value.key == "privacy.lifetime_epsilon"
    assert str(cache) not in str(refusal.value)  # sent to the server: no path
    assert [c.round for c in read_ledger(site_ledger_path(cache)).charges("a")] == [0]
    after = trainer.model(contract).state_dict()
    assert all(torch.equal(after[k], model_before[k]) for k in after)


def test_a_site_at_its_cap_stops_contributing_and_the_round_goes_on_without_it(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(tmp_path, num_rounds=1)
    sessions = {}
    for i, name in enumerate(["site-1", "site-2", "site-3"]):
        kit = tmp_path / "kits" / name
        (kit / "local").mkdir(parents=True)
        privacy = {"require_secure_aggregation": False, "require_dp": True}
        if name == "site-3":
            privacy["lifetime_epsilon"] = 1e-3  # no round fits under it
        entry = {"cache": str(make_cache(tmp_path / "caches" / name, n_images=8, seed=i)), "num_workers": 0,
                 "num_threads": 1, "privacy": privacy}
        (kit / "local" / "site.yaml").write_text(yaml.safe_dump(entry))
        sessions[name] = SiteSession(site_name=name, job_id="job-dp", start_dir=kit)
    exchange = LocalExchange(sessions)
    run = FederatedRun(job=spec, state=RunState(spec.run_state_dir, "dp"), aggregation=PlainFedAvg(),
                       exchange=exchange, job_id="job-dp")
    assert run.run(connected_sites=exchange.connected_sites, aborted=lambda: False)
    row = run.state.read_rounds()[0]
    assert row["applied"] and row["participants"] == ["site-1", "site-2"]
    assert "privacy.lifetime_epsilon" in row["failed"]["site-3"] and "refused by the site's policy" in row["failed"]["site-3"]
    for name in ("site-1", "site-2"):
        assert len(read_ledger(site_ledger_path(tmp_path / "caches" / name)).charges()) == 1
    assert read_ledger(site_ledger_path(tmp_path / "caches" / "site-3")).charges() == []
