"""Overlay suppression, pixel-based sector crop and letterboxing on generated ultrasound-like images."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw
from scipy import ndimage

from ultrafedfm.data.preprocess import (
    _drop_empty_lines, _max_filter, _min_filter, box_from_regions, find_imaging_box, letterbox, suppress_overlays,
)


def _speckle(shape=(240, 320), seed=0) -> np.ndarray:
    """Log-compressed Rayleigh speckle blurred by an anisotropic PSF, with a few bright interfaces."""
    rng = np.random.default_rng(seed)
    field = rng.rayleigh(1.0, shape) * ndimage.gaussian_filter(rng.random(shape), 8) * 4
    for y in (60, 130, 190):  # smooth echogenic interfaces: tissue, not overlay
        field[y:y + 3] *= 4
    echo = ndimage.gaussian_filter(field, sigma=(0.7, 1.2))
    image = 255 * np.log1p(echo) / np.log1p(echo).max()
    return image.clip(0, 255).astype(np.uint8)


def _draw_overlays(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Burn in text, two caliper crosses and a dotted measurement line; return (image, overlay mask)."""
    canvas = Image.fromarray(image)
    mask = Image.new("L", canvas.size, 0)
    for target in (ImageDraw.Draw(canvas), ImageDraw.Draw(mask)):
        fill = 255
        target.text((20, 10), "RT BREAST 3CM", fill=fill)
        target.text((200, 210), "MI 1.1 TIS 0.4", fill=fill)
        for cx, cy in ((100, 100), (180, 150)):
            target.line([(cx - 4, cy), (cx + 4, cy)], fill=fill)
            target.line([(cx, cy - 4), (cx, cy + 4)], fill=fill)
        for x in range(104, 176, 6):
            target.point([(x, 100 + (x - 100) * 50 // 80)], fill=fill)
    return np.asarray(canvas).copy(), np.asarray(mask) > 0


def test_burned_in_text_and_calipers_are_removed_and_tissue_kept():
    clean = _speckle()
    burned, overlay = _draw_overlays(clean)
    out, fraction = suppress_overlays(burned)
    assert fraction > 0
    error_before = np.abs(burned.astype(int) - clean)[overlay].mean()
    error_after = np.abs(out.astype(int) - clean)[overlay].mean()
    assert error_after < 0.35 * error_before  # overlay pixels go back near the tissue values
    away = ~ndimage.binary_dilation(overlay, iterations=3)
    changed_tissue = (out != burned)[away].mean()
    assert changed_tissue < 0.005  # speckle and interfaces stay


def test_clean_speckle_is_left_alone():
    clean = _speckle(seed=3)
    out, fraction = suppress_overlays(clean)
    assert fraction < 0.002
    assert (out != clean).mean() < 0.002


def test_colour_marks_are_inpainted():
    clean = _speckle(seed=1)
    colour = np.zeros(clean.shape, dtype=bool)
    colour[100:110, 50:150] = True
    burned = clean.copy()
    burned[colour] = 200
    out, _ = suppress_overlays(burned, colour)
    assert np.abs(out.astype(int) - clean)[colour].mean() < 0.4 * np.abs(burned.astype(int) - clean)[colour].mean()


def test_sector_is_found_without_header_bar_and_text():
    frame = np.zeros((300, 400), dtype=np.uint8)
    yy, xx = np.mgrid[:300, :400]
    radius = np.hypot(xx - 200, yy - 20)
    angle = np.degrees(np.arctan2(xx - 200, yy - 20))
    sector = (radius > 30) & (radius < 260) & (np.abs(angle) < 40)
    frame[sector] = _speckle((300, 400), seed=2)[sector]
    frame[0:18, :] = 70  # flat header bar
    canvas = Image.fromarray(frame)
    ImageDraw.Draw(canvas).text((5, 280), "PATIENT TEXT", fill=255)
    ImageDraw.Draw(canvas).text((10, 4), "HOSPITAL", fill=255)
    frame = np.asarray(canvas)
    ys, xs = np.nonzero(sector)
    truth = (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
    cleaned, _ = suppress_overlays(frame)
    x0, y0, x1, y1 = find_imaging_box([cleaned])
    assert abs(x0 - truth[0]) <= 8 and abs(x1 - truth[2]) <= 8
    assert abs(y0 - truth[1]) <= 8 and abs(y1 - truth[3]) <= 8


def test_regions_union_of_2d_regions_and_inconsistent_regions():
    dual = [(32, 24, 335, 415, 1), (336, 24, 639, 415, 1), (32, 40, 63, 103, 0)]
    assert box_from_regions(dual, (480, 640)) == (32, 24, 640, 416)
    spectral_only = [(10, 300, 600, 470, 3)]
    assert box_from_regions(spectral_only, (480, 640)) == (10, 300, 601, 471)
    # A rescaled image whose regions still describe the original: mostly outside, not used.
    assert box_from_regions([(84, 31, 595, 414, 1)], (240, 320)) is None
    # A cut image: most of the region inside, clamped.
    assert box_from_regions([(10, 10, 300, 259, 1)], (200, 320)) == (10, 10, 301, 200)
    assert box_from_regions([], (240, 320)) is None


@pytest.mark.parametrize(("shape", "size"), [((120, 200), 64), ((200, 120), 64), ((50, 50), 224)])
def test_letterbox_keeps_aspect_and_pads_black(shape, size):
    image = np.full(shape, 200, dtype=np.uint8)
    out = letterbox(image, size)
    assert out.shape == (size, size)
    rows, cols = np.nonzero(out)
    height, width = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert abs(height / width - shape[0] / shape[1]) < 0.05
    assert out[0, 0] == 0 or shape[0] == shape[1]


def test_letterbox_nearest_keeps_mask_values():
    mask = np.zeros((90, 160), dtype=np.uint8)
    mask[30:60, 60:100] = 255
    out = letterbox(mask, 48, nearest=True)
    assert set(np.unique(out)) <= {0, 255}


@pytest.mark.parametrize("seed", range(4))
def test_dropping_empty_lines_keeps_eight_connected_groups_exactly(seed):
    """overlay_mask labels its candidates without the empty rows and columns: same groups, same sizes."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((120, 160), dtype=bool)
    for _ in range(12):  # small blobs and diagonal strokes, some one or two empty lines apart
        y, x = rng.integers(0, 115), rng.integers(0, 155)
        mask[y:y + rng.integers(1, 4), x:x + rng.integers(1, 4)] = True
        if y + 7 < 120 and x + 2 < 160:
            mask[y + 5 + np.arange(3), x + np.arange(3)] = True
    mask[50, 10], mask[52, 10], mask[54, 12] = True, True, True  # one empty row apart: separate groups
    structure = np.ones((3, 3), dtype=bool)
    full, full_count = ndimage.label(mask, structure=structure)
    compact, compact_count = ndimage.label(_drop_empty_lines(mask), structure=structure)
    assert compact_count == full_count
    assert np.array_equal(full[mask], compact[compact > 0])  # raster order: the i-th pixel keeps its group


@pytest.mark.parametrize("size", [3, 5])
def test_running_min_and_max_filters_replicate_edges(size):
    image = np.random.default_rng(size).integers(0, 256, (37, 53), dtype=np.uint8)
    assert np.array_equal(_min_filter(image, size), ndimage.minimum_filter(image, size=size, mode="nearest"))
    assert np.array_equal(_max_filter(image, size), ndimage.maximum_filter(image, size=size, mode="nearest"))
