"""DP-SGD on our MAE through DPPrivatizer: clipped per-image gradients equal brute force; Poisson batches, noise.

Brute force: the same MAE weights, the same batch and the same masks and degradations (the
forward runs under the same seed, and the masks are compared), one ``autograd.grad`` per image of
its own loss, each clipped to the clip norm, averaged. Opacus' update with noise off must equal it.
"""
from __future__ import annotations

import copy

import pytest
import torch

from ultrafedfm.models.degradations import DegradationConfig
from ultrafedfm.models.mae import build_mae
from ultrafedfm.privacy import DPConfig, PrivacyPolicy, SiteDP, plan_job, read_ledger
from ultrafedfm.privacy.dp.plan import DPPlan
from ultrafedfm.privacy.dp.privatizer import DPPrivatizer
from ultrafedfm.train.pretrain import PretrainConfig, build_model, train_local


def _plan(*, num_images: int, batch_size: int, noise: float, clip: float = 1.0, clipping: str = "ghost",
          rounds: int = 1) -> DPPlan:
    steps_per_epoch = -(-num_images // batch_size)
    return DPPlan(job="test", noise_multiplier=noise, max_grad_norm=clip, delta=1e-5,
                  sample_rate=1 / steps_per_epoch, steps_per_epoch=steps_per_epoch,
                  steps_per_round=steps_per_epoch, rounds=rounds, num_images=num_images, batch_size=batch_size,
                  accountant="rdp", clipping=clipping, target_epsilon=None, planned_epsilon=1.0)


def _loader(images: torch.Tensor, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(list(images.unbind(0)), batch_size=batch_size,
                                       collate_fn=lambda items: torch.stack(items))


def _brute_force_clipped_mean(model, imgs: torch.Tensor, *, seed: int, clip: float):
    """Per-image gradients of each image's own loss (one autograd.grad each), clipped, averaged; and the masks."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        per_image, _, mask = model(imgs, reduction="none")
    params = [p for p in model.parameters() if p.requires_grad]
    grads = []
    for i in range(len(imgs)):
        g = torch.autograd.grad(per_image[i], params, retain_graph=True)
        grads.append(torch.cat([x.flatten() for x in g]))
    grads = torch.stack(grads)
    norms = grads.norm(dim=1)
    factors = (clip / (norms + 1e-6)).clamp(max=1.0)
    return (grads * factors[:, None]).sum(0), norms, mask


@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
def test_opacus_clipped_per_image_gradients_equal_brute_force_on_the_mae(clipping):
    torch.manual_seed(0)
    mae = build_mae("tiny", degradations=DegradationConfig(speckle_p=0.5, gaussian_blur_p=0.5))
    reference = copy.deepcopy(mae)
    images = torch.rand(6, 1, 32, 32)
    seed = 11
    _, norms, _ = _brute_force_clipped_mean(reference, images, seed=seed, clip=1e9)
    clip = float(norms.median())  # some images clipped, some not: both branches are exercised
    expected_sum, _, expected_mask = _brute_force_clipped_mean(reference, images, seed=seed, clip=clip)
    assert (norms > clip).any() and (norms < clip).any()

    # One epoch of one batch: Poisson rate 1, so the batch is every image, in order.
    privatizer = DPPrivatizer(_plan(num_images=6, batch_size=6, noise=0.0, clip=clip, clipping=clipping))
    before = torch.cat([p.detach().flatten().clone() for p in mae.parameters()])
    module, optimizer, criterion, loader = privatizer(mae, torch.optim.SGD(mae.parameters(), lr=1.0), _loader(images, 6))
    assert privatizer.clipping_used == clipping
    (batch,) = list(loader)
    assert torch.equal(batch, images)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        per_image, _, mask = module(batch, reduction="none")
    assert torch.equal(mask, expected_mask)  # the same masks (and degradations: same RNG stream) as brute force
    loss = criterion(per_image)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    update = before - torch.cat([p.detach().flatten() for p in mae.parameters()])  # SGD lr 1: the applied gradient
    # Opacus divides the clipped sum by the expected batch size (6 here).
    torch.testing.assert_close(update, expected_sum / 6, rtol=1e-4, atol=2e-6)
    assert privatizer.steps_taken == 1
    privatizer.close()
    assert not hasattr(next(mae.parameters()), "grad_sample")  # the model is plain again for the next round


@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
def test_an_empty_poisson_batch_still_takes_a_noisy_step(clipping):
    torch.manual_seed(0)
    mae = build_mae("tiny")
    privatizer = DPPrivatizer(_plan(num_images=4, batch_size=2, noise=1.0, clipping=clipping), noise_seed=3)
    module, optimizer, criterion, _ = privatizer(mae, torch.optim.SGD(mae.parameters(), lr=1.0),
                                                 _loader(torch.rand(4, 1, 32, 32), 2))
    before = [p.detach().clone() for p in mae.parameters()]
    per_image, _, _ = module(torch.zeros(0, 1, 32, 32), reduction="none")
    loss = criterion(per_image)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, mae.parameters())]
    assert all(changed)  # noise only, but every parameter moved: the step was taken and counted
    assert all(torch.isfinite(p).all() for p in mae.parameters())
    assert privatizer.steps_taken == 1
    privatizer.close()


def test_the_poisson_loader_has_exactly_the_planned_steps_where_opacus_rounds_down():
    # Opacus derives steps as int(1 / (1 / 93)) = 92; the ledger charges 93 steps at rate 1/93.
    plan = _plan(num_images=93, batch_size=1, noise=1.0)
    privatizer = DPPrivatizer(plan)
    mae = build_mae("tiny")
    module, optimizer, criterion, loader = privatizer(mae, torch.optim.SGD(mae.parameters(), lr=0.1),
                                                      _loader(torch.rand(93, 1, 32, 32), 1))
    assert len(loader) == 93 and loader.sample_rate <= 1 / 93
    assert optimizer.expected_batch_size == 1
    privatizer.close()


def test_a_plan_for_other_data_is_refused_by_the_privatizer():
    mae = build_mae("tiny")
    privatizer = DPPrivatizer(_plan(num_images=10, batch_size=2, noise=1.0))
    with pytest.raises(ValueError, match="plan was made for 10"):
        privatizer(mae, torch.optim.SGD(mae.parameters(), lr=0.1), _loader(torch.rand(12, 1, 32, 32), 2))


def _tiny_config(**overrides) -> PretrainConfig:
    fields = dict(preset="tiny", batch_size=4, base_lr=0.05, warmup_epochs=0, epochs=1, num_workers=0,
                  degradations=DegradationConfig())
    return PretrainConfig(**{**fields, **overrides})


def test_train_local_with_dp_charges_first_counts_every_step_and_survives_empty_batches(tmp_path):
    config = _tiny_config(batch_size=1)
    torch.manual_seed(0)
    model = build_model(config)
    images = list(torch.rand(2, 1, 32, 32).unbind(0))  # 2 steps per epoch at rate 1/2: empty batches are common
    site = SiteDP(site_name="a", policy=PrivacyPolicy(), ledger_path=tmp_path / "ledger.json")
    plan = site.plan(DPConfig(enabled=True, noise_multiplier=1.0, accountant="rdp"), job="j", num_images=2,
                     batch_size=1, rounds=1, local_steps=20)
    sampling_seed = 5
    replay = torch.Generator().manual_seed(sampling_seed)
    empty = sum(int((torch.rand(2, generator=replay) < 0.5).sum() == 0) for _ in range(20))
    assert empty >= 2  # the run below meets empty batches
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with site.begin_round(plan, job_id="job-1", round_index=0, sampling_seed=sampling_seed) as dp_round:
        assert [e.kind for e in read_ledger(tmp_path / "ledger.json").entries] == ["charge"]  # charged before
        result = train_local(model=model, dataset=images, config=config, steps=20, lr=1e-3,
                             privatize=dp_round.privatize, progress=False)
        spent = dp_round.finish()
    assert result.steps == 20 and result.mean_loss == result.mean_loss  # finite mean over scored steps
    assert spent.steps == 20 and spent.clipping == "ghost" and spent.epsilon_job > 0
    entries = read_ledger(tmp_path / "ledger.json").entries
    assert [e.kind for e in entries] == ["charge", "completed"] and entries[1].steps_taken == 20
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # Next round on the same (cached) model: Opacus' hooks were removed, so it wraps cleanly again.
    with site.begin_round(plan, job_id="job-1", round_index=0) as again:
        train_local(model=model, dataset=images, config=config, steps=20, lr=1e-3, privatize=again.privatize,
                    progress=False)
        assert again.finish().epsilon_job > spent.epsilon_job  # a re-run round is charged again


def test_dp_training_lowers_the_loss_at_moderate_noise():
    config = _tiny_config(batch_size=16, degradations=None)
    torch.manual_seed(0)
    model = build_model(config)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 32), torch.linspace(0, 1, 32), indexing="ij")
    images = [torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[None] for cy, cx in torch.rand(64, 2, generator=g)]
    plan = plan_job(DPConfig(enabled=True, noise_multiplier=0.5, max_grad_norm=1.0, accountant="rdp"),
                    PrivacyPolicy(), site_name="a", job="j", num_images=64, batch_size=16, rounds=1, local_steps=60)

    def eval_loss() -> float:
        model.eval()
        with torch.random.fork_rng(), torch.no_grad():
            torch.manual_seed(1)
            value = model(torch.stack(images))[0].item()
        model.train()
        return value

    before = eval_loss()
    privatizer = DPPrivatizer(plan, noise_seed=0, sampling_seed=0)
    train_local(model=model, dataset=images, config=config, steps=60, lr=2e-3, privatize=privatizer, progress=False)
    privatizer.close()
    assert eval_loss() < 0.8 * before
