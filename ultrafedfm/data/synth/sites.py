"""Generate N synthetic hospital sites as folders of real ultrasound DICOM.

Layout written under ``out_dir`` (others depend on it, keep it)::

    sites.yaml                       each site's acquisition profile and counts (no PHI)
    site-1/dicom/<patient>/<study>/<series>/IM00001.dcm
    site-1/ground_truth.csv          file, sop_instance_uid, frame, label, mask
    site-1/masks/IM00001_f000.png    lesion masks (0/255), one per frame with a lesion

``file`` in ``ground_truth.csv`` is relative to the site's ``dicom/`` folder; ``mask`` is
relative to the site folder (``masks/...``) and empty for normal images. Ground truth stays
at the site: it is for fine-tuning evaluation, never for federated pretraining.

Everything is a pure function of ``seed``: each image draws from its own
``SeedSequence(seed, spawn_key=(site, image))``, so the output does not depend on the
number of worker processes.
"""
from __future__ import annotations

import csv
import datetime as dt
import functools
import logging
import multiprocessing
import os
import shutil
import struct
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from ultrafedfm.config import to_mapping
from ultrafedfm.data.synth.bmode import render_bmode, render_cine, sample_scene
from ultrafedfm.data.synth.dicom_writer import UsDicomWriter, UsInstance, synthetic_uid
from ultrafedfm.data.synth.geometry import FrameLayout, frame_layout
from ultrafedfm.data.synth.overlay import Annotation, burn_in
from ultrafedfm.data.synth.profiles import SiteProfile, default_site_profiles, with_image_size

_logger = logging.getLogger(__name__)

__all__ = ["GROUND_TRUTH_COLUMNS", "generate_sites"]

GROUND_TRUTH_COLUMNS = ("file", "sop_instance_uid", "frame", "label", "mask")
_LABELS = ("benign", "malignant", "normal")
_CINE_FRAMES = (4, 8)  # frames per cine loop, inclusive range (each frame costs a full render)
_FIRST_STUDY_DAY = dt.date(2019, 1, 1)
_GENERATOR = "ultrafedfm synth"  # marks sites.yaml, so --overwrite never deletes a real store


@dataclass(frozen=True)
class _ImageJob:
    site_index: int
    image_index: int
    label: str
    n_frames: int  # 1: a single-frame file
    relative_path: str  # under the site's dicom/ folder
    instance: UsInstance


def _plan_site(*, seed: int, site_index: int, profile: SiteProfile, n_images: int, cine_fraction: float
               ) -> list[_ImageJob]:
    """Patients, studies, labels and file names of one site (cheap; run in the parent)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1, site_index)))
    n_cine = 0 if cine_fraction <= 0 or n_images == 0 else max(1, round(n_images * cine_fraction))
    cine = set(rng.choice(n_images, size=min(n_cine, n_images), replace=False).tolist()) if n_images else set()
    jobs: list[_ImageJob] = []
    patient = 0
    while len(jobs) < n_images:
        patient += 1
        label = _LABELS[int(rng.choice(3, p=profile.lesion_mix))]
        patient_id = f"SYN{site_index + 1:02d}{patient:05d}"
        study_day = _FIRST_STUDY_DAY + dt.timedelta(days=int(rng.integers(0, 5 * 365)))
        age = int(rng.integers(28, 82))
        birth = study_day - dt.timedelta(days=365 * age + int(rng.integers(0, 365)))
        study_time = f"{rng.integers(7, 19):02d}{rng.integers(0, 60):02d}{rng.integers(0, 60):02d}"
        laterality = "L" if rng.random() < 0.5 else "R"
        study_uid = synthetic_uid(seed, site_index, patient, "study")
        n_views = min(int(rng.integers(1, 5)), n_images - len(jobs))
        for view in range(n_views):
            index = len(jobs)
            n_frames = int(rng.integers(_CINE_FRAMES[0], _CINE_FRAMES[1] + 1)) if index in cine else 1
            series = 1 if n_frames == 1 else 2 + view
            instance = UsInstance(
                patient_name=f"SYNTH^PATIENT^{patient:04d}", patient_id=patient_id,
                patient_birth_date=birth.strftime("%Y%m%d"), patient_age=f"{age:03d}Y",
                study_uid=study_uid, series_uid=synthetic_uid(seed, site_index, patient, "series", series),
                sop_uid=synthetic_uid(seed, site_index, index, "instance"),
                study_date=study_day.strftime("%Y%m%d"), study_time=study_time,
                accession_number=f"ACC{site_index + 1:02d}{patient:06d}", study_id=f"{patient:04d}",
                series_number=series, instance_number=view + 1, laterality=laterality)
            path = f"{patient_id}/ST0001/SE{series:03d}/IM{index + 1:05d}.dcm"
            jobs.append(_ImageJob(site_index, index, label, n_frames, path, instance))
    return jobs


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _mask_png(mask: np.ndarray) -> bytes:
    """An 8-bit greyscale PNG of ``mask`` (0/255), like BUSI's masks.

    Written directly (filter 0 rows, zlib level 1): a mostly-black mask compresses in
    microseconds, and Pillow's save machinery cost more than the rest of a mask's work.
    """
    height, width = mask.shape
    rows = np.zeros((height, width + 1), dtype=np.uint8)  # a leading 0 per row: filter type None
    rows[:, 1:] = mask
    rows[:, 1:] *= 255
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"".join([b"\x89PNG\r\n\x1a\n", _png_chunk(b"IHDR", header),
                     _png_chunk(b"IDAT", zlib.compress(rows.tobytes(), 1)), _png_chunk(b"IEND", b"")])


@functools.lru_cache(maxsize=16)
def _site_writer(profile: SiteProfile, layout: FrameLayout) -> UsDicomWriter:
    # One per site and process: its templates cost ~20 ms to encode, a file ~0.5 ms.
    return UsDicomWriter(profile=profile, layout=layout)


def _render_jobs(seed: int, profile: SiteProfile, site_dir: Path, jobs: list[_ImageJob]) -> list[dict]:
    """Render, annotate and write ``jobs`` of one site; returns their ground-truth rows."""
    layout = frame_layout(profile.geometry, profile.image_size)
    writer = _site_writer(profile, layout)
    made: set[Path] = set()  # folders already created (mkdir per file is a syscall each)

    def folder_for(path: Path) -> Path:
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        return path

    rows = []
    for job in jobs:
        rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(2, job.site_index, job.image_index)))
        scene = sample_scene(rng, profile, job.label)
        if job.n_frames == 1:
            image, mask = render_bmode(rng=rng, profile=profile, lesion=job.label, scene=scene)
            frames, masks = image[None], mask[None]
        else:
            frames, masks = render_cine(rng=rng, profile=profile, lesion=job.label, n_frames=job.n_frames, scene=scene)
        with_calipers = job.label != "normal" and job.n_frames == 1 and rng.random() < profile.caliper_fraction
        inst = job.instance
        note = Annotation(patient_name=inst.patient_name, patient_id=inst.patient_id,
                          acquired=f"{inst.study_date[:4]}-{inst.study_date[4:6]}-{inst.study_date[6:]} "
                                   f"{inst.study_time[:2]}:{inst.study_time[2:4]}:{inst.study_time[4:]}",
                          gain_db=scene.gain_db, laterality=inst.laterality)
        shown = [burn_in(frame, profile=profile, layout=layout, note=note, calipers_on=mask if with_calipers else None)
                 for frame, mask in zip(frames, masks)]
        writer.write(folder_for(site_dir / "dicom" / job.relative_path),
                     np.stack(shown) if job.n_frames > 1 else shown[0], instance=inst)
        for frame_index, mask in enumerate(masks):
            mask_rel = ""
            if job.label != "normal":
                mask_rel = f"masks/{Path(job.relative_path).stem}_f{frame_index:03d}.png"
                folder_for(site_dir / mask_rel).write_bytes(_mask_png(mask))
            rows.append(dict(file=job.relative_path, sop_instance_uid=inst.sop_uid, frame=frame_index,
                             label=job.label, mask=mask_rel))
    return rows


def _written_by_us(site_dir: Path) -> bool:
    """True only for a site folder an earlier ``generate_sites`` wrote (never a real store)."""
    summary = site_dir.parent / "sites.yaml"
    try:
        generator = (yaml.safe_load(summary.read_text(encoding="utf-8")) or {}).get("generator")
    except (OSError, yaml.YAMLError, AttributeError):
        return False
    return generator == _GENERATOR and (site_dir / "ground_truth.csv").is_file()


def _prepare_site_dir(site_dir: Path, overwrite: bool) -> None:
    if site_dir.exists() and any(site_dir.iterdir()):
        ours = _written_by_us(site_dir)
        if not overwrite or not ours:
            raise FileExistsError(f"{site_dir} already exists and is not empty; choose another --out folder"
                                  + (" or pass overwrite=True (--overwrite) to regenerate it" if ours else ""))
        shutil.rmtree(site_dir)
    site_dir.mkdir(parents=True, exist_ok=True)


def _pool_context() -> multiprocessing.context.BaseContext:
    # fork starts workers in milliseconds; the children use only numpy/pydicom/PIL.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def generate_sites(*, out_dir: Path, n_sites: int, images_per_site: int, seed: int = 0,
                   image_size: tuple[int, int] | None = None, cine_fraction: float = 0.05, progress: bool = True,
                   workers: int | None = None, overwrite: bool = False,
                   profiles: list[SiteProfile] | None = None) -> list[Path]:
    """Write ``n_sites`` synthetic hospital sites of ``images_per_site`` DICOM files each.

    Args:
        out_dir: parent folder; ``site-1`` ... ``site-N`` and ``sites.yaml`` are written in it.
        n_sites: number of sites (profiles from :func:`default_site_profiles`).
        images_per_site: DICOM files per site; a cine loop counts as one file.
        seed: everything (pixels, labels, UIDs, names) is a function of it.
        image_size: ``(H, W)`` for every site's frames; ``None`` keeps each site's own size.
        cine_fraction: share of files written as multi-frame cine loops (at least one per
            site when positive).
        progress: show a progress bar.
        workers: processes (default: all cores); ``1`` runs in this process.
        overwrite: replace site folders this function wrote before (otherwise refuse).
        profiles: explicit site profiles instead of the defaults (length ``n_sites``).

    Returns:
        The site folders, in order.
    """
    profiles = _checked_profiles(n_sites=n_sites, images_per_site=images_per_site, cine_fraction=cine_fraction,
                                 seed=seed, image_size=image_size, profiles=profiles)
    out_dir = Path(out_dir)
    site_dirs = [out_dir / p.name for p in profiles]
    for site_dir in site_dirs:
        _prepare_site_dir(site_dir, overwrite)
    plans = [_plan_site(seed=seed, site_index=i, profile=p, n_images=images_per_site, cine_fraction=cine_fraction)
             for i, p in enumerate(profiles)]
    rows = _render_sites(seed=seed, profiles=profiles, site_dirs=site_dirs, plans=plans, workers=workers,
                         images_per_site=images_per_site, progress=progress)
    summary = [_write_ground_truth(profile, site_dir, site_rows, plan)
               for profile, site_dir, site_rows, plan in zip(profiles, site_dirs, rows, plans)]
    (out_dir / "sites.yaml").write_text(yaml.safe_dump(
        dict(generator=_GENERATOR, seed=seed, images_per_site=images_per_site, cine_fraction=cine_fraction,
             sites=summary), sort_keys=False), encoding="utf-8")
    return site_dirs


def _checked_profiles(*, n_sites: int, images_per_site: int, cine_fraction: float, seed: int,
                      image_size: tuple[int, int] | None, profiles: list[SiteProfile] | None) -> list[SiteProfile]:
    """The sites' profiles at their final frame size; bad arguments fail here, not in a worker."""
    if n_sites < 1 or images_per_site < 0:
        raise ValueError(f"need n_sites >= 1 and images_per_site >= 0, got {n_sites} and {images_per_site}")
    if not 0.0 <= cine_fraction <= 1.0:
        raise ValueError(f"cine_fraction must be within 0..1, got {cine_fraction}")
    profiles = list(profiles) if profiles is not None else default_site_profiles(n_sites, seed)
    if len(profiles) != n_sites:
        raise ValueError(f"got {len(profiles)} profiles for {n_sites} sites")
    profiles = [with_image_size(p, image_size) for p in profiles]
    for profile in profiles:
        frame_layout(profile.geometry, profile.image_size)  # a frame too small fails here, not in a worker
    return profiles


def _render_sites(*, seed: int, profiles: list[SiteProfile], site_dirs: list[Path], plans: list[list[_ImageJob]],
                  workers: int | None, images_per_site: int, progress: bool) -> list[list[dict]]:
    """Render every planned image, in worker processes when there are several; ground-truth rows per site."""
    workers = max(1, min(workers or os.cpu_count() or 1, len(profiles) * max(1, images_per_site)))
    chunk = int(np.clip(images_per_site // (4 * workers) or 1, 4, 64))
    tasks = [(seed, profiles[i], site_dirs[i], plan[start:start + chunk])
             for i, plan in enumerate(plans) for start in range(0, len(plan), chunk)]
    rows: list[list[dict]] = [[] for _ in profiles]
    bar = tqdm(total=len(profiles) * images_per_site, desc="synth", unit="img", disable=not progress)
    try:
        if workers == 1:
            for task in tasks:
                rows[task[3][0].site_index] += _render_jobs(*task)
                bar.update(len(task[3]))
        else:
            with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context()) as pool:
                futures = [(task, pool.submit(_render_jobs, *task)) for task in tasks]
                for task, future in futures:
                    rows[task[3][0].site_index] += future.result()
                    bar.update(len(task[3]))
    finally:
        bar.close()
    return rows


def _write_ground_truth(profile: SiteProfile, site_dir: Path, site_rows: list[dict], plan: list[_ImageJob]) -> dict:
    """Write the site's ``ground_truth.csv``; its summary for ``sites.yaml``."""
    site_rows.sort(key=lambda r: (r["file"], r["frame"]))
    with open(site_dir / "ground_truth.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=GROUND_TRUTH_COLUMNS)
        writer.writeheader()
        writer.writerows(site_rows)
    labels = {label: sum(job.label == label for job in plan) for label in _LABELS}
    summary = dict(name=profile.name, files=len(plan), cine_files=sum(j.n_frames > 1 for j in plan),
                   frames=sum(j.n_frames for j in plan), labels=labels, profile=to_mapping(profile))
    _logger.info("%s: %d files (%d cine, %d frames), labels %s -> %s", profile.name, len(plan),
                 summary["cine_files"], summary["frames"], labels, site_dir)
    return summary
