"""`ultrafedfm demo` end to end, at a reduced size (the full default runs in ~2-3 min)."""
from __future__ import annotations

import json

import pytest
import timm
import torch

from ultrafedfm.cli.demo import run_demo
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.flare.deploy.simulation import workspace_processes


@pytest.mark.slow
def test_demo_runs_three_sites_and_writes_model_encoder_and_table(tmp_path, capsys):
    out = tmp_path / "demo"
    assert run_demo(out=out, rounds=2, images_per_site=6) == 0
    printed = capsys.readouterr().out
    assert "round 1/2  sites 3/3" in printed and "round 2/2  sites 3/3" in printed
    assert "site-1     site-2     site-3     global" in printed
    state = RunState(out / "run", "demo")
    rows = state.read_rounds()
    assert len(rows) == 2 and all(r["applied"] for r in rows)
    assert rows[0]["num_samples"]["site-1"] > rows[0]["num_samples"]["site-2"]  # + pydicom's US files
    # The exported encoder loads into timm with only the classification head missing.
    meta = json.loads((out / "run" / "demo" / "encoder.json").read_text())
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2, **meta["timm_kwargs"])
    encoder = torch.load(out / "run" / "demo" / "encoder.pth", weights_only=True)
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    assert workspace_processes(out / "flare") == []
    assert run_demo(out=out) == 2  # refuses to overwrite a previous run
