"""Typed configuration: dataclasses loaded from YAML with validation that names file and key.

Every configuration object in UltraFedFM is a (frozen or plain) dataclass. ``load_config``
reads a YAML file into one; ``from_mapping`` does the same for an in-memory mapping. Unknown
keys, wrong types and out-of-range values raise :class:`ConfigError` naming the file and the
dotted key, so a hospital's IT team can fix ``site.yaml`` without reading Python.

Example::

    @dataclass
    class IngestConfig:
        image_size: int = 224
        frame_stride: int = 5

        def __post_init__(self) -> None:
            check(self.image_size >= 16, "image_size", "must be at least 16")

    cfg = load_config(IngestConfig, "site.yaml", section="ingest")
"""
from __future__ import annotations

import dataclasses
import logging
import types
import typing
from pathlib import Path
from typing import Any, Literal, Mapping, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

_logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "check", "from_mapping", "load_config", "load_yaml", "to_mapping"]

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration value is missing, unknown, of the wrong type or out of range."""

    def __init__(self, message: str, *, key: str | None = None, source: str | Path | None = None):
        where = ""
        if source is not None:
            where += f"{source}: "
        if key:
            where += f"key '{key}': "
        super().__init__(where + message)
        self.key = key
        self.source = str(source) if source is not None else None
        self.bare_message = message


def check(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` for ``key`` unless ``condition`` holds (use in ``__post_init__``)."""
    if not condition:
        raise ConfigError(message, key=key)


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping; an empty file is an empty mapping."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError("file not found; create it from the template in site_templates/", source=path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML ({exc})", source=path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"expected a mapping at the top level, found {type(data).__name__}", source=path)
    return data


def load_config(cls: type[T], path: str | Path, *, section: str | None = None) -> T:
    """Load dataclass ``cls`` from YAML file ``path`` (optionally from one top-level ``section``)."""
    data = load_yaml(path)
    prefix = ""
    if section is not None:
        prefix = section
        data = data.get(section) or {}
        if not isinstance(data, dict):
            raise ConfigError("expected a mapping", key=section, source=path)
    return from_mapping(cls, data, source=path, prefix=prefix)


def from_mapping(cls: type[T], data: Mapping[str, Any], *, source: str | Path | None = None, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, converting nested dataclasses and checking types."""
    try:
        return _build(cls, data, prefix)
    except ConfigError as exc:
        if exc.source is None and source is not None:
            raise ConfigError(exc.bare_message, key=exc.key, source=source) from None
        raise


def to_mapping(obj: Any) -> Any:
    """The plain-YAML form of a config dataclass (tuples become lists, paths strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_mapping(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_mapping(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_mapping(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _build(cls: type[T], data: Mapping[str, Any], prefix: str) -> T:
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping, found {type(data).__name__}", key=prefix or None)
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key; allowed keys are: {', '.join(sorted(fields))}", key=_join(prefix, str(unknown[0]))
        )
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, _join(prefix, name))
    missing = [
        n for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ConfigError("required key is missing", key=_join(prefix, missing[0]))
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        if exc.key and prefix and not exc.key.startswith(prefix + "."):
            raise ConfigError(exc.bare_message, key=_join(prefix, exc.key)) from None
        raise


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, key)
            except ConfigError as exc:
                errors.append(exc.bare_message)
        raise ConfigError("; ".join(errors), key=key)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"must be one of {', '.join(map(repr, choices))}, got {value!r}", key=key)
        return value
    if dataclasses.is_dataclass(tp):
        return _build(tp, value or {}, key)
    if origin in (list, tuple, typing.Sequence) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"expected a list, got {value!r}", key=key)
        args = get_args(tp)
        item_tp = args[0] if args else Any
        items = [_convert(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"expected a mapping, got {value!r}", key=key)
        args = get_args(tp)
        vt = args[1] if len(args) == 2 else Any
        return {str(k): _convert(vt, v, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"expected true or false, got {value!r}", key=key)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"expected an integer, got {value!r}", key=key)
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"expected a number, got {value!r}", key=key)
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"expected a string, got {value!r}", key=key)
        return value
    if tp is Path:
        if not isinstance(value, (str, Path)):
            raise ConfigError(f"expected a path, got {value!r}", key=key)
        return Path(value).expanduser()
    return value
