"""MAE model: shapes per preset, masking, loss on masked patches, fixed position buffers, degradations."""
from __future__ import annotations

import math

import pytest
import torch

from ultrafedfm.models.degradations import DegradationConfig, apply_degradations
from ultrafedfm.models.mae import MaskedAutoencoder, build_mae
from ultrafedfm.models.pos_embed import sincos_pos_embed_2d
from ultrafedfm.models.presets import PRESETS


@pytest.fixture
def tiny() -> MaskedAutoencoder:
    torch.manual_seed(0)
    return build_mae("tiny")


@pytest.mark.parametrize("preset,batch", [("tiny", 3), ("small", 2)])
def test_forward_backward_shapes(preset, batch):
    torch.manual_seed(0)
    mae = build_mae(preset)
    p = PRESETS[preset]
    num_patches = (p.img_size // p.patch_size) ** 2
    imgs = torch.rand(batch, 1, p.img_size, p.img_size)
    loss, pred, mask = mae(imgs)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert pred.shape == (batch, num_patches, p.patch_size**2)
    assert mask.shape == (batch, num_patches)
    assert torch.all(mask.sum(dim=1) == num_patches - int(num_patches * 0.25))
    loss.backward()
    missing = [n for n, prm in mae.named_parameters() if prm.grad is None or not torch.isfinite(prm.grad).all()]
    assert not missing, f"no finite gradient for {missing}"


def test_base_is_the_paper_model_and_runs():
    torch.manual_seed(0)
    mae = build_mae("base").eval()
    assert mae.preset.embed_dim == 768 and len(mae.encoder.blocks) == 12 and mae.preset.num_heads == 12
    assert mae.preset.decoder_embed_dim == 512 and len(mae.decoder.blocks) == 8
    assert mae.decoder.blocks[0].attn.num_heads == 16
    assert mae.mask_ratio == 0.75 and mae.norm_pix_loss
    with torch.no_grad():
        loss, pred, mask = mae(torch.rand(1, 1, 224, 224))
    assert pred.shape == (1, 196, 256) and mask.shape == (1, 196) and int(mask.sum()) == 147
    assert torch.isfinite(loss)


def test_position_embeddings_are_fixed_buffers(tiny):
    param_names = {n for n, _ in tiny.named_parameters()}
    assert not any("pos_embed" in n for n in param_names)
    buffers = dict(tiny.named_buffers())
    assert buffers["pos_embed"].shape == (1, 1 + 16, 64)
    assert buffers["decoder.pos_embed"].shape == (1, 1 + 16, 32)
    assert not any("pos_embed" in k for k in tiny.state_dict()), "fixed buffers must not travel in state_dict"
    pe = buffers["pos_embed"][0]
    assert torch.all(pe[0] == 0), "class slot is zero (timm layout)"
    # Patch (row 1, col 2) -> token 1 + 1*4 + 2; first channel is sin(col * 1), channel D/2 is sin(row * 1).
    token = pe[1 + 1 * 4 + 2]
    assert token[0].item() == pytest.approx(math.sin(2.0), abs=1e-6)
    assert token[32].item() == pytest.approx(math.sin(1.0), abs=1e-6)
    assert token[16].item() == pytest.approx(math.cos(2.0), abs=1e-6)


def test_sincos_rejects_bad_width():
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(30, 4)


def test_random_masking_keeps_and_restores(tiny):
    x = torch.arange(2 * 16 * 3, dtype=torch.float32).reshape(2, 16, 3)
    kept, mask, ids_restore = tiny.random_masking(x, 0.75)
    assert kept.shape == (2, 4, 3)
    for n in range(2):
        visible = x[n][mask[n] == 0]
        # The kept tokens are exactly the unmasked ones (in shuffled order).
        assert sorted(kept[n, :, 0].tolist()) == sorted(visible[:, 0].tolist())
        assert sorted(ids_restore[n].tolist()) == list(range(16))


def test_loss_scores_only_masked_patches(tiny):
    imgs = torch.rand(2, 1, 32, 32)
    loss, pred, mask = tiny(imgs)
    changed = pred.detach().clone()
    changed[mask == 0] += 10.0  # visible patches: must not matter
    assert tiny.forward_loss(imgs, changed, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    changed[mask == 1] += 1.0  # masked patches: must matter
    assert tiny.forward_loss(imgs, changed, mask).item() > loss.item() + 0.5


def test_norm_pix_loss_targets_normalised_patches():
    torch.manual_seed(0)
    plain = build_mae("tiny", norm_pix_loss=False)
    normed = build_mae("tiny", norm_pix_loss=True)
    imgs = torch.rand(1, 1, 32, 32) * 0.1 + 0.5
    mask = torch.ones(1, 16)
    target = plain.patchify(imgs)
    assert plain.forward_loss(imgs, target, mask).item() == pytest.approx(0.0, abs=1e-10)
    z = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    assert normed.forward_loss(imgs, z, mask).item() == pytest.approx(0.0, abs=1e-8)
    assert normed.forward_loss(imgs, target, mask).item() > 0.1


def test_patchify_roundtrip(tiny):
    imgs = torch.rand(2, 1, 32, 32)
    patches = tiny.patchify(imgs)
    assert patches.shape == (2, 16, 64)
    assert torch.equal(patches[0, 1], imgs[0, 0, 0:8, 8:16].reshape(-1))  # row-major patch order
    assert torch.equal(tiny.unpatchify(patches), imgs)


def test_no_weight_decay_names_are_parameters(tiny):
    names = {n for n, _ in tiny.named_parameters()}
    assert tiny.no_weight_decay() <= names
    assert "cls_token.token" in tiny.no_weight_decay()


def test_encoder_sees_degraded_image_but_loss_targets_clean():
    config = DegradationConfig(motion_blur_p=1.0, gaussian_blur_p=1.0, salt_pepper_p=1.0, speckle_p=1.0)
    torch.manual_seed(0)
    mae = build_mae("tiny", degradations=config).train()
    imgs = torch.rand(4, 1, 32, 32)
    torch.manual_seed(7)
    loss, pred, mask = mae(imgs)
    torch.manual_seed(7)
    degraded = apply_degradations(imgs, config)  # the same draws forward made first
    assert not torch.allclose(degraded, imgs)
    assert loss.item() == pytest.approx(mae.forward_loss(imgs, pred, mask).item(), rel=1e-6)
    assert loss.item() != pytest.approx(mae.forward_loss(degraded, pred, mask).item(), rel=1e-3)
    # The encoder input was the degraded image: redo the encoder on it with the same masking noise.
    torch.manual_seed(7)
    apply_degradations(imgs, config)
    latent, _, ids_restore = mae.forward_encoder(degraded, mae.mask_ratio)
    assert torch.allclose(mae.forward_decoder(latent, ids_restore), pred, atol=1e-5)


def test_degradations_off_in_eval_mode():
    config = DegradationConfig(speckle_p=1.0, salt_pepper_p=1.0)
    torch.manual_seed(0)
    with_deg = build_mae("tiny", degradations=config).eval()
    without = build_mae("tiny")
    without.load_state_dict(with_deg.state_dict())
    without.eval()
    imgs = torch.rand(2, 1, 32, 32)
    torch.manual_seed(3)
    a = with_deg(imgs)[0]
    torch.manual_seed(3)
    b = without(imgs)[0]
    assert torch.equal(a, b)


def test_mask_ratio_validated():
    with pytest.raises(ValueError, match="mask_ratio"):
        build_mae("tiny", mask_ratio=1.0)


def test_img_size_override_and_validation():
    mae = build_mae("tiny", img_size=48)
    assert mae.num_patches == 36 and mae.pos_embed.shape == (1, 37, 64)
    with pytest.raises(ValueError, match="multiple of"):
        build_mae("tiny", img_size=30)
