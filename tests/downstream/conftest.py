"""Fixtures: generated labelled folders in the shared-data format, and the real shared data when present."""
from __future__ import annotations

from pathlib import Path

import pytest

from ultrafedfm.downstream.synthetic import write_labelled_folder


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """Downstream tests train small models: one torch thread (tests/conftest.py)."""
    yield


SHARED_DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


def make_data_root(root: Path, *, n_busi: int = 48, n_ddti: int = 36, n_other: int = 16) -> Path:
    """A tiny stand-in for ../shared/data: busi/ (no group column), ddti/ (groups), lung/ (labels only)."""
    write_labelled_folder(root / "busi", n=n_busi, seed=1, group_column=False)
    write_labelled_folder(root / "ddti", n=n_ddti, seed=2, classes=("benign", "malignant"), labels=False)
    write_labelled_folder(root / "lung", n=n_other, seed=3, classes=("benign", "normal"), masks=False)
    return root


@pytest.fixture(scope="session")
def lesion_folder(tmp_path_factory) -> Path:
    """Generated benign / malignant / normal frames with masks, near-duplicate pairs sharing a group."""
    return write_labelled_folder(tmp_path_factory.mktemp("lesions"), n=72, seed=11)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    return make_data_root(tmp_path_factory.mktemp("data_root"))


@pytest.fixture
def busi() -> Path:
    path = SHARED_DATA / "busi"
    if not (path / "labels.csv").is_file():
        pytest.skip("../shared/data/busi is not present")
    return path
