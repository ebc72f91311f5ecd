"""Downstream evaluation of the foundation model: splits, augmentation, metrics, evaluation, probes.

Framework-free (no FLARE): fine-tuning sites, the CLI and the study all build on it.
"""
from __future__ import annotations

import logging

_logger = logging.getLogger(__name__)

__all__: list[str] = []
