"""Federated MAE pretraining in the real FLARE simulator: correctness of FedAvg over FLARE.

Each test runs the exported job in ``nvflare``'s simulator (sites train in external
processes) and judges by what the server saved, never by the simulator's exit code.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from flare_helpers import make_cache, simulate, site, tiny_spec
from ultrafedfm.data.cache import CacheDataset
from ultrafedfm.federation.model_io import model_params
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.flare.deploy.simulation import workspace_processes
from ultrafedfm.federation.site_training import SiteTrainer, local_generator_seed
from ultrafedfm.site_config import SiteConfig
from ultrafedfm.federation.fedavg import apply_delta, weighted_mean_delta
from ultrafedfm.train.schedule import round_learning_rate
from ultrafedfm.train.pretrain import train_local


def _lr(spec, round_index):
    return round_learning_rate(round_index, base_lr=spec.base_lr, batch_size=spec.batch_size,
                               warmup_rounds=spec.warmup_rounds, total_rounds=spec.num_rounds)


def _assert_close(actual: dict, expected: dict, atol: float = 2e-5) -> None:
    assert set(actual) == set(expected)
    worst = max(float(np.max(np.abs(np.asarray(actual[k]) - np.asarray(expected[k])))) for k in expected)
    assert worst <= atol, f"largest difference {worst}"


def test_one_site_with_e_local_epochs_equals_centralized_training(tmp_path):
    # Plain FedAvg keeps the deterministic training seed (local_generator_seed), which makes this
    # comparison possible; secure-aggregation jobs mix fresh entropy into it (docs/federation.md).
    cache = make_cache(tmp_path / "c1", n_images=10, seed=1)
    spec = tiny_spec(tmp_path, num_rounds=1, warmup_rounds=0, local_epochs=2)
    result, state = simulate(tmp_path, spec, {"site-1": site(cache)})
    assert result.left_running == []
    checkpoint = state.load()
    assert checkpoint is not None and checkpoint.last_completed_round == 0, result.server_log

    contract = spec.training_contract()
    model = contract.initial_model()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the site (num_threads: 1), so float sums run in the same order
    try:
        train_local(model=model, dataset=CacheDataset(cache, image_size=16), config=contract.pretrain_config(),
                    epochs=2, lr=_lr(spec, 0), device="cpu", resume=False, progress=False,
                    generator_seed=local_generator_seed(spec.seed, 0, "site-1"))
    finally:
        torch.set_num_threads(threads)
    _assert_close(checkpoint.params, model_params(model))
    row = state.read_rounds()[0]
    assert row["total_images"] == 10 and row["applied"]


@pytest.mark.slow
def test_unequal_sites_are_weighted_by_sample_count_and_loss_falls(tmp_path):
    sizes = {"site-1": 8, "site-2": 32}
    caches = {n: make_cache(tmp_path / n, n_images=k, seed=i, brightness=0.25 + 0.5 * i)
              for i, (n, k) in enumerate(sizes.items())}
    spec = tiny_spec(tmp_path, num_rounds=3, warmup_rounds=1, min_sites=2)
    result, state = simulate(tmp_path, spec, {n: site(c) for n, c in caches.items()})
    assert result.left_running == []
    rows = state.read_rounds()
    assert [r["round"] for r in rows] == [0, 1, 2], result.server_log
    assert all(r["applied"] and r["participants"] == ["site-1", "site-2"] for r in rows)
    assert rows[0]["total_images"] == sum(sizes.values()) and rows[0]["bytes_received"] > 0
    # Plain FedAvg receives each site's count and loss in the clear, but keeps only aggregates.
    assert all(not {"loss", "num_samples", "train_seconds"} & set(r) for r in rows)

    # FedAvg by hand: the same local training outside FLARE, averaged with weights 8 and 32.
    torch.set_num_threads(1)
    contract = spec.training_contract()
    trainers = {n: SiteTrainer(site_name=n, site_config=SiteConfig(cache=c, num_workers=0, num_threads=1))
                for n, c in caches.items()}
    weighted = unweighted = model_params(contract.initial_model())
    for r in range(spec.num_rounds):
        deltas = {n: {k: v.numpy() for k, v in t.train_round(global_params=weighted, contract=contract,
                                                               lr=_lr(spec, r), round_index=r).delta.items()}
                  for n, t in trainers.items()}
        if r == 0:
            unweighted = apply_delta(weighted, weighted_mean_delta(list(deltas.values()), weights=[1, 1]))
        weighted = apply_delta(weighted, weighted_mean_delta([deltas[n] for n in sizes], weights=list(sizes.values())))
        if r == 0:
            first_round = weighted
    final = state.load().params
    _assert_close(final, weighted, atol=5e-5)
    # The check can tell weighted from unweighted averaging:
    gap = max(float(np.max(np.abs(first_round[k] - unweighted[k]))) for k in unweighted)
    assert gap > 1e-4

    losses = [r["global_loss"] for r in rows]
    assert losses[-1] < losses[0], losses
    # The global loss is the image-weighted mean of the losses each site recorded on its own disk.
    own = {n: read_site_figures(site_figures_path(c))[0] for n, c in caches.items()}
    assert all(f.round == 0 and not f.masked for f in own.values())
    expected_global = np.average([own["site-1"].loss, own["site-2"].loss], weights=[8, 32])
    assert rows[0]["global_loss"] == pytest.approx(expected_global)

    # Artefacts: best + final model, encoder, TensorBoard on the server, copies in the job workspace.
    for name in ("global_model.pt", "best_model.pt", "final_model.pt", "encoder.safetensors", "encoder.json", "encoder.md"):
        assert (state.dir / name).is_file(), name
    assert list(state.tensorboard_dir.glob("events.out.tfevents.*"))
    job_models = result.workspace / "server" / "simulate_job" / "models"
    assert (job_models / "final_model.pt").is_file() and (job_models / "encoder.safetensors").is_file()
