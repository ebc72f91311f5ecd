"""A DICOM folder with good and broken files: good ones are cached, each bad one reported with its reason."""
from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from ultrafedfm.config import ConfigError, load_config
from ultrafedfm.data import ingest as ingest_module
from ultrafedfm.data.cache import local_report_dir, open_cache, salted_key
from ultrafedfm.data.ingest import ingest_dicom_folder
from ultrafedfm.data.ingest_config import IngestConfig

CONFIG = IngestConfig(image_size=32, frame_stride=10)


def _testfile(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"{name} is not installed (pip install pydicom-data)")
    return Path(path)


def _report(cache: Path) -> dict[str, tuple[str, str]]:
    """The path-bearing report for the site's IT: beside the cache, never in it."""
    with open(local_report_dir(cache) / "ingest_report.csv", newline="", encoding="utf-8") as f:
        return {row["path"]: (row["reason"], row["detail"]) for row in csv.DictReader(f)}


def _us_copy(path: Path, *, name: str = "examples_rgb_color.dcm", **attributes) -> Path:
    ds = pydicom.dcmread(_testfile(name))
    ds.SOPInstanceUID = generate_uid()
    for key, value in attributes.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)
    return path


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    src = tmp_path / "src"
    _us_copy(src / "good" / "IM0001")
    (src / "good" / "nested" / "deeper").mkdir(parents=True)
    shutil.copy(_testfile("examples_ybr_color.dcm"), src / "good" / "nested" / "deeper" / "cine.dcm")
    shutil.copy(_testfile("examples_jpeg2k.dcm"), src / "good" / "j2k")
    # A truncated copy of another instance (a copy of IM0001 would count as already cached).
    data = _us_copy(tmp_path / "other.dcm").read_bytes()
    (src / "bad").mkdir()
    (src / "bad" / "truncated.dcm").write_bytes(data[: int(len(data) * 0.6)])
    (src / "bad" / "notes.txt").write_text("not an image at all\n")
    shutil.copy(_testfile("CT_small.dcm"), src / "bad" / "ct.dcm")
    ds = pydicom.dcmread(src / "good" / "IM0001")
    del ds.PixelData
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(src / "bad" / "nopixels.dcm")
    # MPEG-4 video: no installed decoder can read it.
    ds = pydicom.dcmread(_testfile("examples_jpeg2k.dcm"))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.102"
    ds.SOPInstanceUID = generate_uid()
    ds.save_as(src / "bad" / "video.dcm", enforce_file_format=True)
    (src / "DICOMDIR").write_bytes(b"\0" * 132)  # an index, not an image: skipped silently
    return src


def test_good_files_are_cached_and_each_bad_file_is_reported(tmp_path, mixed_folder):
    cache = tmp_path / "cache"
    summary = ingest_dicom_folder(source=mixed_folder, cache=cache, config=CONFIG, workers=2, progress=False)
    assert summary.added == 3
    assert summary.images_written == 1 + 3 + 1  # 30-frame loop at stride 10 gives 3
    report = _report(cache)
    assert {path: reason for path, (reason, _) in report.items()} == {
        "bad/truncated.dcm": "truncated_or_corrupt",
        "bad/notes.txt": "not_dicom",
        "bad/ct.dcm": "not_ultrasound",
        "bad/nopixels.dcm": "no_pixel_data",
        "bad/video.dcm": "decoder_missing",
    }
    assert "CT" in report["bad/ct.dcm"][1]
    assert "video" in report["bad/video.dcm"][1]  # no pip package decodes it: say what to do instead
    assert summary.rejected == {"decoder_missing": 1, "no_pixel_data": 1, "not_dicom": 1,
                                "not_ultrasound": 1, "truncated_or_corrupt": 1}
    assert len(open_cache(cache)) == 5


def test_rerun_adds_only_new_files(tmp_path, mixed_folder):
    cache = tmp_path / "cache"
    first = ingest_dicom_folder(source=mixed_folder, cache=cache, config=CONFIG, workers=1, progress=False)
    manifest = (cache / "manifest.jsonl").read_text()
    again = ingest_dicom_folder(source=mixed_folder, cache=cache, config=CONFIG, workers=1, progress=False)
    assert again.added == 0 and again.images_written == 0
    assert again.skipped_existing == first.added
    assert (cache / "manifest.jsonl").read_text() == manifest
    _us_copy(mixed_folder / "good" / "IM0002")
    third = ingest_dicom_folder(source=mixed_folder, cache=cache, config=CONFIG, workers=1, progress=False)
    assert (third.added, third.images_written, third.skipped_existing) == (1, 1, first.added)
    assert len(open_cache(cache)) == first.images_written + 1


def test_same_instance_twice_is_cached_once(tmp_path):
    src = tmp_path / "src"
    _us_copy(src / "a")
    shutil.copy(src / "a", src / "copy_of_a")
    summary = ingest_dicom_folder(source=src, cache=tmp_path / "cache", config=CONFIG, workers=1, progress=False)
    assert (summary.added, summary.skipped_existing, summary.images_written) == (1, 1, 1)


def test_cache_with_another_image_size_is_refused(tmp_path):
    src = tmp_path / "src"
    _us_copy(src / "a")
    ingest_dicom_folder(source=src, cache=tmp_path / "cache", config=CONFIG, workers=1, progress=False)
    with pytest.raises(ValueError, match="image_size"):
        ingest_dicom_folder(source=src, cache=tmp_path / "cache", config=IngestConfig(image_size=64), progress=False)


def test_exclude_patterns_are_reported_as_excluded(tmp_path):
    src = tmp_path / "src"
    _us_copy(src / "keep" / "a.dcm")
    _us_copy(src / "skip" / "b.dcm")
    config = IngestConfig(image_size=32, exclude=("skip/*",))
    summary = ingest_dicom_folder(source=src, cache=tmp_path / "cache", config=config, workers=1, progress=False)
    assert summary.added == 1
    assert _report(tmp_path / "cache") == {"skip/b.dcm": ("excluded", "matches the include/exclude patterns of the config")}


def _crash_on_marked_files(relpath, ctx):
    if "crash" in relpath:
        os._exit(3)  # what a segfaulting decoder does to its worker
    return _real_ingest_dicom(relpath, ctx)


_real_ingest_dicom = ingest_module._ingest_dicom


@pytest.mark.skipif(sys.platform != "linux", reason="relies on fork-started workers inheriting the patched function")
def test_a_worker_crash_costs_only_the_crashing_file(tmp_path, monkeypatch):
    src = tmp_path / "src"
    for i in range(20):  # several chunks, two crashing files in different ones
        _us_copy(src / f"ok{i:02d}.dcm")
    _us_copy(src / "crash_a.dcm")
    _us_copy(src / "ok05_crash.dcm")
    monkeypatch.setattr(ingest_module, "_ingest_dicom", _crash_on_marked_files)
    summary = ingest_dicom_folder(source=src, cache=tmp_path / "cache", config=CONFIG, workers=2, progress=False)
    assert summary.added == 20
    crashed = ("truncated_or_corrupt", "the decoder crashed the worker process")
    assert _report(tmp_path / "cache") == {"crash_a.dcm": crashed, "ok05_crash.dcm": crashed}


def test_missing_decoder_names_the_package(tmp_path):
    """Without a JPEG 2000 decoder, such files are reported with the package to install."""
    src = tmp_path / "src"
    shutil.copy(_testfile("examples_jpeg2k.dcm"), src.mkdir() or src / "j2k.dcm")
    code = (
        # As on a site without a JPEG 2000 decoder: unregister every plug-in of pydicom's decoder.
        "from pydicom.pixels import get_decoder\n"
        "decoder = get_decoder('1.2.840.10008.1.2.4.90')\n"
        "for label in list(decoder.available_plugins):\n"
        "    decoder.remove_plugin(label)\n"
        "from pathlib import Path\n"
        "from ultrafedfm.data.ingest import ingest_dicom_folder\n"
        "from ultrafedfm.data.ingest_config import IngestConfig\n"
        f"s = ingest_dicom_folder(source=Path({str(src)!r}), cache=Path({str(tmp_path / 'cache')!r}),"
        " config=IngestConfig(image_size=32), workers=1, progress=False)\n"
        "print(s.rejected)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    reason, detail = _report(tmp_path / "cache")["j2k.dcm"]
    assert reason == "decoder_missing"
    assert "pylibjpeg-openjpeg" in detail


PHI = {
    "PatientName": "Zyxwvutson^Quintessa",
    "PatientID": "PID-90817263",
    "PatientBirthDate": "19230405",
    "StudyDate": "20190807",
    "InstitutionName": "Saint Qwertyuiop Hospital",
    "ReferringPhysicianName": "Drbrainfog^Ottoline",
    "AccessionNumber": "ACC77553311",
}


def test_no_phi_in_cache_or_logs(tmp_path):
    src = tmp_path / "src"
    uids = []
    for i, name in enumerate(["examples_rgb_color.dcm", "examples_ybr_color.dcm", "examples_palette.dcm"]):
        uid = generate_uid()
        uids.append(uid)
        _us_copy(src / f"img{i}", name=name, SOPInstanceUID=uid, StudyInstanceUID=generate_uid(), **PHI)
    # Rejected files must not leak either, not even through a folder named after the patient.
    _us_copy(src / "Zyxwvutson_Quintessa" / "ct", name="CT_small.dcm", **PHI)
    cache = tmp_path / "cache"
    run = subprocess.run(
        [sys.executable, "-m", "ultrafedfm.cli", "-v", "ingest", "--source", str(src), "--cache", str(cache),
         "--workers", "2", "--image-size", "32"],
        capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr
    logs = run.stdout + run.stderr
    assert "ingest done" in logs
    secrets = list(PHI.values()) + uids + ["Zyxwvutson", "Quintessa", "Qwertyuiop"]
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert len(files) >= 7  # cache.json, salt, manifest, report and the images
    for path in files:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{secret!r} found in {path.relative_to(cache)}"
    for secret in secrets:
        assert secret not in logs
    # IT still finds the file: the LOCAL report beside the cache names it.
    assert _report(cache) == {"Zyxwvutson_Quintessa/ct": ("not_ultrasound", "Modality (0008,0060) is CT")}


def test_cache_keeps_keyed_hashes_and_counts_the_local_report_keeps_paths(tmp_path, mixed_folder):
    cache = tmp_path / "cache"
    summary = ingest_dicom_folder(source=mixed_folder, cache=cache, config=CONFIG, workers=1, progress=False)
    local = local_report_dir(cache)
    assert summary.report_path == local / "ingest_report.csv" and not summary.report_path.is_relative_to(cache)
    assert (local / "report.key").stat().st_mode & 0o777 == 0o600
    assert "LOCAL" in (local / "README.txt").read_text()
    with open(cache / "ingest_report.csv", newline="", encoding="utf-8") as f:
        in_cache = list(csv.DictReader(f))
    with open(summary.report_path, newline="", encoding="utf-8") as f:
        by_key = {row["file_key"]: row for row in csv.DictReader(f)}
    assert set(in_cache[0]) == {"file_key", "reason"}  # no path, no detail
    assert {row["file_key"]: row["reason"] for row in in_cache} == {k: r["reason"] for k, r in by_key.items()}
    assert {r["path"] for r in by_key.values()} == set(_report(cache))
    counts = json.loads((cache / "ingest_summary.json").read_text())
    assert counts["rejected"] == summary.rejected and counts["added"] == 3 and counts["files_seen"] == 8
    # The keys are stable across runs (IT can follow a file) and are not the cache's own salted keys.
    ingest_dicom_folder(source=mixed_folder, cache=cache, config=CONFIG, workers=1, progress=False)
    with open(cache / "ingest_report.csv", newline="", encoding="utf-8") as f:
        assert {row["file_key"] for row in csv.DictReader(f)} == set(by_key)
    salt = bytes.fromhex((cache / "salt.key").read_text().strip())
    assert salted_key(salt, "source-file", "bad/ct.dcm") not in by_key


def test_salt_is_private(tmp_path):
    src = tmp_path / "src"
    _us_copy(src / "a")
    ingest_dicom_folder(source=src, cache=tmp_path / "cache", config=CONFIG, workers=1, progress=False)
    assert (tmp_path / "cache" / "salt.key").stat().st_mode & 0o777 == 0o600
    entry = json.loads((tmp_path / "cache" / "manifest.jsonl").read_text().splitlines()[0])
    assert set(entry) == {"key", "instance", "image", "source", "frame", "label", "mask"}


def test_config_loads_from_site_yaml(tmp_path):
    site = tmp_path / "site.yaml"
    site.write_text("ingest:\n  image_size: 128\n  frame_stride: 2\n  crop: regions\n  exclude: ['*.txt']\n")
    config = load_config(IngestConfig, site, section="ingest")
    assert (config.image_size, config.frame_stride, config.crop, config.exclude) == (128, 2, "regions", ("*.txt",))
    site.write_text("ingest:\n  frame_stride: 0\n")
    with pytest.raises(ConfigError, match=r"ingest\.frame_stride"):
        load_config(IngestConfig, site, section="ingest")
    site.write_text("ingest:\n  crop: sector\n")
    with pytest.raises(ConfigError, match=r"ingest\.crop"):
        load_config(IngestConfig, site, section="ingest")


def test_cli_reports_a_folder_without_usable_images(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "readme.txt").write_text("nothing here")
    from ultrafedfm.cli import main
    assert main(["ingest", "--source", str(tmp_path / "src"), "--cache", str(tmp_path / "cache"), "--no-progress"]) == 1
    assert _report(tmp_path / "cache")["readme.txt"][0] == "not_dicom"
