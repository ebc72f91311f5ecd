"""The local trainer: learns, resumes exactly, stops loudly, is reproducible, plugs into Opacus."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from opacus import PrivacyEngine

from ultrafedfm.config import ConfigError, load_config
from ultrafedfm.models.degradations import DegradationConfig
from ultrafedfm.train.checkpoint import CHECKPOINT_NAME, load_checkpoint
from ultrafedfm.train.pretrain import NonFiniteLossError, PretrainConfig, build_model, train_local
from ultrafedfm.train.schedule import WarmupCosineLr


def blob_images(n: int, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    """Smooth random blobs with multiplicative speckle: (1, size, size) in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    images = []
    for _ in range(n):
        img = torch.zeros(size, size)
        for _ in range(3):
            cy, cx = torch.rand(2, generator=g)
            s = 0.05 + 0.15 * torch.rand(1, generator=g)
            img += torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * s**2))
        img = img / img.max() * (1 + 0.2 * torch.randn(size, size, generator=g))
        images.append(img.clamp(0, 1)[None])
    return images


def tiny_config(**overrides) -> PretrainConfig:
    fields = dict(preset="tiny", batch_size=8, base_lr=0.05, warmup_epochs=1, epochs=2, num_workers=0,
                  checkpoint_every=2, degradations=DegradationConfig())
    return PretrainConfig(**{**fields, **overrides})


def fresh_model(config: PretrainConfig, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(config)


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict, b: dict) -> None:
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"weights differ: {different[:5]}"


def eval_loss(model, images) -> float:
    model.eval()
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(123)
        return model(torch.stack(images))[0].item()


def test_loss_decreases_on_synthetic_images():
    config = tiny_config(batch_size=16, degradations=None)
    model = fresh_model(config)
    images = blob_images(48)
    before = eval_loss(model, images)
    result = train_local(model=model, dataset=images, config=config, epochs=10, progress=False)
    after = eval_loss(model, images)
    assert result.steps == 30 and result.epochs_completed == 10 and result.num_samples == 48
    assert math.isfinite(result.mean_loss) and result.seconds > 0
    assert after < 0.8 * before, (before, after)


class _Crash(Exception):
    pass


class _CrashingDataset(torch.utils.data.Dataset):
    """Raises after ``crash_after`` items were read: a run killed in the middle."""

    def __init__(self, images, crash_after: int):
        self.images, self.crash_after, self.reads = images, crash_after, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        if self.reads > self.crash_after:
            raise _Crash
        return self.images[i]


def test_resume_after_interruption_equals_uninterrupted_run(tmp_path):
    config = tiny_config(checkpoint_every=2)  # 20 images, batch 8: 3 steps per epoch (8, 8, 4)
    images = blob_images(20)
    reference = fresh_model(config)
    train_local(model=reference, dataset=images, config=config, steps=7, progress=False)

    interrupted = fresh_model(config)
    with pytest.raises(_Crash):  # dies in step 5 (reads 37..44); last checkpoint at step 4
        train_local(model=interrupted, dataset=_CrashingDataset(images, crash_after=36), config=config, steps=7,
                    checkpoint_dir=tmp_path, progress=False)
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 4

    resumed = fresh_model(config, seed=99)  # other initial weights: the checkpoint's must win
    result = train_local(model=resumed, dataset=images, config=config, steps=7, checkpoint_dir=tmp_path,
                         progress=False)
    assert result.resumed_from_step == 4 and result.steps == 7
    assert_same_weights(weights(resumed), weights(reference))
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 7

    # Re-running a finished run trains nothing more; resume=False starts over.
    again = train_local(model=resumed, dataset=images, config=config, steps=7, checkpoint_dir=tmp_path,
                        progress=False)
    assert again.resumed_from_step == 7
    assert_same_weights(weights(resumed), weights(reference))
    restarted = fresh_model(config)
    train_local(model=restarted, dataset=images, config=config, steps=7, checkpoint_dir=tmp_path, resume=False,
                progress=False)
    assert_same_weights(weights(restarted), weights(reference))


def test_same_seed_same_weights_other_seed_other_weights():
    config = tiny_config()
    images = blob_images(16)
    runs = []
    for seed in (5, 5, 6):
        model = fresh_model(config)
        train_local(model=model, dataset=images, config=config, steps=3, generator_seed=seed, progress=False)
        runs.append(weights(model))
    assert_same_weights(runs[0], runs[1])
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0])


def test_callers_rng_is_untouched():
    config = tiny_config()
    model = build_model(config)
    torch.manual_seed(42)
    state = torch.get_rng_state()
    train_local(model=model, dataset=blob_images(8), config=config, steps=1, progress=False)
    assert torch.equal(torch.get_rng_state(), state)


class _NaNAfter(torch.utils.data.Dataset):
    def __init__(self, images, after: int):
        self.images, self.after, self.reads = images, after, 0

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        self.reads += 1
        return self.images[i] * (math.nan if self.reads > self.after else 1.0)


def test_non_finite_loss_stops_and_names_the_step():
    config = tiny_config(batch_size=4)
    with pytest.raises(NonFiniteLossError, match="step 2") as info:
        train_local(model=fresh_model(config), dataset=_NaNAfter(blob_images(16), after=8), config=config, steps=4,
                    progress=False)
    assert info.value.step == 2


def test_lr_schedule_and_weight_decay_groups_reach_the_optimizer():
    config = tiny_config(batch_size=4, base_lr=0.064)  # effective lr 0.064 * 4 / 256 = 1e-3
    assert config.lr == pytest.approx(1e-3)
    seen = []

    def capture(model, optimizer, loader):
        seen.append(optimizer)
        return model, optimizer, loader

    model = fresh_model(config)
    train_local(model=model, dataset=blob_images(12), config=config, epochs=2, privatize=capture, progress=False)
    optimizer = seen[0]
    expected = WarmupCosineLr(peak_lr=1e-3, total_steps=6, warmup_steps=3)(5)
    assert all(g["lr"] == pytest.approx(expected) for g in optimizer.param_groups)
    assert optimizer.defaults["betas"] == (0.9, 0.95)
    no_decay, decay = optimizer.param_groups
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.05
    ids = {id(p) for p in no_decay["params"]}
    assert id(model.cls_token.token) in ids and id(model.decoder.mask_token.token) in ids
    assert id(model.decoder.norm.weight) in ids and id(model.encoder.blocks[0].attn.qkv.weight) not in ids

    seen.clear()
    train_local(model=model, dataset=blob_images(12), config=config, steps=2, lr=2.5e-4, privatize=capture,
                progress=False)
    assert all(g["lr"] == 2.5e-4 for g in seen[0].param_groups)


def test_privatize_seam_with_opacus_make_private():
    config = tiny_config(batch_size=4, degradations=None)
    model = fresh_model(config)
    before = weights(model)

    def make_private(module, optimizer, loader):
        return PrivacyEngine().make_private(module=module, optimizer=optimizer, data_loader=loader,
                                            noise_multiplier=0.5, max_grad_norm=1.0, poisson_sampling=False)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        result = train_local(model=model, dataset=blob_images(8), config=config, steps=2, privatize=make_private,
                             progress=False)
    assert result.steps == 2
    assert model.cls_token.token.grad_sample is not None  # Opacus computed per-sample gradients
    assert not torch.equal(before["cls_token.token"], model.cls_token.token.detach())
    with pytest.raises(ValueError, match="grad_clip"):
        train_local(model=model, dataset=blob_images(8), config=tiny_config(grad_clip=1.0), steps=1,
                    privatize=make_private, progress=False)


def test_tuple_items_and_wrong_image_size():
    config = tiny_config(degradations=None)
    labelled = [(img, "benign") for img in blob_images(8)]
    result = train_local(model=fresh_model(config), dataset=labelled, config=config, steps=1, progress=False)
    assert result.steps == 1
    with pytest.raises(ValueError, match=r"\(1, 32, 32\)"):
        train_local(model=fresh_model(config), dataset=blob_images(8, size=48), config=config, steps=1,
                    progress=False)


def test_model_must_match_config():
    config = tiny_config()
    with pytest.raises(ValueError, match="degradations"):
        train_local(model=fresh_model(tiny_config(degradations=None)), dataset=blob_images(4), config=config,
                    steps=1, progress=False)
    with pytest.raises(ValueError, match="epochs or steps"):
        train_local(model=fresh_model(config), dataset=blob_images(4), config=config, steps=1, epochs=1)


def test_config_from_yaml_and_errors_name_the_key(tmp_path):
    path = tmp_path / "pretrain.yaml"
    path.write_text("pretrain:\n  preset: tiny\n  batch_size: 32\n  betas: [0.9, 0.99]\n"
                    "  degradations:\n    speckle_p: 0.5\n  grad_clip: 1.0\n")
    config = load_config(PretrainConfig, path, section="pretrain")
    assert config.batch_size == 32 and config.betas == (0.9, 0.99) and config.degradations.speckle_p == 0.5
    assert config.lr == pytest.approx(1.5e-4 * 32 / 256)
    path.write_text("pretrain:\n  batch_size: 0\n")
    with pytest.raises(ConfigError, match="pretrain.batch_size") as info:
        load_config(PretrainConfig, path, section="pretrain")
    assert str(path) in str(info.value)
    path.write_text("pretrain:\n  degradations: null\n  img_size: 30\n  preset: tiny\n")
    with pytest.raises(ConfigError, match="pretrain.img_size"):
        load_config(PretrainConfig, path, section="pretrain")


def test_worker_processes_give_the_same_weights_as_in_process_loading():
    images = blob_images(16)
    runs = []
    for workers in (0, 1):
        config = tiny_config(num_workers=workers)
        model = fresh_model(config)
        train_local(model=model, dataset=images, config=config, steps=3, progress=False)
        runs.append(weights(model))
    assert_same_weights(runs[0], runs[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bf16_autocast_trains_and_resumes(tmp_path):
    config = tiny_config(amp=True)
    model = fresh_model(config)
    result = train_local(model=model, dataset=blob_images(16), config=config, steps=4, device="cuda",
                         checkpoint_dir=tmp_path, progress=False)
    assert result.steps == 4 and math.isfinite(result.mean_loss)
    assert next(model.parameters()).dtype == torch.float32  # autocast, not a bf16 copy of the weights
    assert "cuda" in load_checkpoint(tmp_path / CHECKPOINT_NAME)["rng"]
    # ... and resumes on the GPU from that checkpoint (other initial weights: the checkpoint's must win).
    resumed = fresh_model(config, seed=99)
    again = train_local(model=resumed, dataset=blob_images(16), config=config, steps=6, device="cuda",
                        checkpoint_dir=tmp_path, progress=False)
    assert again.resumed_from_step == 4 and again.steps == 6
    assert load_checkpoint(tmp_path / CHECKPOINT_NAME)["step"] == 6
