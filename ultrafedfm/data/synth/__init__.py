"""Synthetic hospital sites: physically motivated B-mode frames written as real ultrasound DICOM.

``generate_sites`` writes N non-IID sites (different probes, depths, gains, noise, PSFs and
lesion mixes) with masks and labels; ``render_bmode`` gives one frame in memory.
"""
from __future__ import annotations

import logging

from ultrafedfm.data.synth.bmode import render_bmode, render_cine
from ultrafedfm.data.synth.profiles import LesionKind, SiteProfile, default_site_profiles
from ultrafedfm.data.synth.sites import GROUND_TRUTH_COLUMNS, generate_sites

_logger = logging.getLogger(__name__)

__all__ = ["GROUND_TRUTH_COLUMNS", "LesionKind", "SiteProfile", "default_site_profiles", "generate_sites",
           "render_bmode", "render_cine"]
