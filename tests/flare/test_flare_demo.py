"""`ultrafedfm demo` end to end, at a reduced size (the full default: see docs/federation.md)."""
from __future__ import annotations

import json
import logging

import pytest
import timm
import torch
from safetensors.torch import load_file

from ultrafedfm.cli.demo import run_demo
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.flare.deploy.simulation import LEFT_RUNNING_WARNING


@pytest.mark.slow
def test_demo_runs_three_sites_and_its_loss_table_comes_from_each_sites_own_figures(tmp_path, capsys, caplog):
    caplog.set_level(logging.WARNING, logger="ultrafedfm.flare.deploy.simulation")
    out = tmp_path / "demo"
    assert run_demo(out=out, rounds=2, images_per_site=6) == 0
    printed = capsys.readouterr().out
    assert "server: round 1/2  sites 3/3" in printed and "server: round 2/2  sites 3/3" in printed
    assert "each site's own figure, read from the site's disk" in printed
    assert "site-1     site-2     site-3     global" in printed
    state = RunState(out / "run", "demo")
    rows = state.read_rounds()
    assert len(rows) == 2 and all(r["applied"] for r in rows)
    assert all(not {"loss", "num_samples", "train_seconds"} & set(r) for r in rows)  # the server: aggregates only
    own = {n: read_site_figures(site_figures_path(out / "sites" / n / "cache")) for n in ("site-1", "site-2", "site-3")}
    assert all(len(f) == 2 and all(x.masked for x in f) for f in own.values())
    assert own["site-1"][0].num_samples > own["site-2"][0].num_samples  # + pydicom's US files
    assert rows[0]["total_images"] == sum(f[0].num_samples for f in own.values())
    # The table's row for round 2 prints each site's own recorded loss, then the server's global loss.
    line = next(t for t in printed.splitlines() if t.split()[:1] == ["2"])
    assert line.split()[1:] == [f"{own[n][1].loss:.4f}" for n in ("site-1", "site-2", "site-3")] + \
        [f"{rows[1]['global_loss']:.4f}"]
    # The exported encoder loads into timm with only the classification head missing.
    meta = json.loads((out / "run" / "demo" / "encoder.json").read_text())
    vit = timm.create_model(meta["timm_model"], pretrained=False, in_chans=1, num_classes=2, **meta["timm_kwargs"])
    encoder = load_file(out / "run" / "demo" / "encoder.safetensors")
    missing, unexpected = vit.load_state_dict(encoder, strict=False)
    assert not unexpected and all(k.startswith("head.") for k in missing)
    # Nothing outlived the simulator's own shutdown (run_simulation logs it before ending it;
    # tests/flare/test_flare_simulation.py shows that warning appears when something is left).
    assert LEFT_RUNNING_WARNING not in caplog.text
    assert run_demo(out=out) == 2  # refuses to overwrite a previous run
