"""The MAE under real Opacus (hooks mode): per-sample gradients for every trainable parameter."""
from __future__ import annotations

import warnings

import pytest
import torch
from opacus import GradSampleModule, PrivacyEngine

from ultrafedfm.models.degradations import DegradationConfig
from ultrafedfm.models.mae import build_mae


def test_grad_sample_module_gives_per_sample_grads_for_every_parameter():
    torch.manual_seed(0)
    mae = build_mae("tiny", degradations=DegradationConfig())
    model = GradSampleModule(mae)  # hooks mode, loss_reduction="mean"
    imgs = torch.rand(3, 1, 32, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "full backward hook ... no inputs require gradients"
        loss, _, _ = model(imgs)
        loss.backward()
    for name, param in mae.named_parameters():
        assert param.grad_sample is not None, f"no per-sample gradient for {name}"
        assert param.grad_sample.shape == (3, *param.shape), name
        # With a mean-reduced loss, the per-sample gradients average to the batch gradient.
        assert torch.allclose(param.grad_sample.mean(0), param.grad, atol=1e-6, rtol=1e-4), name


def test_make_private_hooks_mode_trains_a_step():
    torch.manual_seed(0)
    mae = build_mae("tiny")
    optimizer = torch.optim.AdamW(mae.parameters(), lr=1e-3)
    loader = torch.utils.data.DataLoader(torch.rand(4, 1, 32, 32), batch_size=2)
    before = {n: p.detach().clone() for n, p in mae.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Secure RNG turned off": fine for a test
        model, optimizer, loader = PrivacyEngine().make_private(
            module=mae, optimizer=optimizer, data_loader=loader, noise_multiplier=0.5, max_grad_norm=1.0,
            poisson_sampling=False, grad_sample_mode="hooks",
        )
        for imgs in loader:
            loss, _, _ = model(imgs)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    unchanged = [n for n, p in mae.named_parameters() if torch.equal(p, before[n])]
    assert not unchanged, f"DP step left {unchanged} unchanged"
    assert torch.isfinite(loss)


@pytest.mark.parametrize("module_name", ["cls_token", "decoder.mask_token"])
def test_token_modules_are_deterministic_and_buffer_free(module_name):
    mae = build_mae("tiny")
    module = mae.get_submodule(module_name)
    assert list(module.buffers()) == []
    x = torch.rand(2, 5, module.token.shape[-1])
    assert torch.equal(module(x), module(x))


def test_per_image_losses_are_each_images_own_masked_error_and_average_to_the_batch_loss():
    torch.manual_seed(0)
    mae = build_mae("tiny", degradations=DegradationConfig())
    imgs = torch.rand(4, 1, 32, 32)
    with torch.random.fork_rng():
        torch.manual_seed(3)
        per_image, pred, mask = mae(imgs, reduction="none")
    with torch.random.fork_rng():
        torch.manual_seed(3)
        batch_loss, _, _ = mae(imgs)
    assert per_image.shape == (4,)
    torch.testing.assert_close(per_image.mean(), batch_loss)
    for i in range(4):  # image i alone, scored on its own masked patches
        own = mae.forward_loss(imgs[i:i + 1], pred[i:i + 1], mask[i:i + 1])
        torch.testing.assert_close(per_image[i], own)
    with pytest.raises(ValueError, match="reduction"):
        mae.forward_loss(imgs, pred, mask, reduction="sum")


def test_an_empty_batch_gives_no_losses_and_no_error():
    mae = build_mae("tiny", degradations=DegradationConfig()).train()
    per_image, pred, mask = mae(torch.zeros(0, 1, 32, 32), reduction="none")
    assert per_image.shape == (0,) and pred.shape[0] == 0 and mask.shape[0] == 0
