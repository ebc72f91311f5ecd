"""Benchmark the synthetic-site generator against the 200 images/s goal.

Measures, in one run on the same profiles:
  * ``render_bmode`` alone (pixel arrays in memory, one process, then a 2-process pool);
  * ``generate_sites`` end to end (render + annotate + write DICOM, masks, CSV, YAML)
    with 1 and 2 worker processes.
Prints images/s, CPU ms per image and the ratio to the goal side by side. The build machine's
two cores are shared with other jobs, so next to the wall-clock rate it prints the CPU-bound
rate: processes x images / CPU seconds, what the same work gives with a core per process.

    .venv/bin/python bench/bench_synth.py [--sites 5] [--images-per-site 200] [--render-images 400] [--repeats 3]
"""
from __future__ import annotations

import argparse
import io
import multiprocessing
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

from ultrafedfm.data.synth import default_site_profiles, generate_sites, render_bmode

GOAL = 200.0  # images per second on the 2-core build machine
LABELS = ("benign", "malignant", "normal")


def _render_many(args: tuple[int, int, int]) -> int:
    n_sites, start, count = args
    profiles = default_site_profiles(n_sites, seed=0)
    for i in range(start, start + count):
        render_bmode(rng=np.random.default_rng(i), profile=profiles[i % n_sites], lesion=LABELS[i % 3])
    return count


def _children_cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _timed(fn) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), _children_cpu()
    fn()
    return time.perf_counter() - wall, _children_cpu() - cpu


def _user_system() -> tuple[float, float]:
    t = os.times()
    return t.user + t.children_user, t.system + t.children_system


def _where_time_goes(out: Path, total: int, user_s: float, system_s: float, render_ms_per_frame: float) -> None:
    """Per-file user/system CPU of one generate_sites run, frames per file, and pydicom.dcmwrite alone."""
    files = sorted(out.rglob("*.dcm"))
    frames = sum(int(pydicom.dcmread(f, stop_before_pixels=True).get("NumberOfFrames", 1) or 1) for f in files)
    user_ms, system_ms = 1000 * user_s / total, 1000 * system_s / total
    per_file = frames / len(files)
    print(f"where a file's time goes (generate_sites, 1 worker, {total} files): {user_ms:.1f} ms user + "
          f"{system_ms:.1f} ms system CPU per file; {per_file:.2f} frames per file; rendering "
          f"({render_ms_per_frame:.2f} ms CPU per frame) is ~{render_ms_per_frame * per_file / user_ms:.0%} of the user time")
    sample = [pydicom.dcmread(f) for f in files[:100]]
    start = time.process_time()
    for ds in sample:
        pydicom.dcmwrite(io.BytesIO(), ds, enforce_file_format=True)
    print(f"pydicom.dcmwrite alone on {len(sample)} of these datasets: "
          f"{1000 * (time.process_time() - start) / len(sample):.2f} ms CPU per file")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--images-per-site", type=int, default=200)
    parser.add_argument("--render-images", type=int, default=400)
    parser.add_argument("--cine-fraction", type=float, default=0.05)
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats; rows are medians")
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    _render_many((args.sites, 0, 3 * args.sites))  # warm caches (scan-conversion tables, FFT plans)
    n, half = args.render_images, args.render_images // 2
    total = args.sites * args.images_per_site

    def render_in_pool() -> None:
        # Timed including the pool's start and shutdown, so the children's CPU time is counted.
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) as pool:
            list(pool.map(_render_many, [(args.sites, 0, half), (args.sites, half, n - half)]))

    breakdown = None

    def generate(workers: int) -> None:
        nonlocal breakdown
        out = Path(tempfile.mkdtemp(prefix="bench_synth_"))
        try:
            user, system = _user_system()
            generate_sites(out_dir=out, n_sites=args.sites, images_per_site=args.images_per_site, seed=0,
                           cine_fraction=args.cine_fraction, progress=False, workers=workers)
            user, system = (after - before for after, before in zip(_user_system(), (user, system)))
            assert sum(1 for _ in out.rglob("*.dcm")) == total
            if workers == 1 and breakdown is None:
                breakdown, out = (out, user, system), None  # looked at after the table
        finally:
            if out is not None:
                shutil.rmtree(out, ignore_errors=True)

    cases = [("render_bmode, 1 process", n, 1, lambda: _render_many((args.sites, 0, n))),
             ("render_bmode, 2 processes", n, 2, render_in_pool),
             ("generate_sites, 1 worker (DICOM)", total, 1, lambda: generate(1)),
             ("generate_sites, 2 workers (DICOM)", total, 2, lambda: generate(2))]
    timings: dict[str, list[tuple[float, float]]] = {name: [] for name, *_ in cases}
    for r in range(args.repeats):  # interleaved: each case once per repeat, medians below
        for name, _, _, fn in cases:
            timings[name].append(_timed(fn))
    rows = [(name, count, float(np.median([w for w, _ in timings[name]])),
             float(np.median([c for _, c in timings[name]])), processes) for name, count, processes, _ in cases]

    print(f"machine: {os.cpu_count()} cores, load average (1 min) before {load_before:.2f}, after "
          f"{os.getloadavg()[0]:.2f} (other processes share the cores); goal {GOAL:.0f} images/s")
    print(f"sites {args.sites}, default per-site frame sizes, cine fraction {args.cine_fraction}, "
          f"median of {args.repeats} interleaved repeats")
    print(f"| {'case':40s} | {'images':>6s} | {'wall s':>6s} | {'img/s':>6s} | {'/ goal':>6s} | "
          f"{'CPU ms/img':>10s} | {'CPU-bound img/s':>15s} | {'/ goal':>6s} |")
    print(f"|{'-' * 42}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 8}|{'-' * 12}|{'-' * 17}|{'-' * 8}|")
    for name, count, wall, cpu, processes in rows:
        rate = count / wall
        # What the same CPU work gives when each process has a core of its own.
        bound = processes * count / cpu
        print(f"| {name:40s} | {count:6d} | {wall:6.2f} | {rate:6.1f} | {rate / GOAL:6.2f} | "
              f"{1000 * cpu / count:10.2f} | {bound:15.1f} | {bound / GOAL:6.2f} |")
    out, user, system = breakdown
    try:
        _where_time_goes(out, total, user, system, render_ms_per_frame=1000 * rows[0][3] / rows[0][1])
    finally:
        shutil.rmtree(out, ignore_errors=True)

if __name__ == "__main__":
    main()
