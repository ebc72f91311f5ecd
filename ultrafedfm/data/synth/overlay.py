"""Burned-in annotations like a scanner's: header text, settings, depth scale, calipers.

Real ultrasound DICOM carries its annotations in the pixels (``BurnedInAnnotation = YES``):
institution, site and patient name, date, probe, gain and depth around the image, a depth scale
and a grey bar at its side, and measurement calipers ('+') on the image itself. Ingestion
must crop and suppress them, so the synthetic sites draw them the same way (all fake).

What is the same on every frame of a site (institution, probe, depth, scale, grey bar) is
drawn once and pasted by index; per-frame text is blitted from cached bitmaps, so
annotating costs well under a millisecond.
"""
from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ultrafedfm.data.synth.geometry import FrameLayout
from ultrafedfm.data.synth.profiles import SiteProfile

_logger = logging.getLogger(__name__)

__all__ = ["Annotation", "burn_in"]

_CALIPER_ARM = 4
_CHAR_W, _LINE_H = 6, 11  # the built-in bitmap font is fixed-pitch


@dataclass(frozen=True)
class Annotation:
    """The (fake) text a scanner burns into one frame."""

    patient_name: str
    patient_id: str
    acquired: str  # "YYYY-MM-DD HH:MM:SS"
    gain_db: float
    laterality: str  # "L" or "R"


@functools.lru_cache(maxsize=4096)
def _text_bitmap(text: str) -> np.ndarray:
    """``(11, 6 * len(text)) bool`` pixels of ``text`` in the built-in bitmap font (crisp,
    unantialiased, like scanner text)."""
    strip = Image.new("L", (max(1, _CHAR_W * len(text)), _LINE_H))
    ImageDraw.Draw(strip).text((0, 0), text, fill=255, font=ImageFont.load_default_imagefont())
    return np.asarray(strip) > 127


def _blit(canvas: np.ndarray, x: int, y: int, text: str, ink) -> None:
    bitmap = _text_bitmap(text)
    height, width = canvas.shape[:2]
    h, w = min(bitmap.shape[0], height - y), min(bitmap.shape[1], width - x)
    if h > 0 and w > 0:
        canvas[y:y + h, x:x + w][bitmap[:h, :w]] = ink


@dataclass(frozen=True)
class _StaticLayer:
    pixels: np.ndarray  # flat indices into the frame
    values: np.ndarray  # (n,) or (n, 3) uint8


def _probe_label(profile: SiteProfile) -> str:
    """Site name, probe type and frequency, e.g. ``SITE-1 L12MHz``."""
    return f"{profile.name.upper()} {profile.probe[0].upper()}{profile.center_frequency_mhz:.0f}MHz"


@functools.lru_cache(maxsize=64)
def _static_layer(profile: SiteProfile, layout: FrameLayout) -> _StaticLayer:
    """Site-constant annotations: institution, probe, settings, depth ticks, grey bar."""
    rgb = profile.photometric == "RGB"
    height, width = layout.frame_size
    x0, y0, x1, y1 = layout.region
    left = layout.margins[2]
    canvas = np.zeros((height, width, 3) if rgb else (height, width), dtype=np.uint8)
    drawn = np.zeros((height, width), dtype=bool)
    ink = np.asarray(profile.text_color, dtype=np.uint8) if rgb else 255

    def text(x: int, y: int, value: str) -> None:
        _blit(canvas, x, y, value, ink)
        _blit(drawn, x, y, value, True)

    text(3, 2, profile.institution_name.upper()[: max(1, (width - 6 * 19 - 12) // _CHAR_W)])
    probe = _probe_label(profile)
    text(max(3, width - _CHAR_W * len(probe) - 3), 13, probe)
    for i, line in enumerate((f"DR{profile.dynamic_range_db:.0f}", f"D{profile.depth_cm:.1f}", "cm")):
        text(2, y0 + 14 + 12 * i, line[: max(1, (left - 3) // _CHAR_W)])
    ticks_x = min(width - 8, x1 + 3)
    for cm in range(int(profile.depth_cm) + 1):
        y = int(round(layout.reference_pixel[1] + cm / layout.spacing_cm))
        if y0 <= y <= y1:
            canvas[y, ticks_x:ticks_x + 5] = ink
            drawn[y, ticks_x:ticks_x + 5] = True
    bar = np.linspace(255, 0, max(2, (y1 - y0) // 2)).astype(np.uint8)
    bar_x = min(width - 6, x1 + 12)
    canvas[y0:y0 + bar.size, bar_x:bar_x + 4] = bar[:, None, None] if rgb else bar[:, None]
    drawn[y0:y0 + bar.size, bar_x:bar_x + 4] = True
    pixels = np.flatnonzero(drawn)
    values = canvas.reshape(height * width, -1)[pixels] if rgb else canvas.reshape(-1)[pixels]
    return _StaticLayer(pixels=pixels, values=values)


@functools.lru_cache(maxsize=64)
def _tint_table(tint: tuple[float, float, float]) -> np.ndarray:
    """``(256, 3) uint8`` grey -> tinted RGB lookup (a scanner's chroma map)."""
    return np.clip(np.arange(256, dtype=np.float32)[:, None] * np.asarray(tint, dtype=np.float32), 0, 255
                   ).astype(np.uint8)


def _caliper_points(mask: np.ndarray) -> list[tuple[int, int]]:
    """Ends of the lesion's horizontal and vertical diameters through its centroid."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return []
    box = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]  # the lesion's bounding box only: cheap
    ys, xs = np.nonzero(box)
    cy, cx = int(round(ys.mean())) + rows[0], int(round(xs.mean())) + cols[0]
    row, col = np.flatnonzero(mask[cy]), np.flatnonzero(mask[:, cx])
    points = []
    if row.size:
        points += [(int(row[0]), cy), (int(row[-1]), cy)]
    if col.size:
        points += [(cx, int(col[0])), (cx, int(col[-1]))]
    return points


def burn_in(image: np.ndarray, *, profile: SiteProfile, layout: FrameLayout, note: Annotation,
            calipers_on: np.ndarray | None = None) -> np.ndarray:
    """Draw annotations onto a rendered frame.

    Args:
        image: ``(H, W) uint8`` frame from :func:`render_bmode`.
        profile: the site (colour, tint, probe and depth shown in the text).
        layout: where the imaging region is; text goes into the margins around it.
        note: the fake patient/date/gain text.
        calipers_on: a lesion mask to measure with '+' calipers, or ``None``.

    Returns:
        ``(H, W) uint8`` on MONOCHROME2 sites, ``(H, W, 3) uint8`` on RGB sites.
    """
    rgb = profile.photometric == "RGB"
    if rgb:
        canvas = np.take(_tint_table(tuple(profile.tint)), image, axis=0)  # faster than fancy indexing
        ink = np.asarray(profile.text_color, dtype=np.uint8)
    else:
        canvas = image.copy()
        ink = 255
    height, width = layout.frame_size
    static = _static_layer(profile, layout)
    canvas.reshape(height * width, -1)[static.pixels] = static.values.reshape(static.pixels.size, -1)
    y0 = layout.region[1]
    bottom, left = layout.margins[1], layout.margins[2]
    _blit(canvas, max(3, width - _CHAR_W * len(note.acquired) - 3), 2, note.acquired, ink)
    room = (width - _CHAR_W * len(_probe_label(profile)) - 12) // _CHAR_W  # keep clear of the probe label
    _blit(canvas, 3, 13, f"{note.patient_name}  {note.patient_id}"[: max(1, room)], ink)
    for i, line in enumerate((f"G{note.gain_db + 50:.0f}", f"BR-{note.laterality}")):
        _blit(canvas, 2, y0 + 2 + 48 * i if i else y0 + 2, line[: max(1, (left - 3) // _CHAR_W)], ink)
    if calipers_on is not None:
        points = _caliper_points(calipers_on)
        for px, py in points:
            canvas[py, max(0, px - _CALIPER_ARM):px + _CALIPER_ARM + 1] = ink
            canvas[max(0, py - _CALIPER_ARM):py + _CALIPER_ARM + 1, px] = ink
        if len(points) == 4:
            d1 = (points[1][0] - points[0][0]) * layout.spacing_cm
            d2 = (points[3][1] - points[2][1]) * layout.spacing_cm
            _blit(canvas, 3, height - bottom + 2, f"D1 {d1:.2f}cm  D2 {d2:.2f}cm", ink)
    return canvas
