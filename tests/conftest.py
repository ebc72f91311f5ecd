"""Shared fixtures. Tests are fast by default: tiny ViT, tiny images, real components."""
from __future__ import annotations

import os

import pytest
import torch

# Two cores: keep intra-op threads modest so parallel helpers and CI stay responsive.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path_factory, monkeypatch):
    """No test writes into the real HOME (nvflare writes ~/.nvflare)."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("HOME", str(home))
    yield
