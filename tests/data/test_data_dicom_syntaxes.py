"""Transfer syntaxes and photometric interpretations that no pydicom test file covers for ultrasound:
deflated explicit VR little endian, MONOCHROME1 (inverted grey) and YBR_FULL / YBR_FULL_422 stored
uncompressed. Each file is written by pydicom from known pixels; the tests compare the decoded
(and the cached) pixels with what they must be, not just that decoding does not fail."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

from ultrafedfm.data.dicom_reader import decode_frames, read_header
from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.preprocess import letterbox

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
ROWS, COLUMNS = 48, 64


def write_us(path: Path, stored: np.ndarray | bytes, *, photometric: str, transfer_syntax: str = ExplicitVRLittleEndian,
             bits: int = 8, samples: int = 1, planar: int | None = None) -> Path:
    """A minimal US Image Storage file written by pydicom (Part 10, file meta, preamble)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = US_IMAGE_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
    ds.Modality = "US"
    ds.Rows, ds.Columns = ROWS, COLUMNS
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if planar is not None:
        ds.PlanarConfiguration = planar
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    ds.PixelData = stored if isinstance(stored, bytes) else np.ascontiguousarray(stored).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def grey_scan(seed: int = 0) -> np.ndarray:
    """(ROWS, COLUMNS) uint8: a depth gradient with speckle and a bright interface, like a B-mode frame."""
    rng = np.random.default_rng(seed)
    depth = np.linspace(180, 40, ROWS)[:, None] * np.ones((1, COLUMNS))
    image = depth * rng.rayleigh(0.8, (ROWS, COLUMNS))
    image[30:33] = 250
    return image.clip(0, 255).astype(np.uint8)


def luma(rgb: np.ndarray) -> np.ndarray:
    return rgb.astype(np.float64) @ [0.299, 0.587, 0.114]


def cached_image(tmp_path: Path, path: Path) -> np.ndarray:
    """The file through the whole ingest (no crop, no overlay suppression), as the cache holds it."""
    config = IngestConfig(image_size=COLUMNS, crop="none", suppress_overlays=False)
    summary = ingest_dicom_folder(source=path.parent, cache=tmp_path / "cache", config=config, workers=1, progress=False)
    assert summary.rejected == {}, summary.report_path.read_text()
    (entry,) = [json.loads(line) for line in (tmp_path / "cache" / "manifest.jsonl").read_text().splitlines()]
    return np.asarray(Image.open(tmp_path / "cache" / entry["image"]))


def test_deflated_explicit_little_endian_decodes_to_the_stored_pixels(tmp_path):
    gray = grey_scan()
    path = write_us(tmp_path / "src" / "deflated", gray, photometric="MONOCHROME2",
                    transfer_syntax=DeflatedExplicitVRLittleEndian)
    assert gray.tobytes() not in path.read_bytes()  # the dataset really is deflated on disk
    ds = read_header(path)
    assert ds.file_meta.TransferSyntaxUID == DeflatedExplicitVRLittleEndian
    (frame,) = decode_frames(ds, [0])
    assert np.array_equal(frame.gray, gray) and frame.colour is None
    assert np.array_equal(cached_image(tmp_path, path), letterbox(gray, COLUMNS))


def test_monochrome1_8_bit_is_inverted(tmp_path):
    gray = grey_scan(1)
    path = write_us(tmp_path / "src" / "mono1", 255 - gray, photometric="MONOCHROME1")
    (frame,) = decode_frames(read_header(path), [0])
    assert np.array_equal(frame.gray, gray)  # bright echoes stay bright
    assert np.array_equal(cached_image(tmp_path, path), letterbox(gray, COLUMNS))


def test_monochrome1_12_bit_is_scaled_then_inverted(tmp_path):
    stored = (4095 - grey_scan(2).astype(np.uint16) * 16).astype(np.uint16)  # 12-bit values in 16-bit words
    path = write_us(tmp_path / "src" / "mono1_12", stored, photometric="MONOCHROME1", bits=16)
    (frame,) = decode_frames(read_header(path), [0])
    # Scaled from [0, largest value] to 8 bits (0 stays 0), then inverted.
    expected = 255 - np.round(stored * (255.0 / stored.max())).astype(np.uint8)
    assert np.array_equal(frame.gray, expected)
    assert frame.gray[30:33].min() >= 245  # the bright interface is bright after inversion


@pytest.mark.parametrize("planar", [0, 1])
def test_ybr_full_native_gives_the_luma_and_finds_a_colour_mark(tmp_path, planar):
    rgb = np.repeat(grey_scan(3)[..., None], 3, axis=-1)
    rgb[5:9, 10:40] = (230, 40, 40)  # a red annotation on a grey scan
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    stored = np.moveaxis(ybr, -1, 0) if planar else ybr
    path = write_us(tmp_path / "src" / "ybr", stored, photometric="YBR_FULL", samples=3, planar=planar)
    (frame,) = decode_frames(read_header(path), [0])
    assert np.array_equal(frame.gray, ybr[..., 0])  # Y is the luminance, taken as stored
    assert np.abs(frame.gray - luma(rgb)).max() <= 1.0
    expected_mark = np.zeros((ROWS, COLUMNS), dtype=bool)
    expected_mark[5:9, 10:40] = True
    assert np.array_equal(frame.colour, expected_mark)  # grey stays grey, the red mark is colour
    assert np.array_equal(cached_image(tmp_path, path), letterbox(ybr[..., 0], COLUMNS))


def test_ybr_full_422_native_gives_the_luma(tmp_path):
    rng = np.random.default_rng(4)
    rgb = np.repeat(rng.integers(0, 256, (ROWS, COLUMNS // 2, 3), dtype=np.uint8), 2, axis=1)  # chroma pairs equal
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    y, cb, cr = ybr[..., 0], ybr[:, ::2, 1], ybr[:, ::2, 2]
    packed = np.stack([y[:, ::2], y[:, 1::2], cb, cr], axis=-1).tobytes()  # Y1 Y2 Cb Cr per pixel pair
    path = write_us(tmp_path / "src" / "ybr422", packed, photometric="YBR_FULL_422", samples=3, planar=0)
    (frame,) = decode_frames(read_header(path), [0])
    assert np.array_equal(frame.gray, y)
    assert np.abs(frame.gray - luma(rgb)).max() <= 1.0
