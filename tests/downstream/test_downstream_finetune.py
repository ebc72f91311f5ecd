"""Fine-tuning: a tiny run learns generated lesions; the federated-site update; the demo's linear probe."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from ultrafedfm.data.labelled import LabelledImages
from ultrafedfm.downstream.experiment import run_finetune
from ultrafedfm.downstream.splits import grouped_split
from ultrafedfm.downstream.synthetic import render_lesions
from ultrafedfm.models.downstream import DownstreamSpec, build_downstream, scratch_encoder
from ultrafedfm.train.finetune import FinetuneConfig
from ultrafedfm.train.finetune_local import finetune_local

CLASSES = ("benign", "malignant")


@pytest.fixture(scope="module")
def lesions() -> LabelledImages:
    images, masks, labels, scenes = render_lesions(n=180, seed=5, size=32)
    return LabelledImages(
        images=torch.from_numpy(images).unsqueeze(1), labels=torch.tensor([CLASSES.index(x) for x in labels]),
        classes=CLASSES, masks=torch.from_numpy(masks).unsqueeze(1), has_mask=np.ones(len(labels), dtype=bool),
        groups=[f"scene{s}" for s in scenes], files=[str(i) for i in range(len(labels))], source="generated")


def test_tiny_finetune_raises_auroc_above_chance_on_generated_lesions(lesions):
    split = grouped_split(lesions.groups, lesions.labels.numpy(), val_fraction=0.2, test_fraction=0.3, seed=0)
    config = FinetuneConfig(epochs=25, min_steps=0, batch_size=16, base_lr=5e-2, warmup_epochs=1, max_evals=4)
    run = run_finetune(lesions, split, task="cls", config=config, encoder=scratch_encoder("tiny", img_size=32, seed=0),
                       seed=0, progress=False, n_boot=300)
    low, _ = run.test.intervals["auroc_macro"]
    assert run.test.metrics["auroc_macro"] > 0.7 and low > 0.55, (run.test.metrics, low)
    # Selection used validation only: the kept step is one of the validation passes.
    assert run.fit.best_step in [h["step"] for h in run.fit.history]


def test_finetune_local_returns_a_delta_and_leaves_frozen_weights_alone(lesions):
    weights = scratch_encoder("tiny", img_size=32, seed=0)
    spec = DownstreamSpec.for_encoder(weights, task="cls", classes=CLASSES, mode="linear")
    model = build_downstream(spec, encoder=weights)
    global_state = {k: v.clone() for k, v in model.state_dict().items()}
    view = lesions.view(np.arange(40), task="cls")
    update = finetune_local(model=model, global_state=global_state, dataset=view,
                            config=FinetuneConfig(batch_size=8), lr=1e-2, steps=3, generator_seed=7)
    assert update.steps == 3 and update.num_samples == 40
    assert update.delta["head.1.weight"].abs().sum() > 0  # the probe's linear layer learned
    assert update.delta["blocks.0.attn.qkv.weight"].abs().sum() == 0  # the frozen encoder did not move
    assert "head.0.num_batches_tracked" in update.counters  # integer buffers are not averaged
    # The model now holds global + delta, for every float entry.
    state = model.state_dict()
    assert torch.allclose(state["head.1.weight"], global_state["head.1.weight"] + update.delta["head.1.weight"])
    again = finetune_local(model=model, global_state=global_state, dataset=view, config=FinetuneConfig(batch_size=8),
                           lr=1e-2, steps=3, generator_seed=7)
    assert torch.equal(again.delta["head.1.weight"], update.delta["head.1.weight"])  # same seed, same update


def test_linear_probe_comparison_reports_both_encoders(tmp_path):
    from ultrafedfm.downstream.probe import format_probe_comparison, linear_probe_comparison
    from ultrafedfm.models.export import save_encoder
    from ultrafedfm.models.mae import build_mae

    torch.manual_seed(0)
    save_encoder(build_mae("tiny", img_size=32), tmp_path / "encoder.safetensors")
    result = linear_probe_comparison(tmp_path / "encoder.safetensors", n_train=60, n_test=60)
    for name in ("pretrained", "random_init"):
        low, high = result[name]["ci95"]
        assert 0.0 <= low <= result[name]["auroc"] <= high <= 1.0
    assert result["gain"] == pytest.approx(result["pretrained"]["auroc"] - result["random_init"]["auroc"])
    assert "random-init encoder" in format_probe_comparison(result)
