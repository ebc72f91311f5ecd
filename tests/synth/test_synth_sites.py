"""generate_sites: layout, ground truth, determinism across seeds and workers, non-IID sites, CLI."""
from __future__ import annotations

import csv
import hashlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from PIL import Image
from scipy import ndimage

from ultrafedfm.cli import main
from ultrafedfm.data.synth import GROUND_TRUTH_COLUMNS, default_site_profiles, generate_sites, render_bmode
from ultrafedfm.data.synth.geometry import scan_converter

SIZE = (128, 176)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def site_root(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sites")
    generate_sites(out_dir=out, n_sites=3, images_per_site=8, seed=11, image_size=SIZE, cine_fraction=0.15,
                   progress=False, workers=1)
    return out


def test_layout_and_ground_truth_agree_with_the_dicom(site_root):
    for index in (1, 2, 3):
        site = site_root / f"site-{index}"
        with open(site / "ground_truth.csv", newline="") as handle:
            reader = csv.DictReader(handle)
            assert tuple(reader.fieldnames) == GROUND_TRUTH_COLUMNS
            rows = list(reader)
        files = sorted(str(p.relative_to(site / "dicom")) for p in (site / "dicom").rglob("*.dcm"))
        assert sorted({r["file"] for r in rows}) == files and len(files) == 8
        for file in files:
            ds = pydicom.dcmread(site / "dicom" / file)
            own = [r for r in rows if r["file"] == file]
            assert [int(r["frame"]) for r in own] == list(range(int(ds.get("NumberOfFrames", 1))))
            assert {r["sop_instance_uid"] for r in own} == {ds.SOPInstanceUID}
            assert len({r["label"] for r in own}) == 1
            for r in own:
                assert r["label"] in ("benign", "malignant", "normal")
                if r["label"] == "normal":
                    assert r["mask"] == ""
                    continue
                assert r["mask"].startswith("masks/")
                mask = np.asarray(Image.open(site / r["mask"]))
                assert mask.shape == (ds.Rows, ds.Columns) and set(np.unique(mask)) <= {0, 255}
                assert (mask > 0).sum() > 0
                # The mask lies on the lesion: darker than the tissue around it.
                frames = ds.pixel_array if "NumberOfFrames" in ds else ds.pixel_array[None]
                gray = frames[int(r["frame"])].astype(float)
                gray = gray.mean(axis=-1) if gray.ndim == 3 else gray
                inside = mask > 0
                ring = ndimage.binary_dilation(inside, iterations=6) & ~ndimage.binary_dilation(inside, iterations=2)
                ring &= gray > 0
                # Medians: the '+' calipers on the margin must not decide it.
                assert np.median(gray[inside]) < np.median(gray[ring]), (file, r["frame"])


def test_sites_yaml_summarises_profiles_without_phi(site_root):
    summary = yaml.safe_load((site_root / "sites.yaml").read_text())
    assert [s["name"] for s in summary["sites"]] == ["site-1", "site-2", "site-3"]
    text = (site_root / "sites.yaml").read_text()
    assert "SYNTH^PATIENT" not in text and "SYN01" not in text
    for site in summary["sites"]:
        assert sum(site["labels"].values()) == site["files"] == 8
        assert site["cine_files"] >= 1 and site["frames"] > site["files"]
        assert site["profile"]["image_size"] == list(SIZE)


def test_same_seed_same_bytes_whatever_the_workers(tmp_path, site_root):
    again = tmp_path / "again"
    generate_sites(out_dir=again, n_sites=3, images_per_site=8, seed=11, image_size=SIZE, cine_fraction=0.15,
                   progress=False, workers=2)
    assert _digest(again) == _digest(site_root)
    other = tmp_path / "other"
    generate_sites(out_dir=other, n_sites=1, images_per_site=8, seed=12, image_size=SIZE, cine_fraction=0.15,
                   progress=False, workers=1)
    assert _digest(other / "site-1") != _digest(site_root / "site-1")


def test_existing_sites_are_not_overwritten_silently(tmp_path):
    generate_sites(out_dir=tmp_path, n_sites=1, images_per_site=1, seed=0, image_size=SIZE, progress=False,
                   workers=1)
    with pytest.raises(FileExistsError, match="overwrite"):
        generate_sites(out_dir=tmp_path, n_sites=1, images_per_site=1, seed=0, image_size=SIZE, progress=False,
                       workers=1)
    generate_sites(out_dir=tmp_path, n_sites=1, images_per_site=2, seed=0, image_size=SIZE, progress=False,
                   workers=1, overwrite=True)
    assert len(list((tmp_path / "site-1" / "dicom").rglob("*.dcm"))) == 2
    # A folder that is not ours (a real store) is never deleted, even with overwrite.
    real = tmp_path / "store"
    (real / "site-1" / "dicom").mkdir(parents=True)
    (real / "site-1" / "dicom" / "patient.dcm").write_bytes(b"precious")
    with pytest.raises(FileExistsError, match="not empty"):
        generate_sites(out_dir=real, n_sites=1, images_per_site=1, seed=0, image_size=SIZE, progress=False,
                       workers=1, overwrite=True)
    assert (real / "site-1" / "dicom" / "patient.dcm").read_bytes() == b"precious"


def _features(profile, n: int = 16) -> np.ndarray:
    """Per image: mean brightness, speckle contrast (std/mean), lateral and axial speckle size
    (correlation at a 3-pixel lag)."""
    field = scan_converter(profile.geometry, profile.image_size).field
    rows = []
    for seed in range(n):
        image, _ = render_bmode(rng=np.random.default_rng(seed), profile=profile, lesion="normal")
        values = image.astype(float)
        lateral = field & np.roll(field, 3, axis=1)
        axial = field & np.roll(field, 3, axis=0)
        rows.append((values[field].mean(), values[field].std() / values[field].mean(),
                     np.corrcoef(values[lateral], np.roll(values, 3, axis=1)[lateral])[0, 1],
                     np.corrcoef(values[axial], np.roll(values, 3, axis=0)[axial])[0, 1]))
    return np.asarray(rows)


def test_sites_differ_statistically():
    profiles = default_site_profiles(4, seed=0)
    features = [_features(p) for p in profiles]
    for i in range(len(profiles)):
        for j in range(i + 1, len(profiles)):
            a, b = features[i], features[j]
            # Welch t per feature; some feature must separate every pair of sites clearly.
            t = np.abs(a.mean(0) - b.mean(0)) / np.sqrt(a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b))
            assert t.max() > 4, (profiles[i].name, profiles[j].name, t)
    mixes = {p.lesion_mix for p in profiles}
    assert len(mixes) == len(profiles), "every site has its own benign/malignant/normal mix"
    assert {p.probe for p in profiles} >= {"linear", "convex", "phased"}


def test_cli_writes_sites(tmp_path):
    out = tmp_path / "cli"
    args = ["synth", "--out", str(out), "--sites", "2", "--images-per-site", "3", "--image-size", "128x176",
            "--seed", "4", "--cine-fraction", "0", "--workers", "1", "--no-progress"]
    assert main(args) == 0
    assert len(list(out.glob("site-*/dicom/**/*.dcm"))) == 6
    assert all(pydicom.dcmread(p).SOPClassUID == "1.2.840.10008.5.1.4.1.1.6.1" for p in out.rglob("*.dcm"))
    assert main(args) == 2, "refuses to overwrite without --overwrite"
    assert main(args + ["--overwrite"]) == 0
