"""``ultrafedfm pretrain`` on a real site cache: writes checkpoint and timm encoder, resumes when re-run."""
from __future__ import annotations

import json

import numpy as np
import timm
import torch
from safetensors.torch import load_file

from PIL import Image

from ultrafedfm.cli import main
from ultrafedfm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint


def _make_cache(root, n: int = 12, size: int = 32) -> None:
    """A real site cache, built by `ultrafedfm ingest --images` from a PNG folder with labels.csv."""
    folder = root.parent / "pngs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    rows = ["file,label"]
    for i in range(n):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(folder / f"img{i}.png")
        rows.append(f"img{i}.png,benign")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n")
    assert main(["ingest", "--images", str(folder), "--cache", str(root), "--image-size", str(size),
                 "--workers", "1", "--no-progress"]) == 0


def test_pretrain_command_trains_exports_and_resumes(tmp_path):
    cache, out = tmp_path / "cache", tmp_path / "run"
    _make_cache(cache)
    config = tmp_path / "pretrain.yaml"
    config.write_text("pretrain:\n  batch_size: 4\n  num_workers: 0\n  warmup_epochs: 0.5\n  checkpoint_every: 100\n")
    args = ["pretrain", "--cache", str(cache), "--out", str(out), "--config", str(config), "--preset", "tiny",
            "--no-progress"]
    assert main(args + ["--epochs", "1"]) == 0
    assert load_checkpoint(out / "checkpoint" / CHECKPOINT_NAME)["step"] == 3
    meta = json.loads((out / "encoder.json").read_text())
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2, **meta["timm_kwargs"])
    missing = vit.load_state_dict(load_file(out / "encoder.safetensors"), strict=False).missing_keys
    assert sorted(missing) == ["head.bias", "head.weight"]
    first = load_file(out / "encoder.safetensors")["cls_token"]

    # Re-run with more epochs: continues from step 3 instead of restarting.
    assert main(args + ["--epochs", "2"]) == 0
    assert load_checkpoint(out / "checkpoint" / CHECKPOINT_NAME)["step"] == 6
    assert not torch.equal(first, load_file(out / "encoder.safetensors")["cls_token"])


def test_pretrain_command_reports_a_missing_cache(tmp_path):
    assert main(["pretrain", "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "o"), "--preset", "tiny",
                 "--no-progress"]) == 2
