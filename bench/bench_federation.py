"""Federation overhead of MAE pretraining on NVIDIA FLARE (simulator, one machine).

overhead = (round wall time - slowest site's training time) / round wall time

The round wall time runs from the end of one round to the end of the next, as the server's
TensorBoard events mark them: they are written right after a round's checkpoint is saved, so the
time includes everything the server does for a round -- building the round, sending the global
model, the sites loading it, computing and sending the delta, FLARE's task polling, aggregation,
the atomic per-round checkpoint, rounds.jsonl -- and round 1 runs from the moment the run starts
(the TensorBoard writer is opened after the initial model is built). "Training time" is what each
site's ``train_local`` call measured, read from the figures each simulated site keeps on its own
disk (the server never learns it). Round 1 also pays for starting the sites' training processes
and opening their caches, so it is reported apart; the other columns are medians over rounds
2..R. ``save s`` is the part of a round outside the sites' replies: round wall time minus the
round's own ``duration_s`` (which the server stops before saving), i.e. the checkpoint and the
bookkeeping. Each preset runs with secure aggregation on and off, side by side, and the ratio of
their round times is printed; the headline lines are computed from the rows above them.

    .venv/bin/python bench/bench_federation.py --presets tiny                # 3 sites, secagg off and on
    .venv/bin/python bench/bench_federation.py --sites 2 --secure-aggregation off
    .venv/bin/python bench/bench_federation.py --presets small --images-per-site 500 --image-size 112 \
        --batch-size 64 --rounds 2 --sites 2 --secure-aggregation off
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

from ultrafedfm.data.cache import CacheEntry, ManifestWriter, image_relpath, init_cache, salted_key, write_png
from ultrafedfm.flare.deploy.job_builder import export_job_folder
from ultrafedfm.federation.job_spec import JOB_SPECS
from ultrafedfm.federation.run_state import RunState
from ultrafedfm.federation.site_figures import read_site_figures, site_figures_path
from ultrafedfm.flare.deploy.simulation import prepare_workspace, run_simulation

_logger = logging.getLogger("bench_federation")


def make_cache(root: Path, *, n_images: int, size: int, seed: int) -> Path:
    """A site cache of smooth random images (ingest format), written directly for speed."""
    rng = np.random.default_rng(seed)
    salt = init_cache(root, image_size=size)
    yy, xx = np.mgrid[0:size, 0:size] / size
    with ManifestWriter(root) as manifest:
        for i in range(n_images):
            fx, fy, phase = rng.uniform(1, 4, size=3)
            img = 0.5 + 0.3 * np.sin(6.28 * (fx * xx + fy * yy) + phase) + 0.05 * rng.standard_normal((size, size))
            key = salted_key(salt, "bench", i)
            write_png(root, image_relpath(key), (np.clip(img, 0, 1) * 255).astype(np.uint8))
            manifest.add(CacheEntry(key=key, instance=key, image=image_relpath(key), source="image"))
    return root


def run_preset(args: argparse.Namespace, preset: str, image_size: int, tmp: Path, *, secure: bool) -> dict:
    sites = [f"site-{i}" for i in range(1, args.sites + 1)]
    tmp = tmp / preset / ("secagg" if secure else "plain")
    caches = {n: make_cache(tmp / n, n_images=args.images_per_site, size=image_size, seed=i)
              for i, n in enumerate(sites)}
    spec = dataclasses.replace(
        JOB_SPECS["mae_pretrain_tiny"], name=f"bench_{preset}", preset=preset, img_size=image_size,
        num_rounds=args.rounds, warmup_rounds=1, local_epochs=1, batch_size=args.batch_size,
        min_sites=args.sites, degradations=True, run_name="bench", run_state_dir=str(tmp / "run"),
        round_timeout_s=0, secure_aggregation=secure,
    )
    job_dir = export_job_folder(spec, tmp / "job", python=sys.executable)
    workspace = tmp / "ws"
    prepare_workspace(workspace, site_configs={
        n: {"cache": str(c), "num_workers": 0, "num_threads": max(1, args.threads_per_site),
            "privacy": {"require_secure_aggregation": secure}}
        for n, c in caches.items()
    })
    result = run_simulation(job_dir=job_dir, workspace=workspace, clients=sites, timeout_s=args.timeout)
    rows = RunState(spec.run_state_dir, "bench").read_rounds()
    if len(rows) != args.rounds or not all(r["applied"] for r in rows):
        raise SystemExit(f"{preset}: the run did not complete ({len(rows)} rounds); see {result.server_log}")
    # Each site's own training time per round, from its own disk (the server keeps aggregates only).
    seconds: dict[int, list[float]] = {}
    for cache in caches.values():
        for figures in read_site_figures(site_figures_path(cache)):
            seconds.setdefault(figures.round, []).append(figures.train_seconds)
    ends, start = round_ends(Path(spec.run_state_dir) / "bench" / "tb")
    per_round = []
    for row in rows:
        r = row["round"]
        wall = ends[r] - (ends[r - 1] if r > 0 else start)
        slowest = max(seconds[r])
        per_round.append({"wall": wall, "train": slowest, "outside": wall - slowest,
                          "overhead": (wall - slowest) / wall, "save": wall - row["duration_s"]})
    later = per_round[1:] or per_round
    median = {k: statistics.median(r[k] for r in later) for k in later[0]}
    return {"preset": preset, "img": image_size, "secure": secure, "first": per_round[0], **median,
            "rounds": len(later), "mb": rows[-1]["bytes_received"] / 1e6 / args.sites}


def round_ends(tb_dir: Path) -> tuple[dict[int, float], float]:
    """Wall time at which each round's TensorBoard scalars were written (just after its checkpoint), and
    the time the run's writer was opened (the run's start, after the initial model was built)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    ends: dict[int, float] = {}
    start = None
    for path in sorted(tb_dir.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            if event.WhichOneof("what") == "file_version":
                start = event.wall_time if start is None else min(start, event.wall_time)
            elif event.HasField("summary"):
                ends[event.step] = min(ends.get(event.step, event.wall_time), event.wall_time)
    if start is None:
        raise SystemExit(f"no TensorBoard events in {tb_dir}")
    return ends, start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small")
    parser.add_argument("--image-size", type=int, help="pixels (default: 32 for tiny, 64 for others)")
    parser.add_argument("--images-per-site", type=int, default=64)
    parser.add_argument("--sites", type=int, default=3, help="at least 3 with secure aggregation (its min_sites)")
    parser.add_argument("--secure-aggregation", choices=("both", "on", "off"), default="both")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--threads-per-site", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=3600)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    print(f"load average at the start: {os.getloadavg()[0]:.1f} ({os.cpu_count()} CPUs)", flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="bench_federation_") as tmp:
        for preset in args.presets.split(","):
            size = args.image_size or (32 if preset == "tiny" else 64)
            print(f"running {preset} at {size} px: {args.sites} sites x {args.images_per_site} images, "
                  f"{args.rounds} rounds ...", flush=True)
            for secure in {"both": (False, True), "on": (True,), "off": (False,)}[args.secure_aggregation]:
                results.append(run_preset(args, preset, size, Path(tmp), secure=secure))

    print(f"load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"\n{args.sites} sites x {args.images_per_site} images, 1 local epoch, batch {args.batch_size}; medians of "
          f"rounds 2..{args.rounds} (round 1 apart: it starts the site processes); round = end of the previous "
          "round's checkpoint to the end of this one's")
    print(f"{'preset':>7} {'px':>4} {'secagg':>6} {'round s':>8} {'slowest train s':>16} {'outside s':>10} "
          f"{'save s':>7} {'overhead':>9} {'round 1 overhead':>17} {'MB/site/round':>14} {'round / plain':>14}")
    plain = {r["preset"]: r["wall"] for r in results if not r["secure"]}
    for r in results:
        ratio = f"{r['wall'] / plain[r['preset']]:.2f}" if r["preset"] in plain else "-"
        print(f"{r['preset']:>7} {r['img']:>4} {'on' if r['secure'] else 'off':>6} {r['wall']:>8.2f} "
              f"{r['train']:>16.2f} {r['outside']:>10.2f} {r['save']:>7.2f} {r['overhead']:>8.1%} "
              f"{r['first']['overhead']:>16.1%} {r['mb']:>14.2f} {ratio:>14}")
    # Headlines, from the rows above: the overhead of the run with the most local training, and what
    # secure aggregation adds per round for each preset run both ways.
    main_row = max(results, key=lambda r: r["train"])
    print(f"\nheadline: {main_row['preset']} at {main_row['img']} px, {args.images_per_site} images/site, secure "
          f"aggregation {'on' if main_row['secure'] else 'off'}: {main_row['overhead']:.1%} of a round is outside local "
          f"training (goal < 10%); {main_row['outside']:.2f} s per round, of which "
          f"{main_row['save']:.2f} s saving the round")
    for preset, wall in plain.items():
        secure = next((r for r in results if r["preset"] == preset and r["secure"]), None)
        if secure is not None:
            print(f"headline: {preset}: secure aggregation adds {secure['wall'] - wall:.2f} s per round "
                  f"({secure['wall'] / wall:.2f}x the plain round)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
