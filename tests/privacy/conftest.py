"""Privacy tests run torch on one thread: DP-SGD's many small kernels stall on a second, shared core."""
from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _one_torch_thread(one_torch_thread):
    yield
