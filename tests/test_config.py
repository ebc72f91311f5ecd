"""The YAML -> dataclass loader names the file and the key on every kind of mistake."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from ultrafedfm.config import ConfigError, check, from_mapping, load_config, to_mapping


@dataclass
class Inner:
    stride: int = 5
    mode: Literal["auto", "none"] = "auto"

    def __post_init__(self) -> None:
        check(self.stride >= 1, "stride", "must be at least 1")


@dataclass
class Outer:
    name: str
    size: int = 224
    scale: float = 1.0
    enabled: bool = True
    root: Path | None = None
    tags: list[str] = field(default_factory=list)
    inner: Inner = field(default_factory=Inner)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_loads_nested_and_converts_types(tmp_path):
    path = write(tmp_path, "cfg:\n  name: a\n  scale: 2\n  root: ~/x\n  tags: [p, q]\n  inner: {stride: 3}\n")
    cfg = load_config(Outer, path, section="cfg")
    assert cfg.scale == 2.0 and isinstance(cfg.scale, float)
    assert cfg.root == Path("~/x").expanduser()
    assert cfg.inner == Inner(stride=3)
    assert to_mapping(cfg)["inner"] == {"stride": 3, "mode": "auto"}


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("name: a\nsise: 3\n", "sise", "unknown key"),
        ("size: 3\n", "name", "required key is missing"),
        ("name: a\nsize: big\n", "size", "expected an integer"),
        ("name: a\nenabled: 'yes'\n", "enabled", "true or false"),
        ("name: a\ninner: {mode: manual}\n", "inner.mode", "must be one of"),
        ("name: a\ninner: {stride: 0}\n", "inner.stride", "at least 1"),
        ("name: a\ntags: p\n", "tags", "expected a list"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(Outer, path)
    message = str(info.value)
    assert str(path) in message
    assert f"key '{key}'" in message
    assert words in message


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_config(Outer, tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Outer, write(tmp_path, "name: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(Outer, write(tmp_path, "- a\n- b\n"))


def test_from_mapping_without_file():
    with pytest.raises(ConfigError, match="key 'size'"):
        from_mapping(Outer, {"name": "a", "size": True})
