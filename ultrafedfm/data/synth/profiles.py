"""Per-site acquisition profiles: what makes one synthetic hospital differ from another.

Real multi-centre ultrasound is non-IID because sites own different scanners (probe
geometry, frequency, beam width), scan differently (depth, gain, dynamic range, time-gain
compensation) and see different patients (lesion mix). A :class:`SiteProfile` pins all of
that for one site; :func:`default_site_profiles` draws ``n`` distinct, deterministic ones.
Nothing here is patient data: the profile is what ``sites.yaml`` summarises.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from ultrafedfm.config import check
from ultrafedfm.data.synth.geometry import ProbeGeometry

_logger = logging.getLogger(__name__)

__all__ = ["LesionKind", "SiteProfile", "default_site_profiles", "with_image_size"]

LesionKind = Literal["benign", "malignant", "normal"]


@dataclass(frozen=True)
class SiteProfile:
    """One hospital's scanner and population.

    Args:
        name: site folder name, ``site-1`` ...
        institution_name, manufacturer, model_name, station_name: fake DICOM equipment identity.
        probe: ``linear`` | ``convex`` | ``phased``.
        center_frequency_mhz: transmit frequency; sets attenuation (dB/cm/MHz x MHz).
        depth_cm: imaging depth. ``width_cm``: linear aperture. ``sector_angle_deg`` and
            ``apex_radius_cm``: sector opening and convex radius of curvature.
        image_size: whole displayed frame ``(H, W)`` including annotation margins.
        gain_db: overall receive gain (brightness). ``dynamic_range_db``: log-compression
            window (contrast). ``tgc_compensation``: fraction of the mean tissue attenuation
            the time-gain compensation undoes (below 1: darker at depth).
        noise_db: electronic noise floor relative to a tissue echo at the skin.
        axial_resolution_mm, lateral_resolution_mm: PSF Gaussian sigmas (speckle size).
        lesion_mix: probabilities of ``(benign, malignant, normal)`` per patient.
        photometric: ``MONOCHROME2`` or ``RGB`` (colour text, optional tint).
        tint: RGB multipliers applied to the grey image on RGB sites (1,1,1 = none).
        text_color: colour of burned-in text and calipers on RGB sites.
        fat_thickness_cm: mean subcutaneous fat thickness of the population.
        caliper_fraction: share of lesion images on which the sonographer left calipers.
        gray_map_gamma: the scanner's grey map, ``out = 255 * (in / 255) ** gamma``.
    """

    name: str
    institution_name: str
    manufacturer: str
    model_name: str
    station_name: str
    probe: Literal["linear", "convex", "phased"]
    center_frequency_mhz: float
    depth_cm: float
    width_cm: float
    sector_angle_deg: float
    apex_radius_cm: float
    image_size: tuple[int, int]
    gain_db: float
    dynamic_range_db: float
    tgc_compensation: float
    noise_db: float
    axial_resolution_mm: float
    lateral_resolution_mm: float
    lesion_mix: tuple[float, float, float]
    photometric: Literal["MONOCHROME2", "RGB"] = "MONOCHROME2"
    tint: tuple[float, float, float] = (1.0, 1.0, 1.0)
    text_color: tuple[int, int, int] = (255, 255, 255)
    fat_thickness_cm: float = 0.5
    caliper_fraction: float = 0.5
    gray_map_gamma: float = 1.0

    def __post_init__(self) -> None:
        check(self.probe in ("linear", "convex", "phased"), "probe", "must be linear, convex or phased")
        check(1.0 <= self.center_frequency_mhz <= 20.0, "center_frequency_mhz", "must be within 1..20 MHz")
        check(1.0 <= self.depth_cm <= 20.0, "depth_cm", "must be within 1..20 cm")
        check(1.0 <= self.width_cm <= 10.0, "width_cm", "must be within 1..10 cm")
        check(10.0 <= self.sector_angle_deg <= 120.0, "sector_angle_deg", "must be within 10..120 degrees")
        check(0.0 <= self.apex_radius_cm <= 10.0, "apex_radius_cm", "must be within 0..10 cm")
        check(len(self.image_size) == 2 and min(self.image_size) >= 64, "image_size",
              "must be (height, width), each at least 64 pixels")
        check(20.0 <= self.dynamic_range_db <= 100.0, "dynamic_range_db", "must be within 20..100 dB")
        check(0.0 <= self.tgc_compensation <= 1.5, "tgc_compensation", "must be within 0..1.5")
        check(self.axial_resolution_mm > 0 and self.lateral_resolution_mm > 0, "axial_resolution_mm",
              "PSF widths must be positive")
        check(len(self.lesion_mix) == 3 and min(self.lesion_mix) >= 0 and abs(sum(self.lesion_mix) - 1) < 1e-6,
              "lesion_mix", "must be three non-negative probabilities (benign, malignant, normal) summing to 1")
        check(self.photometric in ("MONOCHROME2", "RGB"), "photometric", "must be MONOCHROME2 or RGB")
        check(0.0 <= self.caliper_fraction <= 1.0, "caliper_fraction", "must be within 0..1")
        check(0.3 <= self.gray_map_gamma <= 3.0, "gray_map_gamma", "must be within 0.3..3")

    @property
    def geometry(self) -> ProbeGeometry:
        return ProbeGeometry(probe=self.probe, depth_cm=self.depth_cm, width_cm=self.width_cm,
                             sector_angle_deg=self.sector_angle_deg, apex_radius_cm=self.apex_radius_cm)


# Archetypes loosely modelled on the scanners a breast-imaging consortium meets; every field
# is then jittered per site so no two sites are alike even when archetypes repeat.
_ARCHETYPES: tuple[dict, ...] = (
    dict(manufacturer="Synthetica Medical", model_name="SX-900", probe="linear", center_frequency_mhz=12.0,
         depth_cm=4.0, width_cm=4.4, image_size=(256, 320),
         gain_db=2.0, dynamic_range_db=60.0, gray_map_gamma=1.0, tgc_compensation=1.0, noise_db=-72.0,
         axial_resolution_mm=0.3, lateral_resolution_mm=0.75,
         lesion_mix=(0.55, 0.30, 0.15), photometric="MONOCHROME2", fat_thickness_cm=0.5),
    dict(manufacturer="Phantasm Imaging", model_name="Aurora 5", probe="convex", center_frequency_mhz=5.0,
         depth_cm=7.0, apex_radius_cm=4.0, sector_angle_deg=58.0, image_size=(288, 352),
         gain_db=-3.0, dynamic_range_db=66.0, gray_map_gamma=1.25, tgc_compensation=0.92, noise_db=-68.0,
         axial_resolution_mm=0.5, lateral_resolution_mm=1.1,
         lesion_mix=(0.35, 0.45, 0.20), photometric="RGB", tint=(1.0, 0.96, 0.86), text_color=(255, 230, 80),
         fat_thickness_cm=0.9),
    dict(manufacturer="Nimbus Diagnostics", model_name="LX-12", probe="linear", center_frequency_mhz=9.0,
         depth_cm=5.0, width_cm=3.8, image_size=(240, 288),
         gain_db=6.0, dynamic_range_db=46.0, gray_map_gamma=0.85, tgc_compensation=0.97, noise_db=-60.0,
         axial_resolution_mm=0.45, lateral_resolution_mm=1.2,
         lesion_mix=(0.45, 0.20, 0.35), photometric="MONOCHROME2", fat_thickness_cm=0.4),
    dict(manufacturer="Meridian Sonics", model_name="PA-3", probe="phased", center_frequency_mhz=4.0,
         depth_cm=8.0, apex_radius_cm=0.15, sector_angle_deg=76.0, image_size=(256, 320),
         gain_db=0.0, dynamic_range_db=70.0, gray_map_gamma=1.1, tgc_compensation=0.9, noise_db=-66.0,
         axial_resolution_mm=0.6, lateral_resolution_mm=1.4,
         lesion_mix=(0.30, 0.50, 0.20), photometric="RGB", tint=(0.9, 0.97, 1.0), text_color=(120, 255, 140),
         fat_thickness_cm=1.1),
    dict(manufacturer="Helios Ultrasound", model_name="HL-7", probe="linear", center_frequency_mhz=14.0,
         depth_cm=3.0, width_cm=5.0, image_size=(272, 352),
         gain_db=-5.0, dynamic_range_db=64.0, gray_map_gamma=0.75, tgc_compensation=1.05, noise_db=-75.0,
         axial_resolution_mm=0.18, lateral_resolution_mm=0.45,
         lesion_mix=(0.60, 0.25, 0.15), photometric="MONOCHROME2", fat_thickness_cm=0.35),
)

_CITIES = ("Northbridge", "Eastvale", "Southmere", "Westholm", "Lakeside", "Hillcrest", "Riverton", "Oakford")


def default_site_profiles(n: int, seed: int = 0) -> list[SiteProfile]:
    """``n`` distinct site profiles, identical for the same ``(n, seed)``."""
    if n < 1:
        raise ValueError(f"need at least one site, got n={n}")
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(0x51735,)))

    def vary(value: float, rel: float) -> float:
        """``value`` scaled by a random factor within ``1 +- rel``."""
        return float(round(value * (1 + rel * rng.uniform(-1, 1)), 3))

    profiles = []
    for index in range(n):
        base = dict(_ARCHETYPES[index % len(_ARCHETYPES)])
        mix = np.asarray(base["lesion_mix"]) * rng.uniform(0.7, 1.3, 3)
        mix = tuple(float(round(v, 3)) for v in mix / mix.sum())
        mix = (mix[0], mix[1], float(round(1.0 - mix[0] - mix[1], 3)))
        city = _CITIES[index % len(_CITIES)]
        base.update(
            name=f"site-{index + 1}",
            institution_name=f"{city} Synthetic Hospital {index + 1}",
            station_name=f"US{index + 1:02d}",
            center_frequency_mhz=vary(base["center_frequency_mhz"], 0.1),
            depth_cm=vary(base["depth_cm"], 0.1),
            gain_db=float(round(base["gain_db"] + rng.uniform(-2, 2), 2)),
            dynamic_range_db=vary(base["dynamic_range_db"], 0.06),
            noise_db=float(round(base["noise_db"] + rng.uniform(-3, 3), 2)),
            axial_resolution_mm=vary(base["axial_resolution_mm"], 0.15),
            lateral_resolution_mm=vary(base["lateral_resolution_mm"], 0.15),
            fat_thickness_cm=vary(base["fat_thickness_cm"], 0.2),
            lesion_mix=mix,
            caliper_fraction=float(round(rng.uniform(0.3, 0.8), 2)),
            gray_map_gamma=vary(base["gray_map_gamma"], 0.05),
        )
        base.setdefault("width_cm", 4.0)
        base.setdefault("sector_angle_deg", 60.0)
        base.setdefault("apex_radius_cm", 3.0)
        profiles.append(SiteProfile(**base))
    return profiles


def with_image_size(profile: SiteProfile, image_size: tuple[int, int] | None) -> SiteProfile:
    """``profile`` rendered at another frame size (``None`` keeps it)."""
    return profile if image_size is None else replace(profile, image_size=tuple(image_size))
