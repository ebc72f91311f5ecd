"""The federation core without FLARE: a whole run over in-process site sessions, both aggregations."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from caches import make_cache
from ultrafedfm.config import ConfigError, to_mapping
from ultrafedfm.federation.aggregation import PlainFedAvg, SecureAggregation, make_aggregation
from ultrafedfm.federation.contract import TrainingContract
from ultrafedfm.federation.exchange import ExchangeResult, SiteReply
from ultrafedfm.federation.fedavg import apply_delta, weighted_mean_delta
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.federation.local import LocalExchange
from ultrafedfm.federation.model_io import model_params
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.server import FederatedRun
from ultrafedfm.federation.site_session import SiteSession
from ultrafedfm.federation.site_training import SiteTrainer
from ultrafedfm.kit.identity import make_simulation_identities
from ultrafedfm.secagg import load_certificate
from ultrafedfm.site_config import SiteConfig, load_site_config

SIZES = {"site-1": 6, "site-2": 10, "site-3": 14}


def _spec(tmp_path: Path, **changes):
    base = dict(name="core_test", img_size=16, num_rounds=2, warmup_rounds=1, batch_size=8, base_lr=1.5e-2,
                min_sites=3, round_timeout_s=60, run_name="core", run_state_dir=str(tmp_path / "run"),
                degradations=False, secure_aggregation=False)
    base.update(changes)
    return dataclasses.replace(JOB_SPECS["mae_pretrain_tiny"], **base)


def _sessions(tmp_path: Path, *, secure: bool) -> dict[str, SiteSession]:
    identities = make_simulation_identities(tmp_path / "ids", sorted(SIZES)) if secure else {}
    sessions = {}
    for i, (name, n) in enumerate(SIZES.items()):
        kit = tmp_path / "kits" / name
        (kit / "local").mkdir(parents=True)
        entry = {"cache": str(make_cache(tmp_path / "caches" / name, n_images=n, seed=i, brightness=0.3 + 0.2 * i)),
                 "num_workers": 0, "num_threads": 1, "privacy": {"require_secure_aggregation": secure}}
        if secure:
            entry["identity"] = identities[name]
        (kit / "local" / "site.yaml").write_text(yaml.safe_dump(entry))
        sessions[name] = SiteSession(site_name=name, job_id="job-core", start_dir=kit)
    return sessions


def _run(spec, sessions, *, unreachable=()):
    exchange = LocalExchange(sessions, unreachable=unreachable)
    root_ca = Path(spec.run_state_dir).parent / "ids" / "rootCA.pem"
    run = FederatedRun(job=spec, state=RunState(spec.run_state_dir, spec.effective_run_name),
                       aggregation=make_aggregation(spec, root_ca=lambda: load_certificate(root_ca)),
                       exchange=exchange, job_id="job-core")
    assert run.run(connected_sites=exchange.connected_sites, aborted=lambda: False)
    return run


def _fedavg_by_hand(spec, caches: dict[str, Path], rounds: int) -> dict[str, np.ndarray]:
    contract = spec.training_contract()
    trainers = {n: SiteTrainer(site_name=n, site_config=SiteConfig(cache=c, num_workers=0, num_threads=1))
                for n, c in caches.items()}
    params = model_params(contract.initial_model())
    for r in range(rounds):
        deltas = [{k: v.numpy() for k, v in trainers[n].train_round(
            global_params=params, contract=contract, lr=spec.learning_rate(r), round_index=r).delta.items()}
            for n in sorted(caches)]
        params = apply_delta(params, weighted_mean_delta(deltas, weights=[SIZES[n] for n in sorted(caches)]))
    return params


def test_a_plain_fedavg_run_over_in_process_sites_equals_fedavg_by_hand(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(tmp_path)
    run = _run(spec, _sessions(tmp_path, secure=False))
    rows = run.state.read_rounds()
    assert [r["round"] for r in rows] == [0, 1] and all(r["applied"] for r in rows)
    assert rows[0]["participants"] == sorted(SIZES) and rows[0]["num_samples"] == SIZES
    expected = _fedavg_by_hand(spec, {n: tmp_path / "caches" / n for n in SIZES}, 2)
    final = run.state.load().params
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], atol=1e-5)
    assert isinstance(run.aggregation, PlainFedAvg) and run.progress.to_info()["phase"] == "finished"
    assert {p.name for p in run.exported} >= {"final_model.pt", "encoder.pth"}


def test_a_secure_run_over_in_process_sites_equals_fedavg_within_quantisation(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0)
    run = _run(spec, _sessions(tmp_path, secure=True))
    rows = run.state.read_rounds()
    assert all(r["applied"] and r["failed"] == {} for r in rows), rows
    assert isinstance(run.aggregation, SecureAggregation)
    expected = _fedavg_by_hand(spec, {n: tmp_path / "caches" / n for n in SIZES}, 2)
    final = run.state.load().params
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], atol=1e-4)


def test_a_masked_input_without_its_bookkeeping_is_never_summed(tmp_path):
    """Validate before summing: a reply refused after its vector entered the sum would break the round."""
    torch.set_num_threads(1)
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    sessions = _sessions(tmp_path, secure=True)
    real_reply = sessions["site-3"]._update_reply
    sessions["site-3"]._update_reply = lambda params, update: dataclasses.replace(real_reply(params, update), metrics={})
    run = _run(spec, sessions)
    row = run.state.read_rounds()[0]
    # Three sites, min_sites 3: without site-3's input the round cannot aggregate -- and nothing leaked.
    assert row["failed"] == {"site-3": "train: refused its message: no loss in the metrics"}
    assert not row["applied"] and "only 2 masked inputs arrived" in row["message"]


def test_a_plain_round_with_too_few_valid_updates_leaves_the_model_unchanged(tmp_path):
    spec = _spec(tmp_path, num_rounds=1, warmup_rounds=0)
    run = _run(spec, _sessions(tmp_path, secure=False), unreachable={"site-2"})
    row = run.state.read_rounds()[0]
    assert row["participants"] == [] or not row["applied"]
    assert "fewer than min_sites=3" in row["message"] and "unchanged" in row["message"]
    initial = model_params(spec.training_contract().initial_model())
    final = run.state.load().params
    assert all(np.array_equal(final[k], initial[k]) for k in initial)


def test_the_training_contract_travels_as_a_mapping_and_fails_loudly_on_unknown_keys():
    contract = JOB_SPECS["mae_pretrain_tiny"].training_contract()
    assert TrainingContract.from_mapping(contract.to_mapping()) == contract
    assert hash(contract) == hash(TrainingContract.from_mapping(to_mapping(contract)))
    with pytest.raises(ConfigError, match="training contract.*unknown key"):
        TrainingContract.from_mapping({**contract.to_mapping(), "privacy": {}})
    with pytest.raises(ConfigError, match="required key is missing"):
        TrainingContract.from_mapping({k: v for k, v in contract.to_mapping().items() if k != "seed"})


def test_a_site_keeps_its_model_for_one_contract_and_rebuilds_it_for_another(tmp_path):
    trainer = SiteTrainer(site_name="s", site_config=SiteConfig(cache=tmp_path))
    contract = JOB_SPECS["mae_pretrain_tiny"].training_contract()
    model = trainer.model(contract)
    assert trainer.model(TrainingContract.from_mapping(contract.to_mapping())) is model
    assert trainer.model(dataclasses.replace(contract, seed=contract.seed + 1)) is not model


def test_a_typo_in_the_ingest_section_fails_when_site_yaml_is_read(tmp_path):
    path = tmp_path / "site.yaml"
    path.write_text("cache: /data\ningest:\n  frame_strid: 5\n")
    with pytest.raises(ConfigError, match=r"site.yaml.*ingest.frame_strid"):
        load_site_config(path)
    path.write_text("cache: /data\ningest:\n  image_size: 64\n  exclude: ['*.txt']\n")
    config = load_site_config(path)
    assert config.ingest.image_size == 64 and config.ingest.exclude == ("*.txt",)


def test_the_exchange_reports_a_site_that_never_answers(tmp_path):
    spec = _spec(tmp_path, num_rounds=1, warmup_rounds=0, min_sites=1)
    sessions = _sessions(tmp_path, secure=False)
    calls = []

    def exchange(request):
        calls.append(request.task_name)
        reply = sessions["site-1"].handle(__import__("ultrafedfm.federation.site_session", fromlist=["SiteTask"])
                                          .SiteTask(name=request.task_name, round=request.round,
                                                    params=dict(request.params), meta=dict(request.meta)))
        return ExchangeResult(replies={"site-1": reply}, errors={"site-2": "the site returned EXECUTION_EXCEPTION"})

    run = FederatedRun(job=spec, state=RunState(spec.run_state_dir, "core"), aggregation=PlainFedAvg(),
                       exchange=exchange, job_id="j")
    run.run(connected_sites=lambda: ["site-1", "site-2", "site-3"], aborted=lambda: False)
    row = run.state.read_rounds()[0]
    assert calls == ["train"] and row["applied"] and row["participants"] == ["site-1"]
    assert row["failed"]["site-2"] == "train: the site returned EXECUTION_EXCEPTION"
    assert row["failed"]["site-3"].startswith("train: no answer within 60 s")
    assert isinstance(SiteReply(site="x").refused, type(None))


def test_only_flare_imports_nvflare_and_the_kit_builder_does_not_import_torch():
    package = Path(__file__).resolve().parents[2] / "ultrafedfm"
    leaks = []
    for path in package.rglob("*.py"):
        if "flare" in path.relative_to(package).parts[:1]:
            continue
        for line in path.read_text().splitlines():
            if line.lstrip().startswith(("import nvflare", "from nvflare")):
                leaks.append(str(path.relative_to(package)))
    assert leaks == []
    probe = ("import sys; import ultrafedfm.flare.deploy.kit_builder, ultrafedfm.kit.provisioning, "
             "ultrafedfm.flare.registry; print(sorted(m for m in ('torch', 'timm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_site_figures_are_appended_and_read_back_skipping_a_torn_line(tmp_path):
    from ultrafedfm.federation.site_figures import (
        SiteRoundFigures, append_site_figures, read_site_figures, site_figures_path,
    )

    path = site_figures_path(tmp_path / "cache")
    first = SiteRoundFigures(job="j", job_id="id", round=0, loss=0.5, num_samples=10, steps=2, train_seconds=1.0,
                             masked=True)
    append_site_figures(path, first)
    with path.open("a") as f:
        f.write('{"job": "j", "rou')  # a crash mid-append
    second = SiteRoundFigures(job="j", job_id="id", round=1, loss=0.4, num_samples=10, steps=2, train_seconds=1.0,
                              masked=True, epsilon=1.5)
    append_site_figures(path, second)
    assert read_site_figures(path) == [first, second]
    assert read_site_figures(tmp_path / "none.jsonl") == []
