"""The federation core without FLARE: a whole run over in-process site sessions, both aggregations.

The secure runs use real keys and a real signed member list (``make_simulation_members``), each
site's own ledger on disk, and the server's member list, exactly as a deployment loads them.
"""
from __future__ import annotations

import dataclasses
import logging
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
from ultrafedfm.federation.aggregation.survivors import SURVIVORS_FILE, read_bound_survivors
from ultrafedfm.federation.contract import TrainingContract
from ultrafedfm.federation.exchange import ExchangeResult, SiteReply
from ultrafedfm.federation.fedavg import apply_delta, weighted_mean_delta
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.federation.local import LocalExchange
from ultrafedfm.federation.model_io import model_params
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.server import FederatedRun
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.federation.site_session import SiteSession
from ultrafedfm.federation.site_training import SiteTrainer, local_generator_seed
from ultrafedfm.federation.tasks import TRAIN_TASK, UNMASK_TASK
from ultrafedfm.federation.wire import SECAGG_KEY, split_params
from ultrafedfm.kit.enroll import load_server_membership
from ultrafedfm.kit.simulation_members import make_simulation_members
from ultrafedfm.secagg import SecAggConfig, model_digest
from ultrafedfm.site_config import SiteConfig, load_site_config

SIZES = {"site-1": 6, "site-2": 10, "site-3": 14}
PER_SITE_KEYS = {"loss", "num_samples", "train_seconds"}


def _spec(tmp_path: Path, **changes):
    base = dict(name="core_test", img_size=16, num_rounds=2, warmup_rounds=1, batch_size=8, base_lr=1.5e-2,
                min_sites=3, round_timeout_s=60, run_name="core", run_state_dir=str(tmp_path / "run"),
                degradations=False, secure_aggregation=False)
    base.update(changes)
    return dataclasses.replace(JOB_SPECS["mae_pretrain_tiny"], **base)


def _sessions(tmp_path: Path, *, secure: bool, sizes: dict[str, int] = SIZES, job_id: str = "job-core",
              privacy: dict[str, dict] | None = None) -> dict[str, SiteSession]:
    """One kit per site, each with its own cache and (secure) key, pins and ledger; a session per kit."""
    files = make_simulation_members(tmp_path / "secagg", sorted(sizes))[0] if secure else {}
    for i, (name, n) in enumerate(sizes.items()):
        kit = tmp_path / "kits" / name
        (kit / "local").mkdir(parents=True, exist_ok=True)
        entry = {"cache": str(make_cache(tmp_path / "caches" / name, n_images=n, seed=i, brightness=0.3 + 0.2 * i)),
                 "num_workers": 0, "num_threads": 1,
                 "privacy": {"require_secure_aggregation": secure, **(privacy or {}).get(name, {})}}
        if secure:
            entry["secagg_dir"] = str(files[name].signing_key.parent)
        (kit / "local" / "site.yaml").write_text(yaml.safe_dump(entry))
    return _open_sessions(tmp_path, sizes, job_id=job_id)


def _open_sessions(tmp_path: Path, names, *, job_id: str) -> dict[str, SiteSession]:
    """The site processes of one job, over the kits (and their files on disk) of ``_sessions``."""
    return {n: SiteSession(site_name=n, job_id=job_id, start_dir=tmp_path / "kits" / n) for n in names}


def _members(tmp_path: Path):
    return lambda: load_server_membership(tmp_path / "secagg" / "members.json")


def _run(spec, sessions, *, unreachable=(), exchange=None, aggregation=None, job_id="job-core", aborted=None,
         finished=True):
    exchange = exchange or LocalExchange(sessions, unreachable=unreachable)
    tmp_path = Path(spec.run_state_dir).parent
    run = FederatedRun(job=spec, state=RunState(spec.run_state_dir, spec.effective_run_name),
                       aggregation=aggregation or make_aggregation(spec, members=_members(tmp_path)),
                       exchange=exchange, job_id=job_id)
    connected = getattr(exchange, "connected_sites", lambda: sorted(sessions))
    assert run.run(connected_sites=connected, aborted=aborted or (lambda: False)) is finished
    return run


def _figures(tmp_path: Path, site: str):
    return read_site_figures(site_figures_path(tmp_path / "caches" / site))


def _fedavg_by_hand(spec, caches: dict[str, Path], rounds: int, *, seeds=None) -> dict[str, np.ndarray]:
    """FedAvg outside the federation; ``seeds[(site, round)]`` replaces the deterministic training seed."""
    contract = spec.training_contract()
    trainers = {n: SiteTrainer(site_name=n, site_config=SiteConfig(cache=c, num_workers=0, num_threads=1))
                for n, c in caches.items()}
    params = model_params(contract.initial_model())
    for r in range(rounds):
        deltas = [{k: v.numpy() for k, v in trainers[n].train_round(
            global_params=params, contract=contract, lr=spec.learning_rate(r), round_index=r,
            generator_seed=(seeds or {}).get((n, r))).delta.items()} for n in sorted(caches)]
        params = apply_delta(params, weighted_mean_delta(deltas, weights=[SIZES[n] for n in sorted(caches)]))
    return params


def test_a_plain_fedavg_run_over_in_process_sites_equals_fedavg_by_hand_and_keeps_only_aggregates(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(tmp_path)
    run = _run(spec, _sessions(tmp_path, secure=False))
    rows = run.state.read_rounds()
    assert [r["round"] for r in rows] == [0, 1] and all(r["applied"] for r in rows)
    assert rows[0]["participants"] == sorted(SIZES) and rows[0]["total_images"] == sum(SIZES.values())
    assert not PER_SITE_KEYS & set(rows[0]) and not PER_SITE_KEYS & set(run.state.load().history[0])
    # The global loss is the image-weighted mean of what each site recorded on its own disk.
    own = {n: _figures(tmp_path, n)[0] for n in SIZES}
    assert all(not f.masked and f.generator_seed == local_generator_seed(spec.seed, 0, n) for n, f in own.items())
    weighted = sum(f.loss * f.num_samples for f in own.values()) / sum(SIZES.values())
    assert rows[0]["global_loss"] == pytest.approx(weighted, rel=1e-6)
    assert rows[0]["total_steps"] == sum(f.steps for f in own.values())
    expected = _fedavg_by_hand(spec, {n: tmp_path / "caches" / n for n in SIZES}, 2)
    final = run.state.load().params
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], atol=1e-5)
    assert isinstance(run.aggregation, PlainFedAvg) and run.progress.to_info()["phase"] == "finished"
    assert {p.name for p in run.exported} >= {"final_model.pt", "encoder.safetensors", "encoder.json", "encoder.md"}


def test_a_secure_run_with_fresh_seeds_equals_fedavg_within_quantisation_and_keeps_only_aggregates(tmp_path):
    torch.set_num_threads(1)
    # One round: the comparison is exact up to quantisation. Over more rounds AdamW turns that
    # error (1e-6) into sign flips of near-zero updates (1e-4 at this lr), which says nothing.
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    run = _run(spec, _sessions(tmp_path, secure=True))
    rows = run.state.read_rounds()
    assert len(rows) == 1 and all(r["applied"] and r["failed"] == {} for r in rows), rows
    assert isinstance(run.aggregation, SecureAggregation)
    own = {(n, f.round): f for n in SIZES for f in _figures(tmp_path, n)}
    assert len(own) == 3 and all(f.masked and f.clipped_coordinates == 0 for f in own.values())
    # Fresh entropy: no site trained with the deterministic seed a server could predict.
    assert all(f.generator_seed != local_generator_seed(spec.seed, r, n) for (n, r), f in own.items())
    expected = _fedavg_by_hand(spec, {n: tmp_path / "caches" / n for n in SIZES}, 1,
                               seeds={k: f.generator_seed for k, f in own.items()})
    final = run.state.load().params
    bound = spec.secagg_config().quantization_error_bound  # on the weighted sum; the mean's error is smaller
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], rtol=0, atol=bound)
    # Aggregates decoded from the masked sum: the weighted mean loss, total images and steps.
    for row in rows:
        figures = [own[(n, row["round"])] for n in SIZES]
        assert not PER_SITE_KEYS & set(row)
        assert row["total_images"] == sum(SIZES.values()) and row["total_steps"] == sum(f.steps for f in figures)
        weighted = sum(f.loss * f.num_samples for f in figures) / sum(SIZES.values())
        assert row["global_loss"] == pytest.approx(weighted, abs=1e-4)


def _with_extra(session: SiteSession, **extra) -> None:
    """Make ``session`` answer its training task with ``extra`` fields beside the masked vector (an old site)."""
    real = session.handle

    def handle(task):
        reply = real(task)
        return dataclasses.replace(reply, **extra) if task.name == TRAIN_TASK else reply

    session.handle = handle


def test_a_masked_input_with_figures_beside_it_is_refused_before_it_enters_the_sum(tmp_path):
    """Validate before summing (issue 9, point 6): a refused input must not be in the sum the round unmasks."""
    torch.set_num_threads(1)
    sizes = {**SIZES, "site-4": 8}
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    sessions = _sessions(tmp_path, secure=True, sizes=sizes)
    _with_extra(sessions["site-4"], metrics={"loss": 0.5}, meta={"num_samples": 8})
    run = _run(spec, sessions)
    row = run.state.read_rounds()[0]
    assert row["failed"] == {"site-4": "train: refused its message: the reply carries metrics ['loss'] in the clear; "
                                       "only masked values may leave a site"}
    # site-4 is dropped, not summed: the others' masks with it are removed through its mask key.
    assert row["applied"] and row["participants"] == sorted(SIZES) and row["total_images"] == sum(SIZES.values())
    own = {n: _figures(tmp_path, n)[0].generator_seed for n in SIZES}
    expected = _fedavg_by_hand(spec, {n: tmp_path / "caches" / n for n in SIZES}, 1,
                               seeds={(n, 0): s for n, s in own.items()})
    final = run.state.load().params
    for k in expected:
        np.testing.assert_allclose(final[k], expected[k], rtol=0, atol=spec.secagg_config().quantization_error_bound)


def test_a_site_refuses_a_roster_below_its_own_privacy_min_sites(tmp_path, caplog):
    torch.set_num_threads(1)
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    sessions = _sessions(tmp_path, secure=True, privacy={"site-1": {"min_sites": 4}})
    with caplog.at_level(logging.WARNING):
        run = _run(spec, sessions)
    row = run.state.read_rounds()[0]
    assert not row["applied"] and row["failed"]["site-1"].startswith("secagg_share_keys: failed at the site: RoundAborted")
    assert "site 'site-1' takes part only with at least 4" in caplog.text  # the site's own log says why
    assert _figures(tmp_path, "site-1") == []  # it never trained


def _unmask_then_crash(sessions):
    """An exchange that answers every task, then the 'server' dies once the unmask answers are in."""
    exchange = LocalExchange(sessions)
    seen = []

    def call(request):
        result = exchange(request)
        seen.append(request.task_name)
        return result

    call.connected_sites = exchange.connected_sites
    return call, lambda: UNMASK_TASK in seen


def _interrupted_first_run(tmp_path, sizes):
    """Round 1 over site-1..3 (site-4 not connected) runs to its unmask, then the server dies before saving."""
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    sessions = _sessions(tmp_path, secure=True, sizes=sizes, job_id="job-a")
    first = {n: s for n, s in sessions.items() if n != "site-4"}
    exchange, crashed = _unmask_then_crash(first)
    run = _run(spec, first, exchange=exchange, job_id="job-a", aborted=crashed, finished=False)
    assert run.state.load() is None  # nothing saved: the round is re-run from the same model
    bound = read_bound_survivors(run.state.dir, model_digest(model_params(spec.training_contract().initial_model())))
    assert bound is not None and bound.survivors == ("site-1", "site-2", "site-3")
    # The job is resubmitted: new site processes over the same kits, ledgers and pins.
    return spec, _open_sessions(tmp_path, sizes, job_id="job-b")


def test_a_restarted_server_reruns_the_interrupted_round_with_the_persisted_survivor_set(tmp_path):
    torch.set_num_threads(1)
    sizes = {**SIZES, "site-4": 8}
    spec, sessions = _interrupted_first_run(tmp_path, sizes)
    run = _run(spec, sessions, job_id="job-b")  # the job resubmitted; site-4 is connected now
    row = run.state.read_rounds()[0]
    assert row["applied"] and row["participants"] == ["site-1", "site-2", "site-3"], row
    assert row["failed"]["site-4"].startswith("secagg_advertise_keys: this model's sum is bound to")
    assert _figures(tmp_path, "site-4") == []


def test_a_site_refuses_a_second_contribution_when_a_restarted_server_changes_the_survivor_set(tmp_path):
    torch.set_num_threads(1)
    sizes = {**SIZES, "site-4": 8}
    spec, sessions = _interrupted_first_run(tmp_path, sizes)
    (Path(spec.run_state_dir) / "core" / SURVIVORS_FILE).unlink()  # a server that forgot (or hides) the first set
    run = _run(spec, sessions, job_id="job-b")
    row = run.state.read_rounds()[0]
    assert not row["applied"] and "nothing was revealed" in row["message"], row
    for site in ("site-1", "site-2", "site-3"):
        reason = row["failed"][site]
        assert reason.startswith("secagg_consistency_check: failed at the site: ContributionRefused"), reason
        assert "already helped unmask a sum" in reason and "['site-1', 'site-2', 'site-3']" in reason
    initial = model_params(spec.training_contract().initial_model())
    assert all(np.array_equal(run.state.load().params[k], initial[k]) for k in initial)


def _tampering(sessions, site: str, change):
    """An exchange that alters the training task ``site`` receives (a server sending one site another round)."""
    exchange = LocalExchange(sessions)

    def call(request):
        if request.task_name != TRAIN_TASK:
            return exchange(request)
        honest = dataclasses.replace(request, targets=tuple(t for t in request.targets if t != site))
        altered = dataclasses.replace(request, targets=(site,), **change(request))
        result = exchange(honest)
        result.replies.update(exchange(altered).replies)
        return result

    call.connected_sites = exchange.connected_sites
    return call


def _other_model(request):
    weights, secagg = split_params(request.params)
    name = sorted(weights)[0]
    return {"params": {**weights, name: np.asarray(weights[name]) + np.float32(1e-3), **secagg}}


def _other_lr(request):
    return {"meta": {**request.meta, "lr": request.meta["lr"] * 2}}


def _other_training(request):
    return {"meta": {**request.meta, "training": {**request.meta["training"], "local_epochs": 3}}}


@pytest.mark.parametrize("change", [_other_model, _other_lr, _other_training], ids=["model", "lr", "training"])
def test_a_site_detects_a_training_task_that_differs_from_the_announced_round_and_does_not_train(
        tmp_path, change, monkeypatch):
    torch.set_num_threads(1)
    trained = []
    real_train_round = SiteTrainer.train_round

    def train_round(self, **kwargs):
        trained.append(self.site_name)
        return real_train_round(self, **kwargs)

    monkeypatch.setattr(SiteTrainer, "train_round", train_round)
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    sessions = _sessions(tmp_path, secure=True)
    run = _run(spec, sessions, exchange=_tampering(sessions, "site-2", change))
    row = run.state.read_rounds()[0]
    reason = row["failed"]["site-2"]
    assert reason.startswith("train: failed at the site: ContributionRefused") and "announced" in reason, reason
    assert sorted(trained) == ["site-1", "site-3"]  # site-2 refused before any training step
    assert not row["applied"] and "only 2 masked inputs arrived" in row["message"]


def test_every_coordinate_the_encoding_clips_is_counted_logged_and_recorded_at_the_site(tmp_path, caplog):
    torch.set_num_threads(1)
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    tight = SecureAggregation(config=SecAggConfig(min_sites=3, max_sites=32, max_weight=20.0, clip=1e-6),
                              members=_members(tmp_path))
    with caplog.at_level(logging.WARNING):
        run = _run(spec, _sessions(tmp_path, secure=True), aggregation=tight)
    assert run.state.read_rounds()[0]["applied"]
    for name in SIZES:
        [figures] = _figures(tmp_path, name)
        assert figures.clipped_coordinates > 0
        assert f"site {name}: {figures.clipped_coordinates} of " in caplog.text and "were clipped" in caplog.text


def test_a_secure_training_reply_carries_the_masked_vector_and_nothing_else(tmp_path):
    torch.set_num_threads(1)
    spec = _spec(tmp_path, secure_aggregation=True, secagg_max_weight=20.0, num_rounds=1, warmup_rounds=0)
    sessions = _sessions(tmp_path, secure=True)
    replies = []
    exchange = LocalExchange(sessions)

    def call(request):
        result = exchange(request)
        replies.extend((request.task_name, r) for r in result.replies.values())
        return result

    call.connected_sites = exchange.connected_sites
    run = _run(spec, sessions, exchange=call)
    assert run.state.read_rounds()[0]["applied"]
    assert {task for task, _ in replies} == {"secagg_advertise_keys", "secagg_share_keys", "train",
                                             "secagg_consistency_check", "secagg_unmask"}
    for task, reply in replies:
        assert set(reply.params) == {SECAGG_KEY} and reply.meta == {} and reply.metrics == {}, (task, reply.meta)


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
