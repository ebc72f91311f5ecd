"""``ultrafedfm synth``: write synthetic hospital sites as real ultrasound DICOM."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

_logger = logging.getLogger(__name__)

__all__ = ["register", "run"]


def _image_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected HEIGHTxWIDTH such as 256x320, got {text!r}") from None
    return height, width


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth", help="write N synthetic hospital sites of ultrasound DICOM with lesion masks",
        description="Write N non-IID synthetic hospital sites: DIR/site-K/dicom/**/*.dcm (US Image Storage with "
                    "SequenceOfUltrasoundRegions and burned-in text), DIR/site-K/ground_truth.csv, "
                    "DIR/site-K/masks/*.png and DIR/sites.yaml. All patient data is fake.")
    parser.add_argument("--out", type=Path, required=True, help="output folder DIR")
    parser.add_argument("--sites", type=int, default=3, help="number of sites (default 3)")
    parser.add_argument("--images-per-site", type=int, default=100, help="DICOM files per site (default 100)")
    parser.add_argument("--seed", type=int, default=0, help="everything is a function of the seed (default 0)")
    parser.add_argument("--cine-fraction", type=float, default=0.05,
                        help="share of files written as multi-frame cine loops (default 0.05)")
    parser.add_argument("--image-size", type=_image_size, default=None, metavar="HxW",
                        help="one frame size for all sites (default: each site's own)")
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--overwrite", action="store_true", help="replace site folders written by an earlier run")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ultrafedfm.data.synth import generate_sites

    try:
        sites = generate_sites(out_dir=args.out, n_sites=args.sites, images_per_site=args.images_per_site,
                               seed=args.seed, image_size=args.image_size, cine_fraction=args.cine_fraction,
                               progress=not args.no_progress, workers=args.workers, overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        _logger.error("synth: %s", exc)
        return 2
    _logger.info("wrote %d sites under %s (summary in %s)", len(sites), args.out, args.out / "sites.yaml")
    return 0
