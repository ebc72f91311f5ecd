"""Ultrasound frame preprocessing: imaging-region crop, overlay suppression, letterbox resize.

All functions take and return 8-bit grayscale ``(H, W)`` arrays. Boxes are ``(x0, y0, x1, y1)``
with exclusive ends (numpy slicing order ``img[y0:y1, x0:x1]``).

- ``box_from_regions``: the union of the 2D image regions of ``SequenceOfUltrasoundRegions``.
- ``find_imaging_box``: without regions, the scan sector or rectangle is the largest
  connected bright area after an opening that erases thin text strokes.
- ``suppress_overlays``: burned-in text, calipers and colour annotations are small, thin and
  bright (or coloured); they are found by a white top-hat plus saturation test, kept only as
  small connected components with crisp edges, and filled with the mean of their unmasked
  neighbourhood, so no sharp edge is left for the MAE to learn.
- ``letterbox``: aspect-preserving resize to a black-padded square.
"""
from __future__ import annotations

import logging

import numpy as np
from PIL import Image
from scipy import ndimage

_logger = logging.getLogger(__name__)

__all__ = [
    "Box", "box_from_regions", "crop", "find_imaging_box", "inpaint", "letterbox", "letterbox_geometry", "overlay_mask",
    "prepare_frames", "suppress_overlays",
]

Box = tuple[int, int, int, int]

# Region spatial format 1 is a 2D (B-mode / colour-flow) image area; 3/4 are spectral and waveform.
_SPATIAL_FORMAT_2D = 1
# Regions running past the image are clamped only if at least this share of them lies inside.
_MIN_REGION_INSIDE = 0.5
# Pixel-based crop: background is darker than this after smoothing.
_BACKGROUND_LEVEL = 8
# Speckle: local 5x5 standard deviation above this (8-bit units) in most pixels of an area.
_SPECKLE_STD = 3.0
_MIN_TEXTURED_FRACTION = 0.5
# Overlay detection (8-bit units): saturated level, top-hat contrast, largest overlay component.
_SATURATED = 245
_TOPHAT_CONTRAST = 60
_OVERLAY_MIN_LEVEL = 140
_MIN_OVERLAY_AREA = 5  # one dilated pixel: the dots of a dotted caliper line
_SHARP_EDGE = 120
_MIN_SHARP_FRACTION = 0.1
_MAX_OVERLAY_AREA_FRACTION = 0.02
_MIN_LINE_EXTENT = 24
_MAX_LINE_FILL = 0.25


def box_from_regions(regions: list[tuple[int, int, int, int, int]], shape: tuple[int, int]) -> Box | None:
    """Union of the 2D image regions (largest region if none is 2D), or ``None``.

    ``regions`` hold inclusive ``(x0, y0, x1, y1, spatial_format)`` as in DICOM. Regions that run
    past the image are common: an image cut from a larger frame keeps its coordinates (clamping
    is right), a rescaled one does not (they describe other pixels). The clamped box is used when
    it keeps at least half of the regions' area; otherwise, or without regions, ``None`` tells
    the caller to find the imaging area from the pixels.
    """
    if not regions:
        return None
    chosen = [r for r in regions if r[4] == _SPATIAL_FORMAT_2D]
    if not chosen:
        chosen = [max(regions, key=lambda r: (r[2] - r[0]) * (r[3] - r[1]))]
    x0, y0 = min(r[0] for r in chosen), min(r[1] for r in chosen)
    x1, y1 = max(r[2] for r in chosen) + 1, max(r[3] for r in chosen) + 1
    height, width = shape
    clamped = (max(x0, 0), max(y0, 0), min(x1, width), min(y1, height))
    kept = max(0, clamped[2] - clamped[0]) * max(0, clamped[3] - clamped[1])
    if kept < _MIN_REGION_INSIDE * (x1 - x0) * (y1 - y0):
        return None
    return clamped


def find_imaging_box(frames: list[np.ndarray], masks: list[np.ndarray | None] | None = None) -> Box:
    """Bounding box of the scan sector/rectangle found from the pixels of ``frames``.

    Bright areas (after an opening that erases thin text) are kept when most of their pixels
    show speckle texture and they are not thin strips (header bars, tool bars, grey-scale wedges); the box is the
    union of the kept areas at least a tenth the size of the largest (a sector broken up by
    dark fluid stays whole). Without a clear textured area the whole frame is kept.
    Pixels under ``masks`` (overlays found by :func:`overlay_mask`) count as background.
    """
    stack = np.max(np.stack(frames), axis=0) if len(frames) > 1 else frames[0]
    height, width = stack.shape
    step = max(1, min(height, width) // 128)  # work at ~128-256 px: the box needs no finer resolution
    small = stack[::step, ::step].astype(np.float32)
    for mask in masks or []:
        if mask is not None:
            small[mask[::step, ::step]] = 0.0
    mean = ndimage.uniform_filter(small, size=5)
    texture = np.sqrt(np.maximum(ndimage.uniform_filter(small * small, size=5) - mean * mean, 0.0)) > _SPECKLE_STD
    bright = _max_filter(_min_filter((mean > _BACKGROUND_LEVEL).view(np.uint8), 5), 5).view(bool)  # opening
    labels, count = ndimage.label(bright)
    if count == 0:
        return (0, 0, width, height)
    area = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    textured = np.bincount(labels[texture], minlength=count + 1)[1:] / np.maximum(area, 1)
    objects = ndimage.find_objects(labels)
    tall = np.array([(s[0].stop - s[0].start) >= 0.1 * small.shape[0] for s in objects])
    wide = np.array([(s[1].stop - s[1].start) >= 0.1 * small.shape[1] for s in objects])
    # Header bars and tool bars are thin strips along an edge; a scan area is not.
    keep = (textured >= _MIN_TEXTURED_FRACTION) & (area >= 0.01 * small.size) & tall & wide
    if not keep.any():
        return (0, 0, width, height)
    keep &= area >= 0.1 * area[keep].max()
    slices = [s for s, k in zip(objects, keep) if k]
    y0, y1 = min(s[0].start for s in slices), max(s[0].stop for s in slices)
    x0, x1 = min(s[1].start for s in slices), max(s[1].stop for s in slices)
    return (x0 * step, y0 * step, min(width, x1 * step), min(height, y1 * step))


def crop(image: np.ndarray, box: Box | None) -> np.ndarray:
    """``image[y0:y1, x0:x1]`` (the whole image for ``None``)."""
    if box is None:
        return image
    x0, y0, x1, y1 = box
    return image[y0:y1, x0:x1]


def suppress_overlays(gray: np.ndarray, colour: np.ndarray | None = None) -> tuple[np.ndarray, float]:
    """Inpaint burned-in overlays found by :func:`overlay_mask`; returns (image, fraction changed)."""
    mask = overlay_mask(gray, colour)
    if not mask.any():
        return gray, 0.0
    return inpaint(gray, mask), float(mask.mean())


def overlay_mask(gray: np.ndarray, colour: np.ndarray | None = None) -> np.ndarray:
    """Pixels of burned-in text, calipers, measurement lines and colour marks (bool, like ``gray``).

    Candidates are pixels much brighter than their 5x5 opening (strokes thinner than 5 px) and
    bright in absolute terms, plus saturated pixels. A connected group of candidates is an
    overlay when it has crisp edges (rendered graphics step by >= 120 grey levels between
    neighbours; echoes are blurred by the point-spread function) and is text-sized (at most
    2 % of the image) or line-like (long and sparse, e.g. a measurement box). Compact large
    bright groups are tissue (strong reflectors) and stay. ``colour`` pixels are always overlays.
    """
    opened = _max_filter(_min_filter(gray, 5), 5)  # grey opening, 5x5
    candidates = ((gray - opened) > _TOPHAT_CONTRAST) & (gray >= _OVERLAY_MIN_LEVEL)  # opening <= gray: no wrap
    candidates |= gray >= _SATURATED
    mask = _grow(colour) if colour is not None else np.zeros(gray.shape, dtype=bool)
    if not candidates.any():
        return mask
    grown = _grow(candidates)
    # Candidates are a few percent of the frame: label them on the frame without its empty rows
    # and columns, and measure each group from its own pixels instead of scanning the whole
    # label image once per statistic. Both keep raster order, so the i-th set pixel of the
    # compacted frame is the i-th of the frame.
    compact = _drop_empty_lines(grown)
    labels, count = ndimage.label(compact, structure=np.ones((3, 3), dtype=bool))
    group = labels.ravel()[np.flatnonzero(compact)]
    where = np.flatnonzero(grown)
    area = np.bincount(group, minlength=count + 1)[1:]
    sharp = np.bincount(group[_edge_strength_at(gray, where) >= _SHARP_EDGE], minlength=count + 1)[1:]
    rows, cols = np.divmod(where, gray.shape[1])
    order = np.argsort(group, kind="stable")
    starts = np.concatenate([[0], np.cumsum(area)[:-1]])
    height = np.maximum.reduceat(rows[order], starts) - np.minimum.reduceat(rows[order], starts) + 1
    width = np.maximum.reduceat(cols[order], starts) - np.minimum.reduceat(cols[order], starts) + 1
    extent, fill = np.maximum(height, width), area / (height * width)
    text_sized = (area >= _MIN_OVERLAY_AREA) & (area <= _MAX_OVERLAY_AREA_FRACTION * gray.size)
    line_like = (extent >= _MIN_LINE_EXTENT) & (fill <= _MAX_LINE_FILL)
    crisp = sharp >= np.maximum(2, _MIN_SHARP_FRACTION * area)
    overlay = np.concatenate([[False], crisp & (text_sized | line_like)])
    mask.ravel()[where[overlay[group]]] = True
    return mask


def _drop_empty_lines(mask: np.ndarray) -> np.ndarray:
    """``mask`` without its empty rows and columns, except the first empty one after each run of
    non-empty ones: it keeps groups apart, so 8-connected components are exactly those of ``mask``."""
    keep = []
    for axis in (1, 0):
        used = mask.any(axis=axis)
        keep.append(used | np.concatenate([[False], used[:-1]]))
    return mask.compress(keep[0], axis=0).compress(keep[1], axis=1)


def _grow(mask: np.ndarray) -> np.ndarray:
    """Dilate a boolean mask by one pixel (3x3)."""
    return _max_filter(mask.view(np.uint8), 3).view(bool)


def _min_filter(image: np.ndarray, size: int) -> np.ndarray:
    """size x size minimum filter (edges replicated)."""
    return _running(_running(image, size, np.minimum, axis=0), size, np.minimum, axis=1)


def _max_filter(image: np.ndarray, size: int) -> np.ndarray:
    """size x size maximum filter (edges replicated)."""
    return _running(_running(image, size, np.maximum, axis=0), size, np.maximum, axis=1)


def _running(image: np.ndarray, size: int, op: np.ufunc, *, axis: int) -> np.ndarray:
    # For the small windows used here, size-1 element-wise ops on shifted views are several
    # times faster than scipy.ndimage's 1D min/max filters. Clipping the window at the border
    # is the same as replicating the edge pixel (min/max are idempotent), and needs no padding.
    out = image.copy()
    src, dst = (image, out) if axis == 0 else (image.T, out.T)
    for k in range(1, size // 2 + 1):
        op(dst[k:], src[:-k], out=dst[k:])
        op(dst[:-k], src[k:], out=dst[:-k])
    return out


def _edge_strength_at(gray: np.ndarray, where: np.ndarray) -> np.ndarray:
    """Largest absolute difference of the pixels at flat indices ``where`` to their right or lower
    neighbour (int16; 0 where there is none)."""
    flat = gray.ravel()
    height, width = gray.shape
    here = flat[where].astype(np.int16)
    right = np.where(where % width < width - 1, flat[np.minimum(where + 1, flat.size - 1)], here)
    below = np.where(where < (height - 1) * width, flat[np.minimum(where + width, flat.size - 1)], here)
    return np.maximum(np.abs(here - right), np.abs(here - below))


def inpaint(gray: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Fill ``mask`` with the mean of the unmasked pixels around it (normalised box filter)."""
    if not mask.any():
        return gray
    rows, cols = np.nonzero(np.any(mask, axis=1))[0], np.nonzero(np.any(mask, axis=0))[0]
    margin = 24  # only the masked area and its neighbourhood are filtered
    y0, y1 = max(0, rows[0] - margin), min(gray.shape[0], rows[-1] + margin + 1)
    x0, x1 = max(0, cols[0] - margin), min(gray.shape[1], cols[-1] + margin + 1)
    sub, sub_mask = gray[y0:y1, x0:x1], mask[y0:y1, x0:x1]
    keep = (~sub_mask).astype(np.float32)
    values = sub.astype(np.float32) * keep
    filled = sub.astype(np.float32)
    todo = sub_mask.copy()
    for size in (11, 41):
        weight = ndimage.uniform_filter(keep, size=size)
        ready = todo & (weight > 1e-3)
        filled[ready] = ndimage.uniform_filter(values, size=size)[ready] / weight[ready]
        todo &= ~ready
        if not todo.any():
            break
    if todo.any():
        filled[todo] = float(np.median(sub[~sub_mask])) if (~sub_mask).any() else 0.0
    out = gray.copy()
    out[y0:y1, x0:x1][sub_mask] = np.clip(filled[sub_mask], 0, 255).round().astype(np.uint8)
    return out


def letterbox_geometry(height: int, width: int, size: int) -> tuple[int, int, int, int]:
    """(new_h, new_w, top, left) of an aspect-preserving fit of (height, width) into size x size."""
    scale = size / max(height, width)
    new_h, new_w = max(1, round(height * scale)), max(1, round(width * scale))
    return new_h, new_w, (size - new_h) // 2, (size - new_w) // 2


def letterbox(image: np.ndarray, size: int, *, nearest: bool = False) -> np.ndarray:
    """Resize ``image`` (H, W) uint8 into a black ``(size, size)`` square, aspect kept."""
    height, width = image.shape
    new_h, new_w, top, left = letterbox_geometry(height, width, size)
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    resized = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    out = np.zeros((size, size), dtype=np.uint8)
    out[top:top + new_h, left:left + new_w] = resized
    return out


def prepare_frames(
    frames: list[tuple[np.ndarray, np.ndarray | None]],
    *,
    region_box: Box | None,
    find_box: bool,
    suppress: bool,
    size: int,
) -> list[np.ndarray]:
    """Crop, suppress overlays and letterbox the ``(gray, colour)`` frames of one file.

    One crop box serves the whole loop: ``region_box`` when given, else (``find_box``) one found
    from the pixels with overlays masked out, else the full frame. Overlays are detected at full
    resolution (thin strokes need it) but filled after resizing, where it is cheap; the resized
    mask covers every output pixel a stroke blended into.
    """
    box = None
    if region_box is not None:  # crop first: detection then runs on the smaller image
        frames = [(crop(g, region_box), None if c is None else crop(c, region_box)) for g, c in frames]
    masks = [overlay_mask(g, c) if suppress else None for g, c in frames]
    if region_box is None and find_box:
        box = find_imaging_box([g for g, _ in frames], masks)
    out = []
    for (gray, _), mask in zip(frames, masks):
        image = letterbox(crop(gray, box), size)
        if mask is not None and mask.any():
            cropped = crop(mask, box).view(np.uint8) * np.uint8(255)
            image = inpaint(image, letterbox(cropped, size) > 0)
        out.append(image)
    return out
