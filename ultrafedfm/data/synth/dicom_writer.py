"""Write synthetic frames as real ultrasound DICOM files (Part 10, Explicit VR Little Endian).

Single frames use *Ultrasound Image Storage* (1.2.840.10008.5.1.4.1.1.6.1), cine loops
*Ultrasound Multi-frame Image Storage* (1.2.840.10008.5.1.4.1.1.3.1) with NumberOfFrames,
FrameTime and FrameIncrementPointer. Every file carries a ``SequenceOfUltrasoundRegions``
item that locates the imaging region in the frame and gives its physical pixel size, so a
reader can crop without guessing. All identifying values are fake (``SYNTH^PATIENT^0007``);
UIDs come from ``pydicom.uid.generate_uid`` with deterministic entropy, so the same seed
regenerates the same instances.
"""
from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

from ultrafedfm.data.synth.geometry import FrameLayout
from ultrafedfm.data.synth.profiles import SiteProfile

_logger = logging.getLogger(__name__)

__all__ = ["US_IMAGE_STORAGE", "US_MULTIFRAME_IMAGE_STORAGE", "UsDicomWriter", "UsInstance", "build_dataset",
           "synthetic_uid", "write_us_dicom"]

US_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.6.1"
US_MULTIFRAME_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.3.1"
_FRAME_TIME_TAG = 0x00181063
_PIXEL_DATA_TAG = 0x7FE00010
_IMPLEMENTATION_VERSION = "UFFM_SYNTH_1"
_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_TRANSDUCER_TYPE = {"linear": "LINEAR", "convex": "CURVED LINEAR", "phased": "SECTOR_PHASED"}
# DICOM PS3.3 C.8.5.5.1: spatial format 1 = 2D, data type 1 = tissue, physical units 3 = cm.
_REGION_2D, _REGION_TISSUE, _UNITS_CM = 1, 1, 3


def synthetic_uid(*parts: object) -> str:
    """A valid DICOM UID derived from ``parts`` (same parts, same UID; different parts, unique)."""
    return generate_uid(entropy_srcs=["ultrafedfm-synth", *map(str, parts)])


@dataclass(frozen=True)
class UsInstance:
    """The fake identity of one instance: patient, study, series and image."""

    patient_name: str
    patient_id: str
    patient_birth_date: str
    patient_age: str
    study_uid: str
    series_uid: str
    sop_uid: str
    study_date: str
    study_time: str
    accession_number: str
    study_id: str
    series_number: int
    instance_number: int
    laterality: str


def _region(profile: SiteProfile, layout: FrameLayout) -> Dataset:
    x0, y0, x1, y1 = layout.region
    item = Dataset()
    item.RegionSpatialFormat = _REGION_2D
    item.RegionDataType = _REGION_TISSUE
    item.RegionFlags = 0
    item.RegionLocationMinX0 = x0
    item.RegionLocationMinY0 = y0
    item.RegionLocationMaxX1 = x1
    item.RegionLocationMaxY1 = y1
    # The reference pixel is the skin under the transducer centre, physical (0, 0) cm.
    item.ReferencePixelX0 = int(round(layout.reference_pixel[0] - x0))
    item.ReferencePixelY0 = int(round(layout.reference_pixel[1] - y0))
    item.ReferencePixelPhysicalValueX = 0.0
    item.ReferencePixelPhysicalValueY = 0.0
    item.PhysicalUnitsXDirection = _UNITS_CM
    item.PhysicalUnitsYDirection = _UNITS_CM
    item.PhysicalDeltaX = float(layout.spacing_cm)
    item.PhysicalDeltaY = float(layout.spacing_cm)
    item.TransducerFrequency = int(round(profile.center_frequency_mhz * 1000))  # kHz
    return item


def _instance_elements(instance: UsInstance, n_frames: int | None) -> list[tuple[int, str, str]]:
    """``(tag, VR, value)`` of every element that changes from one instance to the next."""
    side = "LEFT" if instance.laterality == "L" else "RIGHT"
    elements = [
        (0x00080018, "UI", instance.sop_uid),  # SOPInstanceUID
        (0x00080020, "DA", instance.study_date), (0x00080021, "DA", instance.study_date),
        (0x00080022, "DA", instance.study_date), (0x00080023, "DA", instance.study_date),
        (0x00080030, "TM", instance.study_time), (0x00080031, "TM", instance.study_time),
        (0x00080032, "TM", instance.study_time), (0x00080033, "TM", instance.study_time),
        (0x00080050, "SH", instance.accession_number),
        (0x0008103E, "LO", f"BREAST {side}"),  # SeriesDescription
        (0x00100010, "PN", instance.patient_name), (0x00100020, "LO", instance.patient_id),
        (0x00100030, "DA", instance.patient_birth_date), (0x00101010, "AS", instance.patient_age),
        (0x0020000D, "UI", instance.study_uid), (0x0020000E, "UI", instance.series_uid),
        (0x00200010, "SH", instance.study_id), (0x00200011, "IS", str(instance.series_number)),
        (0x00200013, "IS", str(instance.instance_number)), (0x00200060, "CS", instance.laterality),
    ]
    if n_frames is not None:
        elements.append((0x00280008, "IS", str(n_frames)))  # NumberOfFrames
    return elements


def _file_meta(sop_class: str, sop_uid: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


def _check_pixels(pixels: np.ndarray, profile: SiteProfile) -> bool:
    """Validate ``pixels`` for ``profile``; True for a cine loop."""
    rgb = profile.photometric == "RGB"
    if pixels.dtype != np.uint8 or pixels.ndim not in (2, 3, 4) or (rgb and pixels.shape[-1] != 3) or (
            not rgb and pixels.ndim == 4):
        raise ValueError(f"pixels must be uint8 (H, W[, 3]) or (F, H, W[, 3]) matching {profile.photometric}, "
                         f"got {pixels.dtype} {pixels.shape}")
    return pixels.ndim == (4 if rgb else 3)


def build_dataset(pixels: np.ndarray, *, profile: SiteProfile, layout: FrameLayout, instance: UsInstance,
                  frame_time_ms: float = 40.0) -> Dataset:
    """The instance as a pydicom :class:`Dataset` (the reference the fast writer reproduces).

    Args:
        pixels: ``(H, W)`` or ``(H, W, 3)`` uint8 for one frame; ``(F, H, W)`` or
            ``(F, H, W, 3)`` for a cine loop (multi-frame storage).
        profile, layout: the site and where the imaging region sits in the frame.
        instance: fake identifying values and UIDs.
        frame_time_ms: time between cine frames.
    """
    multiframe = _check_pixels(pixels, profile)
    rgb = profile.photometric == "RGB"
    sop_class = US_MULTIFRAME_IMAGE_STORAGE if multiframe else US_IMAGE_STORAGE
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, instance.sop_uid)
    ds.preamble = b"\0" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = sop_class
    ds.Modality = "US"
    ds.Manufacturer = profile.manufacturer
    ds.InstitutionName = profile.institution_name
    ds.ReferringPhysicianName = "SYNTH^REFERRER"
    ds.StationName = profile.station_name
    ds.StudyDescription = "US BREAST"
    ds.ManufacturerModelName = profile.model_name
    ds.PatientSex = "F"
    ds.BodyPartExamined = "BREAST"
    ds.DeviceSerialNumber = f"SYN-{profile.station_name}"
    ds.SoftwareVersions = "synth-1.0"
    ds.TransducerType = _TRANSDUCER_TYPE[profile.probe]
    ds.DepthOfScanField = int(round(profile.depth_cm * 10))  # mm
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 3 if rgb else 1
    ds.PhotometricInterpretation = profile.photometric
    if rgb:
        ds.PlanarConfiguration = 0
    if multiframe:
        ds.FrameTime = float(frame_time_ms)
        ds.FrameIncrementPointer = _FRAME_TIME_TAG
        ds.CineRate = int(round(1000 / frame_time_ms))
        ds.RecommendedDisplayFrameRate = int(round(1000 / frame_time_ms))
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if rgb else pixels.shape[-2:]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.SequenceOfUltrasoundRegions = [_region(profile, layout)]
    for tag, vr, value in _instance_elements(instance, pixels.shape[0] if multiframe else None):
        ds.add_new(tag, vr, value)
    ds.add_new(_PIXEL_DATA_TAG, "OB", np.ascontiguousarray(pixels).tobytes())
    return ds


def _encode(tag: int, vr: str, value: bytes) -> bytes:
    """One Explicit VR Little Endian data element."""
    if len(value) % 2:
        value += b"\0" if vr in ("UI", "OB") else b" "
    head = struct.pack("<HH2s", tag >> 16, tag & 0xFFFF, vr.encode("ascii"))
    if vr in _LONG_VRS:
        return head + struct.pack("<HI", 0, len(value)) + value
    return head + struct.pack("<H", len(value)) + value


def _encode_with_pydicom(element) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = False
    write_data_element(buffer, element)
    return buffer.getvalue()


class UsDicomWriter:
    """Writes many instances of one site fast.

    ``pydicom.dcmwrite`` spends ~4 ms per file rebuilding ~60 elements that are the same
    for every file of a site. This writer encodes the site's constant elements once with
    pydicom and per file only the instance's own elements (UIDs, names, dates, numbers,
    pixels), byte-identical to what ``dcmwrite`` produces for :func:`build_dataset`.
    """

    def __init__(self, *, profile: SiteProfile, layout: FrameLayout, frame_time_ms: float = 40.0):
        self.profile = profile
        self.layout = layout
        self.frame_time_ms = frame_time_ms
        self._templates: dict[tuple, list[tuple[int, bytes | None]]] = {}

    def _template(self, pixels: np.ndarray, instance: UsInstance) -> list[tuple[int, bytes | None]]:
        multiframe = _check_pixels(pixels, self.profile)
        key = (pixels.shape[1:] if multiframe else pixels.shape, multiframe)  # any number of frames
        if key not in self._templates:
            reference = build_dataset(pixels, profile=self.profile, layout=self.layout, instance=instance,
                                      frame_time_ms=self.frame_time_ms)
            varying = {tag for tag, _, _ in _instance_elements(instance, 1)} | {_PIXEL_DATA_TAG}
            self._templates[key] = [(int(elem.tag), None if int(elem.tag) in varying else _encode_with_pydicom(elem))
                                    for elem in reference]
        return self._templates[key]

    def write(self, path: Path, pixels: np.ndarray, *, instance: UsInstance) -> None:
        """Write one instance (parents are created); see :func:`build_dataset` for ``pixels``."""
        multiframe = _check_pixels(pixels, self.profile)
        template = self._template(pixels, instance)
        values = {tag: _encode(tag, vr, value.encode("latin-1"))
                  for tag, vr, value in _instance_elements(instance, pixels.shape[0] if multiframe else None)}
        values[_PIXEL_DATA_TAG] = _encode(_PIXEL_DATA_TAG, "OB", np.ascontiguousarray(pixels).tobytes())
        sop_class = US_MULTIFRAME_IMAGE_STORAGE if multiframe else US_IMAGE_STORAGE
        meta = b"".join([
            _encode(0x00020001, "OB", b"\0\1"),
            _encode(0x00020002, "UI", sop_class.encode("ascii")),
            _encode(0x00020003, "UI", instance.sop_uid.encode("ascii")),
            _encode(0x00020010, "UI", ExplicitVRLittleEndian.encode("ascii")),
            _encode(0x00020012, "UI", PYDICOM_IMPLEMENTATION_UID.encode("ascii")),
            _encode(0x00020013, "SH", _IMPLEMENTATION_VERSION.encode("ascii")),
        ])
        chunks = [b"\0" * 128, b"DICM", _encode(0x00020000, "UL", struct.pack("<I", len(meta))), meta]
        chunks += [values[tag] if encoded is None else encoded for tag, encoded in template]
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(b"".join(chunks))


def write_us_dicom(path: Path, pixels: np.ndarray, *, profile: SiteProfile, layout: FrameLayout,
                   instance: UsInstance, frame_time_ms: float = 40.0) -> None:
    """Write one instance with ``pydicom.dcmwrite`` (simple, slower; see :class:`UsDicomWriter`)."""
    ds = build_dataset(pixels, profile=profile, layout=layout, instance=instance, frame_time_ms=frame_time_ms)
    path.parent.mkdir(parents=True, exist_ok=True)
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
