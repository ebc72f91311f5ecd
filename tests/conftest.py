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


@pytest.fixture
def one_torch_thread():
    """torch on one intra-op thread for the test: two OpenMP threads spin-wait for each other on a
    shared 2-core machine (folders of small-kernel tests use it through an autouse fixture)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
