"""Ultrasound degradations: validation, shape and range, strength, identity when off."""
from __future__ import annotations

import pytest
import torch

from ultrafedfm.config import ConfigError, from_mapping
from ultrafedfm.models.degradations import (
    DegradationConfig, apply_degradations, gaussian_blur, motion_blur, salt_and_pepper, speckle,
)

OFF = DegradationConfig(motion_blur_p=0.0, gaussian_blur_p=0.0, salt_pepper_p=0.0, speckle_p=0.0)


def _images() -> torch.Tensor:
    torch.manual_seed(0)
    return torch.rand(4, 1, 32, 32)


def test_all_off_is_identity():
    imgs = _images()
    assert not OFF.active
    assert torch.equal(apply_degradations(imgs, OFF), imgs)


def test_all_on_changes_every_image_and_stays_in_range():
    imgs = _images()
    cfg = DegradationConfig(motion_blur_p=1.0, gaussian_blur_p=1.0, salt_pepper_p=1.0, speckle_p=1.0)
    out = apply_degradations(imgs, cfg)
    assert out.shape == imgs.shape
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert all(not torch.allclose(out[i], imgs[i]) for i in range(4))


@pytest.mark.parametrize("blur", [
    lambda x: gaussian_blur(x, sigma_range=(1.0, 2.0)), lambda x: motion_blur(x, max_length=9),
])
def test_blurs_preserve_constant_images_and_smooth_noise(blur):
    flat = torch.full((3, 1, 32, 32), 0.4)
    assert torch.allclose(blur(flat), flat, atol=1e-6)  # normalised kernels
    noise = _images()
    assert blur(noise).std() < 0.8 * noise.std()


def test_salt_and_pepper_sets_pixels_to_extremes():
    imgs = torch.full((2, 1, 64, 64), 0.5)
    torch.manual_seed(1)
    out = salt_and_pepper(imgs, max_amount=0.5)
    changed = out != 0.5
    assert changed.any()
    assert torch.all((out[changed] == 0.0) | (out[changed] == 1.0))


def test_speckle_is_multiplicative():
    imgs = torch.zeros(2, 1, 16, 16)
    imgs[:, :, :8] = 0.5
    out = speckle(imgs, max_sigma=0.5)
    assert torch.all(out[:, :, 8:] == 0), "speckle multiplies: black stays black"


def test_probability_selects_images():
    imgs = torch.full((400, 1, 8, 8), 0.5)
    torch.manual_seed(0)
    out = apply_degradations(imgs, DegradationConfig(motion_blur_p=0.0, gaussian_blur_p=0.0, salt_pepper_p=0.0,
                                                     speckle_p=0.3, speckle_sigma=0.5))
    hit = (out != imgs).flatten(1).any(1).float().mean().item()
    assert 0.2 < hit < 0.4


@pytest.mark.parametrize("mapping,key", [
    ({"speckle_p": 1.5}, "degradations.speckle_p"),
    ({"motion_blur_max_length": 4}, "degradations.motion_blur_max_length"),
    ({"gaussian_blur_sigma": [2.0, 1.0]}, "degradations.gaussian_blur_sigma"),
])
def test_config_errors_name_the_key(mapping, key):
    with pytest.raises(ConfigError) as info:
        from_mapping(DegradationConfig, mapping, source="site.yaml", prefix="degradations")
    assert info.value.key == key and "site.yaml" in str(info.value)
