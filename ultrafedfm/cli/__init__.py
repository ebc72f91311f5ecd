"""The ``ultrafedfm`` command line.

Each sub-command lives in its own module of this package and exposes
``register(subparsers) -> None``, which adds its parser and sets ``func`` (called with the
parsed namespace, returning an exit code). Modules are discovered, so adding a command is
adding a file.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from ultrafedfm import __version__
from ultrafedfm.config import ConfigError

_logger = logging.getLogger("ultrafedfm")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ultrafedfm",
        description="Federated ultrasound foundation-model pretraining (MAE on NVIDIA FLARE).",
    )
    parser.add_argument("--version", action="version", version=f"ultrafedfm {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        _logger.error("configuration error: %s", exc)
        return 2
    except KeyboardInterrupt:
        _logger.error("interrupted")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
