"""DP-SGD through the fine-tuning trainer: per-image clipping equals brute force on the downstream networks,
empty Poisson batches still take their noisy step, and a network Opacus cannot train privately is refused."""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from ultrafedfm.federation.finetune import FinetuneSettings, build_finetune_model, downstream_spec, finetune_config
from ultrafedfm.privacy.dp.plan import DPPlan
from ultrafedfm.privacy.dp.privatizer import DPPrivatizer
from ultrafedfm.models.downstream.spec import build_downstream
from ultrafedfm.train.finetune import per_image_loss_fn, train_steps

SETTINGS = {"cls": FinetuneSettings(task="cls", classes=("benign", "malignant", "normal")),
            "seg": FinetuneSettings(task="seg")}


def _plan(*, num_images: int, batch_size: int, noise: float, clip: float = 1.0, clipping: str = "ghost") -> DPPlan:
    steps = -(-num_images // batch_size)
    return DPPlan(job="test", noise_multiplier=noise, max_grad_norm=clip, delta=1e-5, sample_rate=1 / steps,
                  steps_per_epoch=steps, steps_per_round=steps, rounds=1, num_images=num_images,
                  batch_size=batch_size, accountant="rdp", clipping=clipping, target_epsilon=None, planned_epsilon=1.0)


def _model(task: str) -> torch.nn.Module:
    # No stochastic depth: brute force and Opacus must run the same function.
    spec = dataclasses.replace(downstream_spec(SETTINGS[task], preset="tiny", img_size=32, dp_compatible=True),
                               drop_path=0.0)
    torch.manual_seed(0)
    return build_downstream(spec).train()


def _items(task: str, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    imgs = torch.rand(n, 1, 32, 32, generator=g)
    if task == "cls":
        return [(imgs[i], torch.tensor(i % 3)) for i in range(n)]
    return [(imgs[i], (imgs[i] > 0.6).float()) for i in range(n)]


def _loader(items, batch_size: int) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(items, batch_size=batch_size, shuffle=False)


@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_opacus_clipped_per_image_gradients_equal_brute_force_on_the_fine_tuning_networks(task, clipping):
    model = _model(task)
    reference = copy.deepcopy(model)
    items = _items(task, 5)
    imgs, target = torch.stack([x for x, _ in items]), torch.stack([y for _, y in items])
    loss_fn = per_image_loss_fn(finetune_config(SETTINGS[task], batch_size=5, base_lr=1e-3, weight_decay=0.0, seed=0))
    params = [p for p in reference.parameters() if p.requires_grad]
    per_image = loss_fn(reference(imgs), target)
    grads = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(per_image[i], params, retain_graph=True)])
                         for i in range(len(items))])
    norms = grads.norm(dim=1)
    clip = float(norms.median())  # some images clipped, some not
    assert (norms > clip).any() and (norms < clip).any()
    expected = (grads * (clip / (norms + 1e-6)).clamp(max=1.0)[:, None]).sum(0) / len(items)

    trainable = [p for p in model.parameters() if p.requires_grad]
    privatizer = DPPrivatizer(_plan(num_images=5, batch_size=5, noise=0.0, clip=clip, clipping=clipping))
    module, optimizer, criterion, _ = privatizer(model, torch.optim.SGD(trainable, lr=1.0), _loader(items, 5))
    assert privatizer.clipping_used == clipping  # no fallback: every layer has an Opacus per-sample rule
    before = torch.cat([p.detach().flatten().clone() for p in trainable])
    loss = criterion(loss_fn(module(imgs), target))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    update = before - torch.cat([p.detach().flatten() for p in trainable])  # SGD at lr 1: the applied gradient
    torch.testing.assert_close(update, expected, rtol=1e-4, atol=2e-6)
    privatizer.close()


@pytest.mark.parametrize("clipping", ["ghost", "hooks"])
@pytest.mark.parametrize("task", ["cls", "seg"])
def test_an_empty_poisson_batch_takes_a_noise_only_step_in_the_fine_tuning_trainer(task, clipping):
    model = _model(task)
    config = finetune_config(SETTINGS[task], batch_size=2, base_lr=1e-3, weight_decay=0.0, seed=0)
    items = _items(task, 4)
    privatizer = DPPrivatizer(_plan(num_images=4, batch_size=2, noise=1.0, clipping=clipping), noise_seed=3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    module, optimizer, criterion, _ = privatizer(model, torch.optim.SGD(trainable, lr=1.0), _loader(items, 2))
    x, y = items[0]
    empty_batch = (torch.zeros(0, *x.shape), torch.zeros(0, *y.shape, dtype=y.dtype))  # what Opacus yields then
    empty = torch.utils.data.DataLoader(items, batch_sampler=[[]], collate_fn=lambda _: empty_batch)
    before = [p.detach().clone() for p in trainable]
    result = train_steps(module, empty, optimizer, config, steps=1, lr=1.0, device=torch.device("cpu"),
                         criterion=criterion)
    assert result.steps == 1 and privatizer.steps_taken == 1
    assert all(not torch.equal(b, p) for b, p in zip(before, trainable))  # noise moved every trainable parameter
    assert all(torch.isfinite(p).all() for p in trainable)
    privatizer.close()


def test_dp_refuses_a_network_with_batchnorm_before_any_step_and_names_the_layers():
    model = build_finetune_model(SETTINGS["seg"], preset="tiny", img_size=32, seed=0)  # built for plain training
    privatizer = DPPrivatizer(_plan(num_images=4, batch_size=2, noise=1.0))
    with pytest.raises(ValueError, match=r"7 BatchNorm layers \(pyramid\.0\.1, decoder\.fuse\.0\.1.*dp_compatible"):
        privatizer(model, torch.optim.SGD(model.parameters(), lr=0.1), _loader(_items("seg", 4), 2))
    assert privatizer.steps_taken == 0


@pytest.mark.parametrize("task", ["cls", "seg"])
def test_the_per_image_loss_is_the_plain_training_loss_of_each_image_alone(task):
    from ultrafedfm.train.finetune import _loss_fn

    config = finetune_config(SETTINGS[task], batch_size=4, base_lr=1e-3, weight_decay=0.0, seed=0)
    items = _items(task, 4)
    target = torch.stack([y for _, y in items])
    logits = torch.randn(4, 3) if task == "cls" else torch.randn(4, 1, 32, 32)
    per_image = per_image_loss_fn(config)(logits, target)
    alone = torch.stack([_loss_fn(config)(logits[i:i + 1], target[i:i + 1]) for i in range(4)])
    assert per_image.shape == (4,)
    torch.testing.assert_close(per_image, alone)
