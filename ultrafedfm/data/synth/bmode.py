"""Physically motivated B-mode breast ultrasound frames with known lesion masks.

The model follows the usual linear image-formation chain (e.g. Bamber & Dickinson 1980;
Field II's convolution approximation), simulated in the IQ (baseband) domain on the beam grid:

1. *Tissue*: skin, subcutaneous fat and glandular layers over pectoral muscle, with wavy
   boundaries, bright specular interfaces and streaky texture; each layer has its own
   echogenicity, scatterer density and attenuation. An optional lesion overrides them.
2. *Scatterers*: complex Gaussian amplitudes on every sample, kept with a probability equal
   to the local scatterer density (sparse fat gives partially developed speckle), scaled by
   the local echogenicity.
3. *Point-spread function*: separable Gaussian in depth and lateral, applied by FFT. After
   quadrature demodulation the Gaussian-modulated cosine pulse is a Gaussian envelope, so the
   baseband axial PSF is a Gaussian and ``|IQ|`` is the envelope.
4. *Attenuation* accumulates along each beam (so a low-attenuation cyst brightens what lies
   behind it and a high-attenuation carcinoma shadows it); time-gain compensation undoes
   the tissue average, gain scales everything, and receiver noise is amplified by TGC.
5. *Envelope detection and log compression* to the site's dynamic range, 8 bits, then scan
   conversion (polar -> Cartesian for sector probes) into the displayed frame.

:func:`render_bmode` returns one frame and its lesion mask; :func:`render_cine` a short loop
of the same scene under probe motion with slowly decorrelating speckle.
"""
from __future__ import annotations

import functools
import logging
import math
from dataclasses import dataclass

import numpy as np
import scipy.fft

from ultrafedfm.data.synth.geometry import beam_grid, frame_layout, scan_converter
from ultrafedfm.data.synth.lesions import Lesion, sample_lesion
from ultrafedfm.data.synth.profiles import LesionKind, SiteProfile

_logger = logging.getLogger(__name__)

__all__ = ["Scene", "render_bmode", "render_cine", "sample_scene"]

# Layers, top to bottom: skin, fat, glandular tissue, pectoral muscle.
_ECHOGENICITY = np.array([1.6, 0.2, 1.0, 0.45], dtype=np.float32)
_DENSITY = np.array([1.0, 0.25, 1.0, 0.8], dtype=np.float32)
_ATTENUATION = np.array([0.9, 0.5, 0.8, 1.0], dtype=np.float32)  # dB/cm/MHz
_TEXTURE = np.array([0.1, 1.0, 0.9, 0.5], dtype=np.float32)  # strength of the streaky structure
_MEAN_ATTENUATION = 0.75  # what TGC is set to undo (dB/cm/MHz), a typical breast average
_DISPLAY_TOP_DB = 28.0  # echo level shown as white at 0 dB gain (PSF is power-normalised to 0 dB)
_INTERFACE_CM = 0.03
_HALO_CM = 0.12  # thickness of a malignant lesion's echogenic rim


@dataclass(frozen=True)
class Scene:
    """Everything random about one acquisition except the speckle itself."""

    skin_cm: float
    fat_boundary: np.ndarray  # (4, 3) base depth then (amplitude, wavelength, phase) rows, cm
    gland_boundary: np.ndarray
    texture: np.ndarray  # coarse Gaussian grid, upsampled into streaks
    texture_pitch_cm: tuple[float, float]  # knot spacing (depth, lateral)
    lesion: Lesion | None
    gain_db: float
    tgc_ripple_db: np.ndarray  # (3,) slow per-acquisition TGC slider error


def _boundary(params: np.ndarray, lateral: np.ndarray) -> np.ndarray:
    depth = np.full_like(lateral, params[0, 0])
    for amplitude, wavelength, phase in params[1:]:
        depth += amplitude * np.sin(2 * np.pi * lateral / wavelength + phase)
    return depth


def _knots(coords: np.ndarray, pitch: float, origin: float, n_knots: int) -> tuple[np.ndarray, np.ndarray]:
    """Left knot index and interpolation weight of each coordinate on knots every ``pitch``."""
    position = np.clip((coords - origin) / pitch, 0, n_knots - 1.001)
    index = position.astype(np.int64)
    return index, (position - index).astype(np.float32)


def sample_scene(rng: np.random.Generator, profile: SiteProfile, lesion: LesionKind) -> Scene:
    """Draw the anatomy, lesion and operator settings of one acquisition."""
    depth = profile.depth_cm
    skin = rng.uniform(0.12, 0.22)
    fat = max(0.15, rng.normal(profile.fat_thickness_cm, 0.2 * profile.fat_thickness_cm))
    gland = rng.uniform(0.35, 0.6) * depth

    def wavy(base: float, amplitude: float) -> np.ndarray:
        rows = [[base, 0.0, 0.0]]
        for _ in range(3):
            rows.append([rng.uniform(0, amplitude), rng.uniform(1.5, 8.0), rng.uniform(0, 2 * np.pi)])
        return np.asarray(rows, dtype=np.float32)

    pitch = (0.06 + 0.02 * rng.random(), 0.5 + 0.5 * rng.random())
    half_lateral = profile.geometry.extent_cm()[1] + 1.0
    texture = rng.standard_normal((int(depth / pitch[0]) + 8, int(2 * half_lateral / pitch[1]) + 8)).astype(np.float32)
    found = None
    if lesion != "normal":
        top = skin + fat + 0.3
        if profile.probe != "linear":  # a sector is too narrow near its apex for a lesion
            top = max(top, 0.2 * depth)
        bottom = max(top + 0.2, min(skin + fat + gland, 0.7 * depth))
        z = rng.uniform(top, bottom)
        half_field = abs(profile.geometry.extent_cm()[0]) if profile.probe == "linear" else (
            (profile.apex_radius_cm + z) * math.sin(math.radians(profile.sector_angle_deg) / 2))
        x = rng.uniform(-0.45, 0.45) * half_field
        max_half = min(1.1, 0.5 * half_field, 0.25 * depth, max(0.25, z - skin - 0.1))
        found = sample_lesion(rng, kind=lesion, center=(x, z), max_half_size_cm=max_half)
    return Scene(skin_cm=skin, fat_boundary=wavy(skin + fat, 0.12), gland_boundary=wavy(skin + fat + gland, 0.15),
                 texture=texture, texture_pitch_cm=pitch, lesion=found,
                 gain_db=profile.gain_db + rng.normal(0.0, 1.5), tgc_ripple_db=rng.normal(0.0, 1.5, 3))


@functools.lru_cache(maxsize=32)
def _psf_transfer(shape: tuple[int, int], sigma_samples: float, sigma_lines: float) -> np.ndarray:
    """Power-normalised transfer function of the separable Gaussian PSF on an FFT grid."""
    fz = scipy.fft.fftfreq(shape[0]).astype(np.float32)
    fx = scipy.fft.fftfreq(shape[1]).astype(np.float32)
    hz = np.exp(-2 * (np.pi * sigma_samples * fz) ** 2)
    hx = np.exp(-2 * (np.pi * sigma_lines * fx) ** 2)
    transfer = hz[:, None] * hx[None, :]
    # White input keeps unit mean power: sum |h|^2 = mean |H|^2 = 1.
    return (transfer / np.sqrt(np.mean(transfer ** 2))).astype(np.complex64)


def _tissue_maps(scene: Scene, profile: SiteProfile, shift: tuple[float, float]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Echogenicity, scatterer density and attenuation on the beam grid, shape (n_samples, n_lines)."""
    grid = beam_grid(profile.geometry, profile.image_size)
    depth = grid.depth_cm[:, None] - shift[1]
    lateral = grid.lateral_cm - shift[0]
    fat_bottom = _boundary(scene.fat_boundary, lateral)[None, :]
    gland_bottom = _boundary(scene.gland_boundary, lateral)[None, :]
    layer = (depth > scene.skin_cm).astype(np.int8) + (depth > fat_bottom) + (depth > gland_bottom)
    pitch_z, pitch_x = scene.texture_pitch_cm
    n_z, n_x = scene.texture.shape
    # Smooth in lateral, fine in depth: streaks. Separable linear interpolation by gathers
    # (a BLAS matmul here would spin up threads that fight the process pool).
    i0, wi = _knots(depth[:, 0], pitch_z, -4 * pitch_z, n_z)
    j0, wj = _knots(lateral, pitch_x, -(n_x // 2) * pitch_x, n_x)
    coarse = scene.texture[i0] * (1 - wi)[:, None] + scene.texture[i0 + 1] * wi[:, None]
    texture = coarse[:, j0] * (1 - wj) + coarse[:, j0 + 1] * wj
    echo = _ECHOGENICITY[layer] * np.exp(_TEXTURE[layer] * texture)
    # Specular reflections at the fascial planes.
    echo *= (1.0 + 2.5 * (np.abs(depth - fat_bottom) < _INTERFACE_CM)
             + 2.0 * (np.abs(depth - gland_bottom) < _INTERFACE_CM))
    density = _DENSITY[layer]  # fancy indexing returns fresh arrays, safe to edit below
    attenuation = _ATTENUATION[layer]
    lesion = scene.lesion
    if lesion is not None:
        box = (np.abs(grid.x_cm - lesion.x_cm - shift[0]) < lesion.reach_cm) & (
            np.abs(grid.z_cm - lesion.z_cm - shift[1]) < lesion.reach_cm)
        rows_any, cols_any = np.flatnonzero(box.any(axis=1)), np.flatnonzero(box.any(axis=0))
        if rows_any.size and cols_any.size:
            sl = (slice(rows_any[0], rows_any[-1] + 1), slice(cols_any[0], cols_any[-1] + 1))
            scale = min(lesion.half_width_cm, lesion.half_height_cm)
            band = (lesion.edge_cm + _HALO_CM + 0.02) / scale  # beyond it the margin's exact shape is moot
            rho, radius = lesion.boundary(grid.x_cm[sl], grid.z_cm[sl], shift=shift, band=band)
            inside_depth = (radius - rho) * scale  # approximate signed distance to the margin, cm
            weight = np.clip(inside_depth / lesion.edge_cm + 0.5, 0.0, 1.0)
            inside = rho < radius
            patch = echo[sl] * (1 - weight) + lesion.echogenicity * weight
            if lesion.halo:
                patch *= 1.0 + lesion.halo * ((inside_depth < 0) & (inside_depth > -_HALO_CM))
            echo[sl] = patch
            density[sl] = np.where(inside, lesion.scatter_density, density[sl])
            attenuation[sl] = np.where(inside, lesion.attenuation, attenuation[sl])
    return echo, density, attenuation


def _speckle_fields(rng: np.random.Generator, profile: SiteProfile) -> tuple[np.ndarray, np.ndarray]:
    """Random inputs of one frame: complex white scatterers on the padded FFT grid and the
    uniform draws that decide which scatterers exist."""
    grid = beam_grid(profile.geometry, profile.image_size)
    shape, _ = _padded_shape(profile)
    scatterers = rng.standard_normal((*shape, 2), dtype=np.float32).view(np.complex64)[..., 0]
    keep = rng.random(grid.shape, dtype=np.float32)
    return scatterers, keep


def _padded_shape(profile: SiteProfile) -> tuple[tuple[int, int], tuple[int, int]]:
    grid = beam_grid(profile.geometry, profile.image_size)
    sigma_z, sigma_x = _psf_sigmas(profile)
    pad = (math.ceil(3 * sigma_z) + 1, math.ceil(3 * sigma_x) + 1)
    shape = (scipy.fft.next_fast_len(grid.shape[0] + 2 * pad[0]), scipy.fft.next_fast_len(grid.shape[1] + 2 * pad[1]))
    return shape, pad


def _psf_sigmas(profile: SiteProfile) -> tuple[float, float]:
    grid = beam_grid(profile.geometry, profile.image_size)
    sigma_z = max(0.6, profile.axial_resolution_mm / 10 / grid.sample_spacing_cm)
    sigma_x = max(0.6, profile.lateral_resolution_mm / 10 / grid.line_spacing_cm)
    return round(sigma_z, 3), round(sigma_x, 3)


def _form_image(scene: Scene, profile: SiteProfile, fields: tuple[np.ndarray, np.ndarray],
                shift: tuple[float, float]) -> np.ndarray:
    """Beam-grid display values (float, 0..255 before clipping) of one frame."""
    grid = beam_grid(profile.geometry, profile.image_size)
    scatterers, keep = fields
    echo, density, attenuation = _tissue_maps(scene, profile, shift)
    amplitude = np.where(keep < density, echo / np.sqrt(density), 0.0).astype(np.float32)
    shape, pad = _padded_shape(profile)
    n_s, n_l = grid.shape
    padded = np.zeros(shape, dtype=np.float32)
    padded[pad[0]:pad[0] + n_s, pad[1]:pad[1] + n_l] = amplitude
    # Continue the tissue beyond the field edges so the PSF does not darken the borders.
    padded[pad[0]:pad[0] + n_s, :pad[1]] = amplitude[:, :1]
    padded[pad[0]:pad[0] + n_s, pad[1] + n_l:] = amplitude[:, -1:]
    padded[pad[0] + n_s:, :] = padded[pad[0] + n_s - 1:pad[0] + n_s, :]
    field = scatterers * padded
    iq = scipy.fft.ifft2(scipy.fft.fft2(field, workers=1) * _psf_transfer(shape, *_psf_sigmas(profile)), workers=1)
    iq = iq[pad[0]:pad[0] + n_s, pad[1]:pad[1] + n_l]
    f0 = profile.center_frequency_mhz
    two_way = 2.0 * f0 * grid.sample_spacing_cm
    loss_db = two_way * np.cumsum(attenuation, axis=0)
    depth_frac = grid.depth_cm / profile.depth_cm
    ripple = scene.tgc_ripple_db @ np.stack([np.sin(np.pi * k * depth_frac) for k in (1, 2, 3)])
    tgc_db = profile.tgc_compensation * 2.0 * f0 * _MEAN_ATTENUATION * grid.depth_cm + ripple
    receive_db = (tgc_db + scene.gain_db).astype(np.float32)[:, None]
    db_to_amplitude = np.float32(math.log(10.0) / 20.0)
    signal = iq * np.exp((receive_db - loss_db) * db_to_amplitude)
    noise_gain = np.exp((receive_db + profile.noise_db) * db_to_amplitude) / np.float32(math.sqrt(2))
    # Receiver noise: white scatterers one pad (> 3 PSF sigmas) away from those that made the
    # local echo are independent of it, which saves drawing a second field.
    noise = scatterers[2 * pad[0]:2 * pad[0] + n_s, 2 * pad[1]:2 * pad[1] + n_l]
    iq = signal + noise * noise_gain
    level_db = 10.0 * np.log10(iq.real * iq.real + iq.imag * iq.imag + 1e-12)  # envelope^2 -> dB
    floor = _DISPLAY_TOP_DB - profile.dynamic_range_db
    return (level_db - floor) * (255.0 / profile.dynamic_range_db)


def _mask(scene: Scene, profile: SiteProfile, shift: tuple[float, float]) -> np.ndarray:
    mask = np.zeros(profile.image_size, dtype=bool)
    lesion = scene.lesion
    if lesion is None:
        return mask
    layout = frame_layout(profile.geometry, profile.image_size)
    field = scan_converter(profile.geometry, profile.image_size).field
    # Only the pixels around the lesion can be inside it.
    ref_x, ref_y = layout.reference_pixel
    reach = lesion.reach_cm / layout.spacing_cm
    cx = ref_x + (lesion.x_cm + shift[0]) / layout.spacing_cm
    cy = ref_y + (lesion.z_cm + shift[1]) / layout.spacing_cm
    x0, x1 = max(0, int(cx - reach)), min(mask.shape[1], int(cx + reach) + 2)
    y0, y1 = max(0, int(cy - reach)), min(mask.shape[0], int(cy + reach) + 2)
    if x1 <= x0 or y1 <= y0:
        return mask
    ys, xs = np.mgrid[y0:y1, x0:x1].astype(np.float32)
    inside = lesion.contains((xs - ref_x) * layout.spacing_cm, (ys - ref_y) * layout.spacing_cm, shift=shift)
    mask[y0:y1, x0:x1] = inside & field[y0:y1, x0:x1]
    return mask


@functools.lru_cache(maxsize=64)
def _gray_map(gamma: float) -> np.ndarray:
    return np.round(255.0 * (np.arange(256) / 255.0) ** gamma).astype(np.float32)


def _display(beam_values: np.ndarray, profile: SiteProfile) -> np.ndarray:
    """Quantise to 8 bits, apply the scanner's grey map, scan-convert.

    Done on the (coarser) beam grid; interpolating between values in 0..255 stays in range.
    """
    levels = np.clip(beam_values, 0, 255).astype(np.uint8)
    mapped = np.take(_gray_map(profile.gray_map_gamma), levels)
    frame = scan_converter(profile.geometry, profile.image_size).convert(mapped, profile.image_size)
    return frame.astype(np.uint8)


def _check_scene(scene: Scene, lesion: LesionKind) -> None:
    drawn = scene.lesion.kind if scene.lesion is not None else "normal"
    if drawn != lesion:
        raise ValueError(f"the scene holds a {drawn!r} lesion but lesion={lesion!r} was asked for; "
                         "draw the scene with sample_scene(rng, profile, lesion)")


def render_bmode(*, rng: np.random.Generator, profile: SiteProfile, lesion: LesionKind,
                 scene: Scene | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One displayed B-mode frame and its lesion mask.

    Args:
        rng: the only source of randomness (same state, same frame).
        profile: the site's scanner and population.
        lesion: ``benign``, ``malignant`` or ``normal`` (no lesion, empty mask).
        scene: an already drawn scene (``sample_scene``); drawn from ``rng`` when omitted.

    Returns:
        ``image: (H, W) uint8`` — black outside the imaging field, no annotations yet —
        and ``mask: (H, W) bool`` of the lesion, both at ``profile.image_size``.
    """
    if lesion not in ("benign", "malignant", "normal"):
        raise ValueError(f"lesion must be 'benign', 'malignant' or 'normal', got {lesion!r}")
    scene = scene if scene is not None else sample_scene(rng, profile, lesion)
    _check_scene(scene, lesion)
    frame = _display(_form_image(scene, profile, _speckle_fields(rng, profile), (0.0, 0.0)), profile)
    return frame, _mask(scene, profile, (0.0, 0.0))


def render_cine(*, rng: np.random.Generator, profile: SiteProfile, lesion: LesionKind, n_frames: int,
                correlation: float = 0.9, scene: Scene | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A cine loop: ``frames (F, H, W) uint8`` and ``masks (F, H, W) bool``.

    The probe slides slowly and the patient breathes, so anatomy and lesion move a little
    between frames while speckle decorrelates with frame-to-frame ``correlation``.
    """
    if n_frames < 1:
        raise ValueError(f"a cine loop needs at least one frame, got n_frames={n_frames}")
    scene = scene if scene is not None else sample_scene(rng, profile, lesion)
    _check_scene(scene, lesion)
    slide = rng.uniform(-0.03, 0.03)  # cm per frame
    breath = rng.uniform(0.02, 0.06)
    fields = _speckle_fields(rng, profile)
    frames, masks = [], []
    mix = math.sqrt(1 - correlation ** 2)
    for t in range(n_frames):
        if t:
            fresh = _speckle_fields(rng, profile)
            fields = (correlation * fields[0] + mix * fresh[0], fields[1])
        shift = (slide * t, breath * math.sin(2 * math.pi * t / max(n_frames, 8)))
        frames.append(_display(_form_image(scene, profile, fields, shift), profile))
        masks.append(_mask(scene, profile, shift))
    return np.stack(frames), np.stack(masks)
