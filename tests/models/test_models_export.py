"""Encoder export: loads into timm.create_model with only head.* missing, same features as ours."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from ultrafedfm.models.export import export_encoder, save_encoder, timm_model_kwargs, timm_model_name
from ultrafedfm.models.mae import build_mae


@pytest.mark.parametrize("preset,name", [
    ("tiny", "vit_tiny_patch16_224"), ("small", "vit_small_patch16_224"), ("base", "vit_base_patch16_224"),
])
def test_export_loads_into_timm_with_only_head_missing(preset, name):
    torch.manual_seed(0)
    mae = build_mae(preset)
    assert timm_model_name(mae) == name
    vit = timm.create_model(name, pretrained=False, in_chans=1, num_classes=3, **timm_model_kwargs(preset))
    result = vit.load_state_dict(export_encoder(mae), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"]
    assert result.unexpected_keys == []


def test_timm_features_equal_our_encoder():
    torch.manual_seed(0)
    mae = build_mae("tiny").eval()
    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, in_chans=1, num_classes=2,
                            **timm_model_kwargs(mae)).eval()
    vit.load_state_dict(export_encoder(mae), strict=False)
    imgs = torch.rand(3, 1, 32, 32)
    with torch.no_grad():
        theirs = vit.forward_features(imgs)
        ours = mae.forward_features(imgs)
        latent, mask, ids_restore = mae.forward_encoder(imgs, 0.0)
    assert torch.allclose(theirs, ours, atol=1e-5)
    # The masked path with nothing masked gives the same tokens, once unshuffled.
    assert mask.sum() == 0
    index = ids_restore.unsqueeze(-1).expand(-1, -1, latent.shape[-1])
    unshuffled = torch.cat([latent[:, :1], torch.gather(latent[:, 1:], 1, index)], dim=1)
    assert torch.allclose(theirs, unshuffled, atol=1e-5)


def test_save_encoder_writes_weights_and_timm_description(tmp_path):
    torch.manual_seed(0)
    mae = build_mae("tiny", img_size=48)
    path = save_encoder(mae, tmp_path / "out" / "encoder.pth")
    meta = json.loads((tmp_path / "out" / "encoder.json").read_text())
    assert meta["timm_model"] == "vit_tiny_patch16_224" and meta["timm_kwargs"]["img_size"] == 48
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2, **meta["timm_kwargs"])
    state = torch.load(path, weights_only=True)
    assert sorted(vit.load_state_dict(state, strict=False).missing_keys) == ["head.bias", "head.weight"]
    assert torch.equal(vit.cls_token, mae.cls_token.token.detach())


def test_safetensors_encoder_loads_into_timm_with_the_card_beside_it(tmp_path):
    from safetensors.torch import load_file

    from ultrafedfm.models.card import Metric, ModelCard

    torch.manual_seed(0)
    mae = build_mae("tiny", img_size=48)
    card = ModelCard(title="test encoder", kind="encoder", preset="tiny", rounds=3, privacy="secure aggregation",
                     data=("site-1: 10 images",), metrics={"probe_auroc": Metric(0.8, 0.7, 0.9, n=40)})
    path = save_encoder(mae, tmp_path / "encoder.safetensors", card=card)
    meta = json.loads((tmp_path / "encoder.json").read_text())
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2, **meta["timm_kwargs"])
    result = vit.load_state_dict(load_file(str(path)), strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and result.unexpected_keys == []
    assert torch.equal(vit.pos_embed, mae.pos_embed)
    assert meta["card"]["rounds"] == 3
    text = (tmp_path / "encoder.md").read_text()
    assert "secure aggregation" in text and "0.800 (95% CI 0.700-0.900)" in text


def test_safetensors_file_alone_describes_its_architecture(tmp_path):
    from ultrafedfm.models.export import load_encoder_file

    torch.manual_seed(0)
    mae = build_mae("tiny", img_size=48)
    path = save_encoder(mae, tmp_path / "encoder.safetensors")
    (tmp_path / "encoder.json").unlink()  # only the weights file travels
    state, meta = load_encoder_file(path)
    assert meta["timm_kwargs"]["img_size"] == 48 and meta["timm_model"] == "vit_tiny_patch16_224"
    assert torch.equal(state["cls_token"], mae.cls_token.token.detach())
    assert not (tmp_path / "encoder.md").exists()  # no card asked for, none written
