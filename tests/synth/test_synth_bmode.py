"""The B-mode generator: shapes, masks that sit on hypoechoic lesions, physics, determinism."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from ultrafedfm.config import ConfigError
from ultrafedfm.data.synth import default_site_profiles, render_bmode, render_cine
from ultrafedfm.data.synth.bmode import sample_scene
from ultrafedfm.data.synth.geometry import beam_grid, frame_layout, scan_converter

SIZE = (128, 176)
PROFILES = [replace(p, image_size=SIZE) for p in default_site_profiles(4, seed=0)]


@pytest.mark.parametrize("profile", PROFILES, ids=lambda p: f"{p.name}-{p.probe}")
@pytest.mark.parametrize("lesion", ["benign", "malignant", "normal"])
def test_frame_and_mask_shapes(profile, lesion):
    image, mask = render_bmode(rng=np.random.default_rng(1), profile=profile, lesion=lesion)
    assert image.shape == SIZE and image.dtype == np.uint8
    assert mask.shape == SIZE and mask.dtype == bool
    field = scan_converter(profile.geometry, SIZE).field
    assert (image[~field] == 0).all(), "outside the scanned field a frame is black"
    assert image[field].mean() > 30, "the field is not blank"
    if lesion == "normal":
        assert not mask.any()
    else:
        assert mask.sum() >= 10 and not (mask & ~field).any(), "the lesion lies inside the field"


@pytest.mark.parametrize("lesion", ["benign", "malignant"])
def test_lesions_are_darker_than_their_surroundings(lesion):
    darker = 0
    trials = 0
    for profile in PROFILES:
        for seed in range(4):
            image, mask = render_bmode(rng=np.random.default_rng(seed), profile=profile, lesion=lesion)
            ring = ndimage.binary_dilation(mask, iterations=6) & ~ndimage.binary_dilation(mask, iterations=2)
            ring &= scan_converter(profile.geometry, SIZE).field
            trials += 1
            darker += image[mask].mean() < image[ring].mean()
    assert darker == trials


def _posterior_over_lateral(image: np.ndarray, mask: np.ndarray) -> float:
    """Mean brightness in a band right below the lesion divided by bands at the same depth beside it."""
    ys, xs = np.nonzero(mask)
    height = ys.max() - ys.min() + 1
    top, bottom = ys.max() + 2, min(image.shape[0], ys.max() + 2 + height)
    left, right = xs.min(), xs.max() + 1
    width = right - left
    below = image[top:bottom, left:right]
    beside = np.concatenate([image[top:bottom, max(0, left - width):left].ravel(),
                             image[top:bottom, right:right + width].ravel()])
    beside = beside[beside > 0]
    return float(below[below > 0].mean() / beside.mean())


def test_posterior_enhancement_for_benign_and_shadowing_for_malignant():
    profile = replace(PROFILES[0], image_size=(256, 320))  # linear probe: beams run straight down
    ratios = {}
    for lesion in ("benign", "malignant"):
        values = []
        for seed in range(12):
            image, mask = render_bmode(rng=np.random.default_rng(seed), profile=profile, lesion=lesion)
            values.append(_posterior_over_lateral(image, mask))
        ratios[lesion] = float(np.median(values))
    assert ratios["benign"] > 1.0 > ratios["malignant"], ratios


def test_same_rng_state_same_frame_and_other_seed_other_frame():
    profile = PROFILES[1]
    a = render_bmode(rng=np.random.default_rng(5), profile=profile, lesion="malignant")
    b = render_bmode(rng=np.random.default_rng(5), profile=profile, lesion="malignant")
    c = render_bmode(rng=np.random.default_rng(6), profile=profile, lesion="malignant")
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_sector_probe_leaves_corners_black_and_linear_fills_its_rectangle():
    for profile in PROFILES:
        layout = frame_layout(profile.geometry, SIZE)
        x0, y0, x1, y1 = layout.region
        field = scan_converter(profile.geometry, SIZE).field[y0:y1 + 1, x0:x1 + 1]
        if profile.probe == "linear":
            assert field.mean() > 0.98
        else:
            assert field.mean() < 0.9 and not field[-1, 0] and not field[-1, -1]


def test_cine_moves_the_lesion_and_keeps_speckle_correlated():
    profile = PROFILES[0]
    frames, masks = render_cine(rng=np.random.default_rng(2), profile=profile, lesion="benign", n_frames=6)
    assert frames.shape == (6, *SIZE) and masks.shape == (6, *SIZE)
    assert all(m.any() for m in masks)
    assert not np.array_equal(masks[0], masks[-1]), "probe motion moves the lesion"
    field = scan_converter(profile.geometry, SIZE).field
    a, b = frames[0][field].astype(float), frames[1][field].astype(float)
    assert np.corrcoef(a, b)[0, 1] > 0.5, "consecutive frames are alike"
    other, _ = render_bmode(rng=np.random.default_rng(99), profile=profile, lesion="benign")
    assert np.corrcoef(a, other[field].astype(float))[0, 1] < np.corrcoef(a, b)[0, 1]


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="lesion must be"):
        render_bmode(rng=np.random.default_rng(0), profile=PROFILES[0], lesion="cancer")
    scene = sample_scene(np.random.default_rng(0), PROFILES[0], "benign")
    with pytest.raises(ValueError, match="holds a 'benign' lesion"):
        render_bmode(rng=np.random.default_rng(0), profile=PROFILES[0], lesion="normal", scene=scene)
    with pytest.raises(ConfigError, match="lesion_mix"):
        replace(PROFILES[0], lesion_mix=(0.5, 0.5, 0.5))
    with pytest.raises(ConfigError, match="probe"):
        replace(PROFILES[0], probe="rotary")


def test_linear_fast_scan_conversion_matches_the_general_lookup():
    profile = PROFILES[0]
    assert profile.probe == "linear"
    converter = scan_converter(profile.geometry, SIZE)
    assert converter.separable is not None
    beam = np.random.default_rng(0).random(beam_grid(profile.geometry, SIZE).shape, dtype=np.float32) * 255
    general = replace(converter, separable=None).convert(beam, SIZE)
    assert np.allclose(converter.convert(beam, SIZE), general, atol=1e-3)
    assert (general[~converter.field] == 0).all()
