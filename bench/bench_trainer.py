"""Trainer overhead: ``train_local`` step time against a bare PyTorch loop over the same model and batch.

Both sides build the same MAE (same preset, degradations on, as in the default config), AdamW
with the same parameter groups, a DataLoader over the same in-memory images at the same batch
size, the same precision (``--precision``: fp32 on CPU; bf16 autocast on both sides, or fp32 on
both, on a GPU), and run the same forward (loss on masked patches) + backward + step. The trainer
adds what it exists for: the lr schedule, the non-finite loss check (``loss.item()`` every step),
the progress bar, RNG forking, shape checks. Runs alternate in adjacent pairs (order flipped every
pair) so drift on a shared machine hits both sides.

The table shows, per side, the median over runs of seconds per step (wall and process CPU);
the ratio columns and the headline are bare / trainer of exactly those medians (goal >= 0.95).
``--profile`` adds where each loop's time goes: cProfile of both loops (alternating runs), every
call the loop makes (forward, backward, optimizer, DataLoader, tqdm, ...) in milliseconds per
step, side by side. One intra-op thread by default: on a shared 2-core machine two threads
stall whenever a neighbour takes a core.

Default (about 3 minutes on a 2-core CPU):
    .venv/bin/python bench/bench_trainer.py
    .venv/bin/python bench/bench_trainer.py --presets tiny --repeats 5 --profile
    .venv/bin/python bench/bench_trainer.py --presets tiny small --repeats 9 --device cuda --precision bf16
"""
from __future__ import annotations

import argparse
import contextlib
import cProfile
import logging
import pstats
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

from ultrafedfm.train.pretrain import PretrainConfig, build_model, param_groups, train_local

_logger = logging.getLogger("bench_trainer")


def bare_loop(model, images, config: PretrainConfig, steps: int, device: torch.device) -> tuple[float, float]:
    """The loop a researcher would write by hand; (wall, CPU) seconds for ``steps`` steps, set-up included.

    Autocast bf16 exactly when the trainer would use it (``config.amp`` on a GPU): like for like.
    """
    start, cpu = time.perf_counter(), time.process_time()
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    loader = DataLoader(images, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers)
    use_amp = config.amp and device.type == "cuda"
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if use_amp else contextlib.nullcontext
    done = 0
    while done < steps:
        for imgs in loader:
            imgs = imgs.to(device, non_blocking=True)
            with autocast():
                loss, _, _ = model(imgs, mask_ratio=config.mask_ratio)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            done += 1
            if done == steps:
                break
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def trainer_loop(model, images, config: PretrainConfig, steps: int, device: torch.device,
                 progress: bool) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    train_local(model=model, dataset=images, config=config, steps=steps, device=device, progress=progress)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start, time.process_time() - cpu


def bench_preset(preset: str, *, batch: int, steps: int, repeats: int, device: torch.device, amp: bool,
                 progress: bool, profile: bool) -> dict:
    config = PretrainConfig(preset=preset, batch_size=batch, num_workers=0, warmup_epochs=1, amp=amp)
    size = build_model(config).preset.img_size
    images = list(torch.rand(batch * steps, 1, size, size).unbind(0))  # one epoch = ``steps`` full batches
    torch.manual_seed(0)
    model = build_model(config)
    # Warm-up of both paths (allocator, kernels), not timed.
    bare_loop(model, images, config, 1, device)
    trainer_loop(model, images, config, 1, device, progress=False)
    bare, trainer = [], []
    for i in range(repeats):
        # Adjacent pairs, order flipped every pair, so drift and neighbours' load hit both sides.
        for side in (("bare", "trainer") if i % 2 == 0 else ("trainer", "bare")):
            if side == "bare":
                bare.append(bare_loop(model, images, config, steps, device))
            else:
                trainer.append(trainer_loop(model, images, config, steps, device, progress))
    row = {"preset": preset, "img": size, "batch": batch, "steps": steps,
           "bare": statistics.median(b[0] for b in bare) / steps,
           "trainer": statistics.median(t[0] for t in trainer) / steps,
           "bare_cpu": statistics.median(b[1] for b in bare) / steps,
           "trainer_cpu": statistics.median(t[1] for t in trainer) / steps}
    row["ratio"] = row["bare"] / row["trainer"]
    row["cpu_ratio"] = row["bare_cpu"] / row["trainer_cpu"]
    if profile:
        row["profile"] = profile_both(model, images, config, steps, device, progress, runs=max(3, repeats // 2))
    return row


# The functions that make up each loop: the time of every call they make is attributed to the callee.
_LOOP_FUNCTIONS = {
    "bare": {("bench_trainer.py", "bare_loop")},
    "trainer": {("pretrain.py", name) for name in ("train_local", "_run", "_loop", "_build_loader", "_restore",
                                                     "_privatize", "_plan", "_checked_batch", "checkpoint")},
}


def profile_both(model, images, config, steps, device, progress, *, runs: int) -> dict:
    """ms per step of each call the loop makes (callee ``file:function``), bare and trainer (cProfile)."""
    profilers = {"bare": cProfile.Profile(), "trainer": cProfile.Profile()}
    for i in range(runs):  # alternating, like the timed runs
        for side in (("bare", "trainer") if i % 2 == 0 else ("trainer", "bare")):
            profilers[side].enable()
            if side == "bare":
                bare_loop(model, images, config, steps, device)
            else:
                trainer_loop(model, images, config, steps, device, progress)
            profilers[side].disable()
    out = {}
    for side, profiler in profilers.items():
        stats = pstats.Stats(profiler).stats  # {(file, line, func): (cc, nc, tt, ct, {caller: (nc, cc, tt, ct)})}
        mine = {key for key in stats if (key[0].rsplit("/", 1)[-1], key[2]) in _LOOP_FUNCTIONS[side]}
        parts: dict[str, float] = {}
        for callee, (_, _, _, _, callers) in stats.items():
            if callee in mine:
                continue
            seconds = sum(edge[3] for caller, edge in callers.items() if caller in mine)
            if seconds:
                label = f"{callee[0].rsplit('/', 1)[-1]}:{callee[2]}"
                parts[label] = parts.get(label, 0.0) + 1000 * seconds / (runs * steps)
        parts["(the loop's own Python lines)"] = 1000 * sum(stats[k][2] for k in mine) / (runs * steps)
        out[side] = parts
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--batch-tiny", type=int, default=32)
    parser.add_argument("--batch-small", type=int, default=8)
    parser.add_argument("--batch-base", type=int, default=8)
    parser.add_argument("--steps-tiny", type=int, default=10)
    parser.add_argument("--steps-small", type=int, default=3)
    parser.add_argument("--steps-base", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9, help="runs per side, alternating in pairs (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", choices=["bf16", "fp32"], default=None,
                        help="both loops alike: bf16 autocast (GPU only; the default there) or fp32 (CPU default)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-progress", action="store_true", help="trainer without its progress bar")
    parser.add_argument("--profile", action="store_true", help="also show where each loop's time goes (cProfile)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    precision = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if precision == "bf16" and device.type != "cuda":
        parser.error("--precision bf16 needs --device cuda (the trainer trains in fp32 on CPU)")
    rows = []
    for preset in args.presets:
        rows.append(bench_preset(preset, batch=getattr(args, f"batch_{preset}"),
                                 steps=getattr(args, f"steps_{preset}"), repeats=args.repeats, device=device,
                                 amp=precision == "bf16", progress=not args.no_progress, profile=args.profile))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\ndevice: {name}; precision {precision} on both sides; {args.repeats} runs per side, alternating; "
          f"progress bar {'off' if args.no_progress else 'on'}")
    print("| preset | image | batch | steps/run | bare s/step | trainer s/step | **bare / trainer** "
          "| bare CPU s/step | trainer CPU s/step | CPU bare / trainer |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['img']} | {r['batch']} | {r['steps']} | {r['bare']:.4f} | {r['trainer']:.4f} "
              f"| **{r['ratio']:.3f}** | {r['bare_cpu']:.4f} | {r['trainer_cpu']:.4f} | {r['cpu_ratio']:.3f} |")
    print("\nHeadline (bare / trainer of the medians above; goal >= 0.95): "
          + "; ".join(f"{r['preset']} {r['ratio']:.3f} ({'met' if r['ratio'] >= 0.95 else 'missed'})"
                      for r in rows))
    for r in rows:
        if "profile" not in r:
            continue
        prof = r["profile"]
        print(f"\nWhere the time goes, {r['preset']}: each call the loop makes, cProfile ms per step (profiling "
              "inflates Python-heavy parts; rows under 0.01 ms omitted):")
        print("| call | bare ms/step | trainer ms/step | trainer - bare |")
        print("|---|---|---|---|")
        labels = sorted(set(prof["bare"]) | set(prof["trainer"]),
                        key=lambda k: -max(prof["bare"].get(k, 0.0), prof["trainer"].get(k, 0.0)))
        for label in labels:
            b, t = prof["bare"].get(label, 0.0), prof["trainer"].get(label, 0.0)
            if max(b, t) >= 0.01:
                print(f"| {label} | {b:.2f} | {t:.2f} | {t - b:+.2f} |")
        b, t = sum(prof["bare"].values()), sum(prof["trainer"].values())
        print(f"| **total** | {b:.2f} | {t:.2f} | {t - b:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
