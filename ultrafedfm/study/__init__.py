"""The multi-site study: does federated MAE pretraining help downstream, across institutions and label scarcity?

``run_study`` runs it as resumable units (``ultrafedfm study``); ``report`` writes the tables and plots.
Only ``federated_arm`` touches the FLARE layer.
"""
from __future__ import annotations

import logging

from ultrafedfm.study.presets import PRESETS, StudyPreset, get_study_preset

_logger = logging.getLogger(__name__)

__all__ = ["PRESETS", "StudyPreset", "get_study_preset"]
