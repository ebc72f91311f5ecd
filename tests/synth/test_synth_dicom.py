"""Synthetic sites are real ultrasound DICOM: pydicom reads them, headers and regions are right."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import validate_file_meta
from pydicom.uid import ExplicitVRLittleEndian

from ultrafedfm.data.synth import default_site_profiles, generate_sites, render_bmode
from ultrafedfm.data.synth.dicom_writer import (US_IMAGE_STORAGE, US_MULTIFRAME_IMAGE_STORAGE, UsDicomWriter,
                                               UsInstance, synthetic_uid, write_us_dicom)
from ultrafedfm.data.synth.geometry import frame_layout

SIZE = (128, 176)


@pytest.fixture(scope="module")
def sites(tmp_path_factory) -> list[Path]:
    out = tmp_path_factory.mktemp("synth")
    return generate_sites(out_dir=out, n_sites=4, images_per_site=6, seed=3, image_size=SIZE, cine_fraction=0.2,
                          progress=False, workers=1)


def _files(site: Path) -> list[Path]:
    return sorted((site / "dicom").rglob("*.dcm"))


def test_every_file_is_ultrasound_dicom_with_pixels(sites):
    sop_uids = set()
    kinds = set()
    for site in sites:
        files = _files(site)
        assert len(files) == 6
        for path in files:
            ds = pydicom.dcmread(path)
            validate_file_meta(ds.file_meta, enforce_standard=True)  # raises on invalid file meta
            assert ds.preamble == b"\0" * 128
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.Modality == "US"
            assert ds.SOPClassUID in (US_IMAGE_STORAGE, US_MULTIFRAME_IMAGE_STORAGE)
            assert str(ds.PatientName).startswith("SYNTH^PATIENT^")
            assert ds.BurnedInAnnotation == "YES"
            pixels = ds.pixel_array
            assert pixels.dtype == np.uint8
            multiframe = ds.SOPClassUID == US_MULTIFRAME_IMAGE_STORAGE
            frames = int(ds.NumberOfFrames) if multiframe else 1
            if multiframe:
                assert frames > 1 and pixels.shape[0] == frames
                assert ds.FrameIncrementPointer == 0x00181063
            rgb = ds.PhotometricInterpretation == "RGB"
            assert ds.PhotometricInterpretation in ("MONOCHROME2", "RGB")
            assert pixels.shape[-3 if rgb else -2:][:2] == SIZE
            kinds.add((ds.PhotometricInterpretation, multiframe))
            assert ds.SOPInstanceUID not in sop_uids
            sop_uids.add(ds.SOPInstanceUID)
    # Both photometric interpretations and both storage classes occur.
    assert {k[0] for k in kinds} == {"MONOCHROME2", "RGB"}
    assert {k[1] for k in kinds} == {False, True}


def test_region_locates_the_image_and_text_lies_outside_it(sites):
    for site in sites:
        for path in _files(site):
            ds = pydicom.dcmread(path)
            (region,) = ds.SequenceOfUltrasoundRegions
            x0, y0 = region.RegionLocationMinX0, region.RegionLocationMinY0
            x1, y1 = region.RegionLocationMaxX1, region.RegionLocationMaxY1
            assert 0 <= x0 < x1 < ds.Columns and 0 <= y0 < y1 < ds.Rows
            assert region.RegionSpatialFormat == 1 and region.RegionDataType == 1
            assert region.PhysicalUnitsXDirection == 3 and region.PhysicalUnitsYDirection == 3
            assert region.PhysicalDeltaX == pytest.approx(region.PhysicalDeltaY)
            # The region spans at least the scan depth (a convex top arc adds a little).
            depth_cm = int(ds.DepthOfScanField) / 10
            assert region.PhysicalDeltaY * (y1 - y0 + 1) >= 0.95 * depth_cm
            pixels = ds.pixel_array
            frame = pixels[0] if ds.SOPClassUID == US_MULTIFRAME_IMAGE_STORAGE else pixels
            gray = frame.mean(axis=-1) if ds.PhotometricInterpretation == "RGB" else frame.astype(float)
            inside = gray[y0:y1 + 1, x0:x1 + 1]
            outside = gray.copy()
            outside[y0:y1 + 1, x0:x1 + 1] = 0
            assert (inside > 0).mean() > 0.5, "the imaging region is mostly image"
            # Burned-in text (header lines, settings) sits in the margins around the region.
            assert (gray[:y0] > 100).sum() > 50, "no header text above the region"
            assert (outside[:, :x0] > 100).sum() > 20, "no settings text left of the region"
            assert (outside > 0).mean() < 0.25


def test_fast_writer_is_byte_identical_to_pydicom(tmp_path):
    for profile in default_site_profiles(2, seed=0):  # one MONOCHROME2, one RGB site
        layout = frame_layout(profile.geometry, profile.image_size)
        image, _ = render_bmode(rng=np.random.default_rng(0), profile=profile, lesion="benign")
        if profile.photometric == "RGB":
            image = np.repeat(image[..., None], 3, axis=-1)
        instance = UsInstance(
            patient_name="SYNTH^PATIENT^0001", patient_id="SYN0100001", patient_birth_date="19700101",
            patient_age="053Y", study_uid=synthetic_uid("t", 1), series_uid=synthetic_uid("t", 2),
            sop_uid=synthetic_uid("t", 3), study_date="20230405", study_time="103107", accession_number="ACC1",
            study_id="0001", series_number=1, instance_number=1, laterality="L")
        for pixels in (image, np.stack([image, image[::-1]])):
            fast, slow = tmp_path / "fast.dcm", tmp_path / "slow.dcm"
            UsDicomWriter(profile=profile, layout=layout).write(fast, pixels, instance=instance)
            write_us_dicom(slow, pixels, profile=profile, layout=layout, instance=instance)
            assert fast.read_bytes() == slow.read_bytes()
            assert np.array_equal(pydicom.dcmread(fast).pixel_array, pixels)


def test_writer_rejects_pixels_that_do_not_match_the_site(tmp_path):
    profile = default_site_profiles(1, seed=0)[0]  # MONOCHROME2
    layout = frame_layout(profile.geometry, profile.image_size)
    instance = UsInstance("SYNTH^PATIENT^0001", "P", "19700101", "053Y", "1.2.3", "1.2.4", "1.2.5", "20230405",
                          "103107", "A", "1", 1, 1, "L")
    with pytest.raises(ValueError, match="uint8"):
        write_us_dicom(tmp_path / "x.dcm", np.zeros((2, 8, 8, 3), np.uint8), profile=profile, layout=layout,
                       instance=instance)
    with pytest.raises(ValueError, match="uint8"):
        write_us_dicom(tmp_path / "x.dcm", np.zeros((8, 8), np.float32), profile=profile, layout=layout,
                       instance=instance)
