"""Downstream models: pyramid blocks, heads, frozen linear probes, layer decay, encoder loading, safetensors."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from ultrafedfm.models.downstream import (
    DownstreamSpec, build_downstream, load_downstream, load_encoder, pyramid_blocks, save_downstream, scratch_encoder,
)
from ultrafedfm.models.export import export_encoder, save_encoder
from ultrafedfm.models.mae import build_mae
from ultrafedfm.train.finetune import FinetuneConfig, build_optimizer


def test_pyramid_blocks_follow_the_paper_at_depth_12_and_spread_over_shallow_encoders():
    assert pyramid_blocks(12) == (3, 5, 7, 11)
    assert pyramid_blocks(2) == (0, 0, 1, 1)
    assert pyramid_blocks(6) == (0, 2, 3, 5)


@pytest.mark.parametrize("task,mode", [("cls", "full"), ("cls", "linear"), ("seg", "full"), ("seg", "linear")])
def test_vit_heads_give_the_right_shapes_and_linear_mode_freezes_the_encoder(task, mode):
    weights = scratch_encoder("tiny", img_size=32, seed=0)
    spec = DownstreamSpec.for_encoder(weights, task=task, classes=("a", "b", "c") if task == "cls" else (), mode=mode)
    model = build_downstream(spec, encoder=weights)
    out = model(torch.rand(2, 1, 32, 32))
    assert out.shape == ((2, 3) if task == "cls" else (2, 1, 32, 32))
    encoder = model if task == "cls" else model.encoder
    trainable_encoder = [n for n, p in encoder.named_parameters() if p.requires_grad and not n.startswith("head.")]
    assert (trainable_encoder == []) == (mode == "linear")


def test_layer_decay_scales_early_blocks_below_late_ones():
    weights = scratch_encoder("small", img_size=32, seed=0)
    spec = DownstreamSpec.for_encoder(weights, task="cls", classes=("a", "b"))
    model = build_downstream(spec, encoder=weights)
    optimizer = build_optimizer(model, FinetuneConfig(layer_decay=0.75))
    scale = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            scale[id(p)] = group["lr_scale"]
    head, first, last = model.head.weight, model.blocks[0].attn.qkv.weight, model.blocks[11].attn.qkv.weight
    assert scale[id(head)] == pytest.approx(1.0)
    assert scale[id(last)] == pytest.approx(0.75)
    assert scale[id(first)] == pytest.approx(0.75 ** 12)


def test_encoder_loads_alike_from_export_file_and_full_mae_state(tmp_path):
    torch.manual_seed(0)
    mae = build_mae("tiny", img_size=32)
    save_encoder(mae, tmp_path / "encoder.safetensors")
    torch.save(mae.state_dict(), tmp_path / "final_model.pt")
    from_file = load_encoder(tmp_path / "encoder.safetensors")
    from_mae = load_encoder(tmp_path / "final_model.pt", img_size=32)
    expected = export_encoder(mae)
    for state in (from_file.state, from_mae.state):
        assert state.keys() == expected.keys()
        assert all(torch.equal(state[k], expected[k]) for k in expected)
    assert from_mae.preset == "tiny" and from_mae.img_size == 32


def test_saved_models_reload_with_identical_outputs_and_a_card(tmp_path):
    from ultrafedfm.models.card import ModelCard

    weights = scratch_encoder("tiny", img_size=32, seed=1)
    x = torch.rand(3, 1, 32, 32)
    for task, arch in (("cls", "vit"), ("seg", "vit"), ("seg", "resnet18")):
        spec = (DownstreamSpec.for_encoder(weights, task=task, classes=("benign", "malignant") if task == "cls" else ())
                if arch == "vit" else DownstreamSpec(task=task, arch=arch, img_size=32))
        model = build_downstream(spec, encoder=weights if arch == "vit" else None).eval()
        folder = tmp_path / f"{task}_{arch}"
        save_downstream(model, spec, folder, card=ModelCard(title="t", kind=task))
        loaded, loaded_spec = load_downstream(folder)
        assert loaded_spec == spec
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x))
        assert (folder / "MODEL_CARD.md").is_file()


@pytest.mark.parametrize("task,mode", [("cls", "full"), ("cls", "linear"), ("seg", "full")])
def test_dp_compatible_networks_keep_the_encoder_weights_and_mix_no_images_of_a_batch(task, mode, tmp_path):
    weights = scratch_encoder("tiny", img_size=32, seed=0)
    spec = DownstreamSpec.for_encoder(weights, task=task, classes=("a", "b") if task == "cls" else (), mode=mode,
                                      dp_compatible=True)
    spec = dataclasses.replace(spec, drop_path=0.0)  # no stochastic depth: training mode is then deterministic
    model = build_downstream(spec, encoder=weights).train()
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    encoder = model if task == "cls" else model.encoder
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, weights.state["blocks.0.attn.qkv.weight"])
    assert not encoder.pos_embed.requires_grad and not encoder.cls_token.requires_grad
    # Per image, in training mode too: an image's output does not depend on the rest of its batch.
    x = torch.rand(4, 1, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model(x)[:1], model(x[:1]), atol=1e-5)
    save_downstream(model, spec, tmp_path / "m")
    loaded, loaded_spec = load_downstream(tmp_path / "m")
    assert loaded_spec.dp_compatible and torch.allclose(loaded(x), model.eval()(x), atol=1e-6)


def test_the_dp_upsampling_computes_what_a_2x2_stride_2_transposed_convolution_computes():
    from ultrafedfm.models.downstream.heads import PixelShuffle2x

    torch.manual_seed(0)
    transposed = torch.nn.ConvTranspose2d(6, 5, 2, stride=2)
    conv = torch.nn.Conv2d(6, 20, 1)
    with torch.no_grad():  # out[o, 2i+a, 2j+b] = sum_c W[c, o, a, b] x[c, i, j] + bias[o]
        conv.weight.copy_(transposed.weight.permute(1, 2, 3, 0).reshape(20, 6, 1, 1))
        conv.bias.copy_(transposed.bias.repeat_interleave(4))
    x = torch.rand(3, 6, 4, 5)
    torch.testing.assert_close(PixelShuffle2x()(conv(x)), transposed(x))
    assert torch.equal(PixelShuffle2x()(x[:, :4]), torch.nn.PixelShuffle(2)(x[:, :4]))
    assert PixelShuffle2x()(torch.zeros(0, 8, 3, 3)).shape == (0, 2, 6, 6)  # an empty Poisson batch
