"""Trainer overhead: ``train_local`` step time against a bare PyTorch loop over the same model and batch.

Both sides build the same MAE (same preset, degradations on, as in the default config), AdamW
with the same parameter groups, a DataLoader over the same in-memory images at the same batch
size, and run the same forward (loss on masked patches) + backward + step. The trainer adds
what it exists for: the lr schedule, the non-finite loss check, the progress bar, RNG forking,
shape checks. Runs alternate (bare, trainer, bare, ...) so drift on a shared machine hits both;
the table reports median seconds per step and bare / trainer (goal >= 0.95) as the median
over pairs of wall time and of process CPU time (less sensitive to neighbours on a shared
machine), and the wall ratio of the fastest runs. One intra-op thread by default: on a shared
2-core machine, two threads stall whenever a neighbour takes a core, which swamps the signal.

Default (about 2-3 minutes on a 2-core CPU):
    .venv/bin/python bench/bench_trainer.py
    .venv/bin/python bench/bench_trainer.py --presets tiny small --repeats 9 --device cuda
"""
from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

import torch
from torch.utils.data import DataLoader

from ultrafedfm.train.pretrain import PretrainConfig, build_model, param_groups, train_local

_logger = logging.getLogger("bench_trainer")


def bare_loop(model, images, config: PretrainConfig, steps: int, device: torch.device) -> tuple[float, float]:
    """The loop a researcher would write by hand; (wall, CPU) seconds for ``steps`` steps, set-up included."""
    start, cpu = time.perf_counter(), time.process_time()
    model.to(device).train()
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=config.lr, betas=config.betas)
    loader = DataLoader(images, batch_size=config.batch_size, shuffle=True, num_workers=config.num_workers)
    done = 0
    while done < steps:
        for imgs in loader:
            imgs = imgs.to(device, non_blocking=True)
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


def bench_preset(preset: str, *, batch: int, steps: int, repeats: int, device: torch.device,
                 progress: bool) -> dict:
    config = PretrainConfig(preset=preset, batch_size=batch, num_workers=0, warmup_epochs=1)
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
        pair = {}
        for side in (("bare", "trainer") if i % 2 == 0 else ("trainer", "bare")):
            if side == "bare":
                pair[side] = bare_loop(model, images, config, steps, device)
            else:
                pair[side] = trainer_loop(model, images, config, steps, device, progress)
        bare.append(pair["bare"])
        trainer.append(pair["trainer"])
    wall = [b[0] / t[0] for b, t in zip(bare, trainer)]
    cpu = [b[1] / t[1] for b, t in zip(bare, trainer)]
    return {"preset": preset, "img": size, "batch": batch, "steps": steps,
            "bare": statistics.median(b[0] for b in bare) / steps,
            "trainer": statistics.median(t[0] for t in trainer) / steps,
            "ratio": statistics.median(wall), "cpu_ratio": statistics.median(cpu),
            "best_ratio": min(b[0] for b in bare) / min(t[0] for t in trainer)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--batch-tiny", type=int, default=32)
    parser.add_argument("--batch-small", type=int, default=8)
    parser.add_argument("--batch-base", type=int, default=8)
    parser.add_argument("--steps-tiny", type=int, default=10)
    parser.add_argument("--steps-small", type=int, default=3)
    parser.add_argument("--steps-base", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=9, help="alternating pairs of runs (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--no-progress", action="store_true", help="trainer without its progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for preset in args.presets:
        rows.append(bench_preset(preset, batch=getattr(args, f"batch_{preset}"),
                                 steps=getattr(args, f"steps_{preset}"), repeats=args.repeats, device=device,
                                 progress=not args.no_progress))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"\ndevice: {name}; {args.repeats} alternating repeats; progress bar "
          f"{'off' if args.no_progress else 'on'}", file=sys.stdout)
    print("| preset | image | batch | steps/run | bare s/step | trainer s/step | ratio wall (median of pairs) "
          "| ratio CPU time (median of pairs) | ratio wall (fastest runs) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['img']} | {r['batch']} | {r['steps']} | {r['bare']:.4f} | {r['trainer']:.4f} "
              f"| {r['ratio']:.3f} | {r['cpu_ratio']:.3f} | {r['best_ratio']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
