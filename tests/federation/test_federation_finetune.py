"""Federated fine-tuning: a classifier and a segmenter trained over sites with the pretraining's rounds."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
import yaml

from caches import make_cache
from ultrafedfm.config import ConfigError
from ultrafedfm.data.labelled import LabelledDataError
from ultrafedfm.downstream.synthetic import write_labelled_folder
from ultrafedfm.federation.aggregation import make_aggregation
from ultrafedfm.federation.finetune import FinetuneSettings
from ultrafedfm.federation.job_spec import JOB_SPECS, JobSpec
from ultrafedfm.federation.local import LocalExchange
from ultrafedfm.federation.model_io import FINETUNED_FOLDER
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.server import FederatedRun, initial_params
from ultrafedfm.federation.site_session import SiteSession
from ultrafedfm.federation.site_training import SiteTrainer
from ultrafedfm.models.downstream.spec import load_downstream
from ultrafedfm.models.export import save_encoder
from ultrafedfm.models.mae import build_mae
from ultrafedfm.site_config import SiteConfig

NAMES = ["site-1", "site-2", "site-3"]


def _spec(tmp_path, task: str, **changes) -> JobSpec:
    settings = FinetuneSettings(task=task, classes=("benign", "malignant", "normal") if task == "cls" else ())
    base = dict(name=f"ft_{task}", preset="tiny", img_size=32, num_rounds=2, warmup_rounds=0, batch_size=8,
                base_lr=5e-3, min_sites=3, round_timeout_s=120, run_name=f"ft_{task}",
                run_state_dir=str(tmp_path / "run"), secure_aggregation=False, finetune=settings,
                export_encoder=False)
    base.update(changes)
    return dataclasses.replace(JOB_SPECS["mae_pretrain_tiny"], **base)


def _sessions(tmp_path, *, require_secure: bool = False, require_dp: bool = False) -> dict[str, SiteSession]:
    sessions = {}
    for i, name in enumerate(NAMES):
        kit = tmp_path / "kits" / name
        (kit / "local").mkdir(parents=True)
        folder = write_labelled_folder(tmp_path / "labelled" / name, n=24, seed=100 + i, frame=(64, 96))
        entry = {"cache": str(make_cache(tmp_path / "caches" / name, n_images=4)), "labelled": str(folder),
                 "num_workers": 0, "num_threads": 1,
                 "privacy": {"require_secure_aggregation": require_secure, "require_dp": require_dp}}
        (kit / "local" / "site.yaml").write_text(yaml.safe_dump(entry))
        sessions[name] = SiteSession(site_name=name, job_id=f"job-{name}", start_dir=kit)
    return sessions


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_a_federated_fine_tuning_run_trains_every_site_and_exports_a_loadable_model(tmp_path, task):
    torch.set_num_threads(1)
    spec = _spec(tmp_path, task)
    exchange = LocalExchange(_sessions(tmp_path))
    run = FederatedRun(job=spec, state=RunState(spec.run_state_dir, spec.run_name),
                       aggregation=make_aggregation(spec, members=lambda: None), exchange=exchange, job_id="j")
    assert run.run(connected_sites=exchange.connected_sites, aborted=lambda: False)
    rows = run.state.read_rounds()
    assert all(r["applied"] and r["participants"] == NAMES for r in rows), rows
    model, loaded_spec = load_downstream(run.state.dir / FINETUNED_FOLDER)
    assert loaded_spec.task == task and (task == "seg" or loaded_spec.classes == ("benign", "malignant", "normal"))
    initial = initial_params(spec)
    trained = model.state_dict()
    assert any(not np.allclose(trained[k].numpy(), initial[k]) for k in initial)  # the rounds changed the model
    card = (run.state.dir / FINETUNED_FOLDER / "MODEL_CARD.md").read_text()
    assert "each site trained on its own training split only" in card


def test_fine_tuning_starts_from_the_pretrained_encoder_on_the_server(tmp_path):
    mae = build_mae("tiny", img_size=32)
    encoder = save_encoder(mae, tmp_path / "encoder.safetensors")
    spec = _spec(tmp_path, "cls", init_encoder=str(encoder))
    params = initial_params(spec)
    expected = mae.encoder.blocks[0].attn.qkv.weight.detach().numpy()
    assert np.array_equal(params["blocks.0.attn.qkv.weight"], expected)
    scratch = initial_params(dataclasses.replace(spec, init_encoder=None))
    assert not np.array_equal(scratch["blocks.0.attn.qkv.weight"], expected)


def test_a_site_trains_only_on_its_training_split_and_names_a_class_the_job_does_not_know(tmp_path):
    spec = _spec(tmp_path, "cls")
    folder = write_labelled_folder(tmp_path / "labelled", n=40, seed=3, frame=(64, 96))
    trainer = SiteTrainer(site_name="s", site_config=SiteConfig(cache=tmp_path, labelled=folder))
    view = trainer.training_data(spec.training_contract())
    assert 0 < len(view) < 40  # validation and test groups stay at the site
    odd = dataclasses.replace(spec, finetune=FinetuneSettings(task="cls", classes=("benign", "malignant")))
    with pytest.raises(LabelledDataError, match=r"classes \['normal'\] are not among the job's"):
        SiteTrainer(site_name="s", site_config=SiteConfig(cache=tmp_path, labelled=folder)).training_data(
            odd.training_contract())
    with pytest.raises(LabelledDataError, match="no `labelled:` folder"):
        SiteTrainer(site_name="s", site_config=SiteConfig(cache=tmp_path)).training_data(spec.training_contract())


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_a_dp_fine_tuning_run_is_charged_to_every_sites_own_ledger_and_exports_a_dp_compatible_model(tmp_path, task):
    from ultrafedfm.privacy.dp import DPConfig, read_ledger, site_ledger_path

    torch.set_num_threads(1)
    spec = _spec(tmp_path, task, dp=DPConfig(enabled=True, target_epsilon=8.0, max_grad_norm=1.0, accountant="rdp"))
    exchange = LocalExchange(_sessions(tmp_path, require_dp=True))  # sites whose policy demands DP-SGD accept it
    run = FederatedRun(job=spec, state=RunState(spec.run_state_dir, spec.run_name),
                       aggregation=make_aggregation(spec, members=lambda: None), exchange=exchange, job_id="j")
    assert run.run(connected_sites=exchange.connected_sites, aborted=lambda: False)
    rows = run.state.read_rounds()
    assert [r["round"] for r in rows] == [0, 1] and all(r["participants"] == NAMES for r in rows), rows
    for name in NAMES:
        ledger = read_ledger(site_ledger_path(tmp_path / "caches" / name))
        charges = ledger.charges()
        assert [c.round for c in charges] == [0, 1]  # charged round by round, before training
        completed = [e for e in ledger.entries if e.kind == "completed"]
        assert [c.round for c in completed] == [0, 1] and all(c.steps > 0 for c in completed)
        assert 0 < charges[0].epsilon_job < charges[1].epsilon_job <= 8.0 + 1e-6
    model, loaded = load_downstream(run.state.dir / FINETUNED_FOLDER)
    assert loaded.dp_compatible
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert "DP-SGD at every site (target epsilon 8" in (run.state.dir / FINETUNED_FOLDER / "MODEL_CARD.md").read_text()


def test_a_fine_tuning_job_names_a_misplaced_encoder_setting():
    with pytest.raises(ConfigError, match="init_encoder"):
        JobSpec(name="x", init_encoder="/enc.safetensors")
