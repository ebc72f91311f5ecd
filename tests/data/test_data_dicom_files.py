"""Real pydicom ultrasound test files decode, sample, crop and ingest correctly."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ultrafedfm.data.dicom_reader import check_ultrasound, decode_frames, read_header, ultrasound_regions
from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.data.ingest_config import IngestConfig
from ultrafedfm.data.preprocess import box_from_regions, find_imaging_box, letterbox_geometry

# name -> (transfer syntax it exercises, number of frames)
PYDICOM_US_FILES = {
    "examples_ybr_color.dcm": ("JPEG baseline, YBR_FULL_422", 30),
    "examples_palette.dcm": ("explicit little endian, PALETTE COLOR", 1),
    "examples_rgb_color.dcm": ("explicit little endian, RGB", 1),
    "examples_jpeg2k.dcm": ("JPEG 2000 lossless, YBR_RCT", 1),
}
# Files of the pydicom-data package (absent without it: those tests skip).
PYDICOM_DATA_US_FILES = {
    "OBXXXX1A_rle.dcm": ("RLE lossless, PALETTE COLOR", 1),
    "OBXXXX1A_rle_2frame.dcm": ("RLE lossless, 2 frames", 2),
    "ExplVR_BigEnd.dcm": ("explicit big endian, RGB", 1),
    "OBXXXX1A_expb_2frame.dcm": ("explicit big endian, PALETTE COLOR, 2 frames", 2),
    "JPGLosslessP14SV1_1s_1f_8b.dcm": ("JPEG lossless SV1, MONOCHROME2", 1),
    "US1_J2KI.dcm": ("JPEG 2000 lossy, YBR_ICT", 1),
    "gdcm-US-ALOKA-16.dcm": ("implicit little endian, 16-bit PALETTE COLOR", 1),
}


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


def _ingest_one(tmp_path: Path, source_file: Path, config: IngestConfig) -> tuple[list[dict], list[np.ndarray]]:
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(source_file, src / "file")
    summary = ingest_dicom_folder(source=src, cache=tmp_path / "cache", config=config, workers=1, progress=False)
    assert summary.rejected == {}, summary.report_path.read_text()
    entries = [json.loads(line) for line in (tmp_path / "cache" / "manifest.jsonl").read_text().splitlines()]
    images = [np.asarray(Image.open(tmp_path / "cache" / e["image"])) for e in entries]
    return entries, images


@pytest.mark.parametrize("name", sorted(PYDICOM_US_FILES))
def test_pydicom_example_files_are_ultrasound(name):
    ds = pydicom.dcmread(_testfile(name), stop_before_pixels=True)
    assert ds.Modality == "US"
    check_ultrasound(read_header(_testfile(name)))


@pytest.mark.parametrize("name", sorted(PYDICOM_US_FILES) + sorted(PYDICOM_DATA_US_FILES))
def test_each_ultrasound_file_ingests_to_grayscale_square_pngs(tmp_path, name):
    frames = {**PYDICOM_US_FILES, **PYDICOM_DATA_US_FILES}[name][1]
    entries, images = _ingest_one(tmp_path, _testfile(name), IngestConfig(image_size=64, frame_stride=5))
    assert len(entries) == len(range(0, frames, 5))
    assert [e["frame"] for e in entries] == list(range(0, frames, 5))
    for image in images:
        assert image.shape == (64, 64) and image.dtype == np.uint8  # 8-bit single channel
        assert image.max() > 50, "the image is (almost) black: decoding or crop lost the picture"


@pytest.mark.parametrize(("stride", "max_frames", "expected"), [(1, None, 30), (5, None, 6), (7, None, 5), (5, 3, 3)])
def test_cine_loop_frames_follow_stride_and_limit(tmp_path, stride, max_frames, expected):
    config = IngestConfig(image_size=32, frame_stride=stride, max_frames_per_file=max_frames, suppress_overlays=False)
    entries, _ = _ingest_one(tmp_path, _testfile("examples_ybr_color.dcm"), config)
    assert len(entries) == expected
    assert len({e["key"] for e in entries}) == expected


def test_colour_becomes_luminance():
    ds = read_header(_testfile("examples_rgb_color.dcm"))
    rgb = ds.pixel_array.astype(np.float64)
    gray = decode_frames(ds, [0])[0].gray
    expected = rgb @ [0.299, 0.587, 0.114]
    assert gray.shape == rgb.shape[:2]
    assert np.abs(gray - expected).max() <= 1.0


def test_ybr_frames_use_the_luma_channel():
    ds = read_header(_testfile("examples_ybr_color.dcm"))
    rgb = ds.pixel_array[10].astype(np.float64)  # pydicom converts YBR to RGB
    gray = decode_frames(ds, [10])[0].gray.astype(np.float64)
    # JPEG YCbCr -> RGB rounding leaves a few grey levels of difference at most.
    assert np.abs(gray - rgb @ [0.299, 0.587, 0.114]).mean() < 2.0


def test_region_crop_uses_the_2d_image_regions():
    ds = read_header(_testfile("examples_palette.dcm"))
    regions = ultrasound_regions(ds)
    assert [r[4] for r in regions] == [1, 4]  # a 2D image region and a waveform (ECG) region
    # examples_palette.dcm is a 350-row cut of a 600-row original: its region is clamped to the cut.
    assert box_from_regions(regions, (int(ds.Rows), int(ds.Columns))) == (120, 60, 800, 350)
    # On the original frame only the 2D region counts; inclusive x1 = 800 is clamped to the width.
    assert box_from_regions(regions, (600, 800)) == (120, 60, 800, 519)


def test_region_crop_is_what_the_cache_holds(tmp_path):
    path = _testfile("JPGLosslessP14SV1_1s_1f_8b.dcm")
    ds = read_header(path)
    x0, y0, x1, y1 = box_from_regions(ultrasound_regions(ds), (ds.Rows, ds.Columns))
    assert (x0, y0, x1, y1) == (14, 38, 1011, 759)
    _, images = _ingest_one(tmp_path, path, IngestConfig(image_size=224, suppress_overlays=False))
    new_h, new_w, top, left = letterbox_geometry(y1 - y0, x1 - x0, 224)
    image = images[0]
    # Padding exactly where a crop of the region's aspect puts it; content inside.
    assert image[:top].max() == 0 and image[top + new_h:].max() == 0
    assert image[top:top + new_h].max() > 100


def test_pixel_crop_finds_the_sector_inside_the_ultrasound_region():
    # examples_ybr_color.dcm is a half-size copy whose regions still describe the 640x480 original.
    ds = read_header(_testfile("examples_ybr_color.dcm"))
    (rx0, ry0, rx1, ry1, _), = ultrasound_regions(ds)
    region = (rx0 / 2, ry0 / 2, (rx1 + 1) / 2, (ry1 + 1) / 2)  # the region in this file's pixels
    frames = [f.gray for f in decode_frames(ds, [0, 10, 20])]
    x0, y0, x1, y1 = find_imaging_box(frames)
    tolerance = 6
    assert x0 >= region[0] - tolerance and y0 >= region[1] - tolerance
    assert x1 <= region[2] + tolerance and y1 <= region[3] + tolerance
    # ... and covers a good part of it (the fan's dark lateral edges may be trimmed).
    assert (x1 - x0) * (y1 - y0) >= 0.4 * (region[2] - region[0]) * (region[3] - region[1])


def test_jpeg_ls_16_bit_multiframe_decodes(tmp_path):
    """pydicom-data has no JPEG-LS ultrasound file: relabel an MR JPEG-LS loop as US multi-frame."""
    ds = pydicom.dcmread(_testfile("emri_small_jpeg_ls_lossless.dcm"))
    ds.Modality = "US"
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    ds.SOPInstanceUID = generate_uid()
    (tmp_path / "in").mkdir()
    ds.save_as(tmp_path / "in" / "loop.dcm")
    entries, images = _ingest_one(tmp_path, tmp_path / "in" / "loop.dcm", IngestConfig(image_size=32, frame_stride=3))
    assert [e["frame"] for e in entries] == [0, 3, 6, 9]
    assert all(img.max() > 0 for img in images)
