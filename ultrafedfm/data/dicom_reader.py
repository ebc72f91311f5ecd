"""Read, validate and decode one ultrasound DICOM file into 8-bit grayscale frames.

``read_header`` parses a file with its pixel data deferred (so a known or unwanted file costs a
header read only), ``check_ultrasound`` keeps US Image Storage and US Multi-frame Image Storage
(current and retired SOP classes), and ``decode_frames`` decodes only the sampled frames of a cine
loop, through pydicom's decoder plug-ins (pylibjpeg for JPEG / JPEG-LS / JPEG 2000, pydicom or
pylibjpeg-rle for RLE, pydicom itself for uncompressed little and big endian). Colour
(RGB, YBR_*, PALETTE COLOR) becomes luminance; a mask of strongly coloured pixels is kept so
that colour annotations can be suppressed later.

Every failure raises :class:`Rejected` with one reason of :data:`REJECT_REASONS`. Messages
name tags and transfer syntaxes, never header values, so no PHI reaches logs or reports.
"""
from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, convert_color_space, get_decoder
from pydicom.uid import UID

_logger = logging.getLogger(__name__)

__all__ = [
    "REJECT_REASONS",
    "US_SOP_CLASSES",
    "DecodedFrame",
    "RejectReason",
    "Rejected",
    "check_ultrasound",
    "decode_frames",
    "frame_indices",
    "read_header",
    "ultrasound_regions",
]

RejectReason = Literal[
    "not_ultrasound", "no_pixel_data", "decoder_missing", "truncated_or_corrupt", "not_dicom", "unreadable", "excluded"
]
REJECT_REASONS: tuple[str, ...] = (
    "not_ultrasound", "no_pixel_data", "decoder_missing", "truncated_or_corrupt", "not_dicom", "unreadable", "excluded",
)

US_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.6.1": "US Image Storage",
    "1.2.840.10008.5.1.4.1.1.3.1": "US Multi-frame Image Storage",
    "1.2.840.10008.5.1.4.1.1.6": "US Image Storage (Retired)",
    "1.2.840.10008.5.1.4.1.1.3": "US Multi-frame Image Storage (Retired)",
}

# Which pip package decodes which compressed transfer syntax (pydicom's pylibjpeg plug-in
# needs the ``pylibjpeg`` front end as well).
_DECODER_PACKAGES: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "pylibjpeg pylibjpeg-libjpeg",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "pylibjpeg pylibjpeg-libjpeg",  # JPEG extended
    "1.2.840.10008.1.2.4.57": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless
    "1.2.840.10008.1.2.4.70": "pylibjpeg pylibjpeg-libjpeg",  # JPEG lossless SV1
    "1.2.840.10008.1.2.4.80": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "pylibjpeg pylibjpeg-libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91": "pylibjpeg pylibjpeg-openjpeg",  # JPEG 2000
    "1.2.840.10008.1.2.4.201": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless
    "1.2.840.10008.1.2.4.202": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "pylibjpeg pylibjpeg-openjpeg",  # HTJ2K
    "1.2.840.10008.1.2.5": "pylibjpeg pylibjpeg-rle",  # RLE lossless
}
_FALLBACK_PACKAGE = "python-gdcm"
# MPEG-2, MPEG-4 AVC/H.264 and HEVC/H.265 transfer syntaxes: 1.2.840.10008.1.2.4.100 .. .108
_VIDEO_PREFIX = "1.2.840.10008.1.2.4."
_VIDEO_SYNTAXES = {str(n) for n in range(100, 109)}

# A pixel counts as a colour annotation when its chroma exceeds this (8-bit units); if most
# of the frame is "coloured" the display is tinted and colour carries no annotation signal.
_CHROMA_THRESHOLD = 40
_MAX_COLOUR_FRACTION = 0.3


class Rejected(Exception):
    """A file is not used; ``reason`` is one of :data:`REJECT_REASONS`, ``detail`` says why."""

    def __init__(self, reason: RejectReason, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class DecodedFrame:
    """One decoded frame: ``gray`` (H, W) uint8 and ``colour`` (H, W) bool or ``None``."""

    index: int
    gray: np.ndarray
    colour: np.ndarray | None


def read_header(path: Path) -> Dataset:
    """Parse ``path`` with pixel data deferred (read from disk only when decoded).

    Raises:
        Rejected: ``not_dicom``, ``truncated_or_corrupt`` or ``unreadable``.
    """
    try:
        with warnings.catch_warnings():
            # pydicom warns with element values for malformed headers: values may be PHI.
            warnings.simplefilter("ignore")
            try:
                ds = pydicom.dcmread(path, defer_size=1024)
            except InvalidDicomError:
                ds = _read_without_preamble(path)
    except Rejected:
        raise
    except (PermissionError, IsADirectoryError) as exc:
        raise Rejected("unreadable", f"cannot open file ({type(exc).__name__})") from None
    except (EOFError, ValueError, KeyError, IndexError, TypeError, OverflowError, NotImplementedError) as exc:
        raise Rejected("truncated_or_corrupt", f"header could not be parsed ({type(exc).__name__})") from None
    except OSError as exc:
        raise Rejected("unreadable", f"cannot read file ({type(exc).__name__})") from None
    except Exception as exc:  # anything a malformed file can throw from the parser
        raise Rejected("not_dicom", f"not parseable as DICOM ({type(exc).__name__})") from None
    return ds


def _read_without_preamble(path: Path) -> Dataset:
    """Old files may lack the 128-byte preamble; accept them only if they parse as images."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024, force=True)
        if "SOPClassUID" in ds or "Modality" in ds:
            return ds
    except (PermissionError, IsADirectoryError):
        raise
    except Exception:  # forced parsing of a non-DICOM file fails in many ways
        pass
    raise Rejected("not_dicom", "no DICOM preamble and no DICOM header found")


def check_ultrasound(ds: Dataset) -> None:
    """Raise :class:`Rejected` unless ``ds`` is an ultrasound image with pixel data."""
    modality = str(ds.get("Modality", "") or "").strip()
    sop_class = str(ds.get("SOPClassUID", "") or "").strip()
    if modality and modality != "US":
        raise Rejected("not_ultrasound", f"Modality (0008,0060) is {modality}")
    if sop_class not in US_SOP_CLASSES:
        name = UID(sop_class).name if sop_class else "missing"
        raise Rejected("not_ultrasound", f"SOP Class UID (0008,0016) is {name}, not an ultrasound image storage class")
    if "PixelData" not in ds:
        raise Rejected("no_pixel_data", "no Pixel Data (7FE0,0010) element")
    for tag in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation"):
        if tag not in ds:
            raise Rejected("truncated_or_corrupt", f"image attribute {tag} is missing")


def frame_indices(number_of_frames: int, *, stride: int, max_frames: int | None) -> list[int]:
    """Frames kept from a loop of ``number_of_frames``: every ``stride``-th, at most ``max_frames``."""
    kept = list(range(0, max(number_of_frames, 1), stride))
    return kept[:max_frames] if max_frames is not None else kept


def number_of_frames(ds: Dataset) -> int:
    """``NumberOfFrames`` (1 when absent or malformed)."""
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def ultrasound_regions(ds: Dataset) -> list[tuple[int, int, int, int, int]]:
    """``(x0, y0, x1, y1, spatial_format)`` of each ``SequenceOfUltrasoundRegions`` item.

    Coordinates are inclusive pixel indices as in the standard (RegionLocationMinX0 ..
    RegionLocationMaxY1); malformed items are skipped.
    """
    regions = []
    for item in ds.get("SequenceOfUltrasoundRegions", None) or []:
        try:
            box = (
                int(item.RegionLocationMinX0), int(item.RegionLocationMinY0),
                int(item.RegionLocationMaxX1), int(item.RegionLocationMaxY1),
                int(item.get("RegionSpatialFormat", 0) or 0),
            )
        except (AttributeError, TypeError, ValueError):
            continue
        if box[2] > box[0] and box[3] > box[1]:
            regions.append(box)
    return regions


def decode_frames(ds: Dataset, indices: list[int]) -> list[DecodedFrame]:
    """Decode frames ``indices`` of ``ds`` to 8-bit grayscale.

    Raises:
        Rejected: ``decoder_missing`` (naming the pip package) or ``truncated_or_corrupt``.
    """
    file_meta = getattr(ds, "file_meta", None)
    ts = str(file_meta.get("TransferSyntaxUID", "") or "") if file_meta is not None else ""
    ts = ts or "1.2.840.10008.1.2"  # no file meta: implicit VR little endian, as the standard says
    decoder = _decoder_for(ts)
    frames = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for index in indices:
                arr, meta = decoder.as_array(ds, index=index, as_rgb=False)
                frames.append(_to_gray(ds, arr, str(meta.get("photometric_interpretation", "")), index))
    except Rejected:
        raise
    except MemoryError:
        raise
    except Exception as exc:  # decoders raise many types for damaged data
        raise Rejected("truncated_or_corrupt", f"pixel data could not be decoded ({type(exc).__name__}: {_short(exc)})") from None
    return frames


def _decoder_for(ts: str):
    name = UID(ts).name
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        if ts.startswith(_VIDEO_PREFIX) and ts[len(_VIDEO_PREFIX):].split(".")[0] in _VIDEO_SYNTAXES:
            raise Rejected("decoder_missing", f"transfer syntax {name} is video, which no Python DICOM decoder reads; "
                           "export the loop as single frames (or JPEG) from the scanner or PACS") from None
        package = _DECODER_PACKAGES.get(ts, _FALLBACK_PACKAGE)
        raise Rejected("decoder_missing", f"transfer syntax {name} ({ts}) has no decoder here; try: pip install {package}") from None
    if not decoder.is_available:
        package = _DECODER_PACKAGES.get(ts, _FALLBACK_PACKAGE)
        raise Rejected("decoder_missing", f"transfer syntax {name} needs a decoder; pip install {package}")
    return decoder


def _to_gray(ds: Dataset, arr: np.ndarray, photometric: str, index: int) -> DecodedFrame:
    photometric = photometric or str(ds.PhotometricInterpretation)
    colour = None
    if photometric == "PALETTE COLOR":
        gray_lut, colour_lut = _palette_luts(ds, arr.dtype)
        gray, colour = gray_lut[arr], colour_lut[arr]
    elif arr.ndim == 3 and photometric in ("YBR_FULL", "YBR_FULL_422"):
        # Y is the luminance already; chroma is the distance of Cb/Cr from neutral.
        ycc = _to_uint8(arr)
        chroma = np.abs(ycc[..., 1].astype(np.int16) - 128) + np.abs(ycc[..., 2].astype(np.int16) - 128)
        gray, colour = ycc[..., 0], chroma > _CHROMA_THRESHOLD
    elif arr.ndim == 3:
        if photometric.startswith("YBR"):
            arr = convert_color_space(arr, photometric, "RGB")
        gray, colour = _rgb_to_gray(_to_uint8(arr))
    else:
        gray = _to_uint8(arr)
        if photometric == "MONOCHROME1":
            gray = 255 - gray
    if colour is not None and colour.mean() > _MAX_COLOUR_FRACTION:
        colour = None
    return DecodedFrame(index=index, gray=np.ascontiguousarray(gray), colour=colour)


def _rgb_to_gray(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ITU-R 601 luma in integer arithmetic (0.299, 0.587, 0.114 as 77/150/29 of 256) and chroma mask."""
    # One copy to planes first: every operation below then runs on contiguous memory, in place.
    r, g, b = np.ascontiguousarray(np.moveaxis(rgb, -1, 0))
    luma = r.astype(np.uint16)
    luma *= 77
    term = g.astype(np.uint16)
    term *= 150
    luma += term
    np.multiply(b, 29, out=term, dtype=np.uint16)
    luma += term
    luma += 128
    luma >>= 8
    chroma = np.maximum(r, g)
    np.maximum(chroma, b, out=chroma)
    chroma -= np.minimum(np.minimum(r, g), b)
    return luma.astype(np.uint8), chroma > _CHROMA_THRESHOLD


def _palette_luts(ds: Dataset, dtype: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    """Gray and colour look-up tables over every stored value, built once per distinct palette."""
    fingerprint = hashlib.sha1(str(dtype).encode())
    for keyword in _PALETTE_KEYWORDS:
        value = ds.get(keyword)
        fingerprint.update(value if isinstance(value, bytes) else repr(value).encode())
    key = fingerprint.hexdigest()
    if key not in _palette_cache:
        if len(_palette_cache) >= 32:
            _palette_cache.clear()
        values = np.arange(np.iinfo(dtype).max + 1, dtype=dtype)
        _palette_cache[key] = _rgb_to_gray(_to_uint8(apply_color_lut(values, ds)))
    return _palette_cache[key]


_PALETTE_KEYWORDS = tuple(
    f"{prefix}{colour}PaletteColorLookupTable{part}"
    for colour in ("Red", "Green", "Blue")
    for prefix, part in (("", "Descriptor"), ("", "Data"), ("Segmented", "Data"))
)
# Sites hold thousands of files from a few scanners sharing a few palettes: expanding a palette
# (segmented ones especially) costs more than decoding the frame, so each worker keeps them.
_palette_cache: dict[str, tuple[np.ndarray, np.ndarray]] = {}


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16 and arr.max(initial=0) > 4095:
        return (arr >> 8).astype(np.uint8)  # full 16-bit range (e.g. palette LUT output)
    low, high = float(arr.min(initial=0)), float(arr.max(initial=0))
    if high <= low:
        return np.zeros(arr.shape, dtype=np.uint8)
    return ((arr.astype(np.float32) - low) * (255.0 / (high - low))).round().astype(np.uint8)


def _short(exc: Exception) -> str:
    return str(exc).splitlines()[0][:160] if str(exc) else ""
