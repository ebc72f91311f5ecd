"""DP-SGD cost and utility: step time and peak memory, private vs non-private; MAE loss at epsilon 1, 4, 8.

Part 1, cost. For each preset, the same MAE, AdamW groups and a fixed batch of ``batch`` images,
three ways: non-private, DP-SGD with Opacus ghost clipping, DP-SGD with Opacus hooks (per-image
gradients), both through ``ultrafedfm.privacy.dp.DPPrivatizer`` (noise 1.0, clip 1.0). A fixed
batch (the Poisson batch's expected size) keeps batch-size variance out of the timing. Modes
alternate step by step so drift on a shared machine hits all three; the table shows the median
seconds per step and its ratio to non-private (goal: at most 2x at the small preset). Peak memory
is the training's own: on CPU the peak RSS (VmHWM) of a fresh process running that mode minus its
RSS after building the model (one process per preset and mode); on a GPU ``max_memory_allocated``.
Where the time goes: forward, backward (ghost: its norm pass and its clipped pass, timed apart by
running Opacus' two passes one by one), clipping + noise (``DPOptimizer.pre_step``) and AdamW.

Part 2, utility. The small MAE (default 64 px) trained for the same number of steps on a real
image set (default ../shared/data/busi, 80 % train / 20 % held out), without DP and with DP-SGD at
target epsilon 1, 4 and 8 (delta 1/(10 N), the whole run as one job, PRV accountant, clip 1.0,
ghost clipping), through ``train_local``; the held-out MAE loss (fixed masks, no degradations)
before and after.

Default (about 25 minutes on a 2-core CPU; part 2 alone with --skip-cost):
    .venv/bin/python bench/bench_dp.py
    .venv/bin/python bench/bench_dp.py --presets tiny --skip-loss          # a minute
    .venv/bin/python bench/bench_dp.py --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ultrafedfm.models.degradations import DegradationConfig
from ultrafedfm.privacy import DPConfig, PrivacyPolicy, plan_job
from ultrafedfm.privacy.dp.plan import DPPlan
from ultrafedfm.privacy.dp.privatizer import DPPrivatizer
from ultrafedfm.train.pretrain import PretrainConfig, build_model, param_groups, train_local

_logger = logging.getLogger("bench_dp")

MODES = ("non-private", "ghost", "hooks")
DEFAULT_DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "busi"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _plan(*, num_images: int, batch: int, clipping: str) -> DPPlan:
    steps_per_epoch = math.ceil(num_images / batch)
    return DPPlan(job="bench", noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5, sample_rate=1 / steps_per_epoch,
                  steps_per_epoch=steps_per_epoch, steps_per_round=steps_per_epoch, rounds=1, num_images=num_images,
                  batch_size=batch, accountant="rdp", clipping=clipping, target_epsilon=None, planned_epsilon=0.0)


class _Stepper:
    """One mode's model, optimizer and loss on a fixed batch; ``step()`` returns seconds per phase."""

    def __init__(self, mode: str, *, preset: str, img: int, batch: int, device: torch.device):
        config = PretrainConfig(preset=preset, img_size=img, batch_size=batch, degradations=DegradationConfig(),
                                num_workers=0)
        torch.manual_seed(0)
        self.model = build_model(config).to(device).train()
        self.mode, self.device = mode, device
        optimizer = torch.optim.AdamW(param_groups(self.model, 0.05), lr=1e-4, betas=(0.9, 0.95))
        self.imgs = torch.rand(batch, 1, img, img, device=device)
        if mode == "non-private":
            self.module, self.optimizer, self.criterion = self.model, optimizer, None
        else:
            images = list(torch.rand(batch * 4, 1, img, img).unbind(0))
            loader = torch.utils.data.DataLoader(images, batch_size=batch, collate_fn=torch.stack)
            self.privatizer = DPPrivatizer(_plan(num_images=len(images), batch=batch, clipping=mode),
                                           noise_seed=0, sampling_seed=0)
            self.module, self.optimizer, self.criterion, _ = self.privatizer(self.model, optimizer, loader)
            assert self.privatizer.clipping_used == mode

    def step(self, *, split: bool = False) -> dict[str, float]:
        times = {}
        cpu = time.process_time()
        t = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        if self.criterion is None:
            loss, _, _ = self.module(self.imgs)
        else:
            per_image, _, _ = self.module(self.imgs, reduction="none")
            loss = self.criterion(per_image)
        _sync(self.device)
        times["forward"], t = time.perf_counter() - t, time.perf_counter()
        if split and self.mode == "ghost":
            # Opacus' DPTensorFastGradientClipping.backward, pass by pass, to time them apart.
            per = loss.loss_per_sample
            per.mean().backward(retain_graph=True)
            _sync(self.device)
            times["backward: norm pass"], t = time.perf_counter() - t, time.perf_counter()
            self.optimizer.zero_grad()
            coeff = self.module.get_clipping_coef()
            self.module.disable_hooks()
            (coeff.to(per.device) * per).sum().backward()
            self.module.enable_hooks()
            _sync(self.device)
            times["backward: clipped pass"], t = time.perf_counter() - t, time.perf_counter()
        else:
            loss.backward()
            _sync(self.device)
            times["backward"], t = time.perf_counter() - t, time.perf_counter()
        if self.criterion is None:
            self.optimizer.step()
            _sync(self.device)
            times["AdamW step"] = time.perf_counter() - t
        else:
            if split:
                proceed = self.optimizer.pre_step()
                _sync(self.device)
                times["clip + noise"], t = time.perf_counter() - t, time.perf_counter()
                if proceed:
                    self.optimizer.original_optimizer.step()
                _sync(self.device)
                times["AdamW step"] = time.perf_counter() - t
            else:
                self.optimizer.step()
                _sync(self.device)
                times["clip + noise + AdamW"] = time.perf_counter() - t
        times["total"] = sum(times.values())
        times["cpu"] = time.process_time() - cpu
        return times


def bench_cost(preset: str, *, img: int, batch: int, steps: int, device: torch.device) -> dict:
    steppers = {mode: _Stepper(mode, preset=preset, img=img, batch=batch, device=device) for mode in MODES}
    for stepper in steppers.values():  # warm-up (allocator, kernels, AdamW state), not timed
        stepper.step()
    totals = {mode: [] for mode in MODES}
    phases = {mode: [] for mode in MODES}
    for i in range(steps):
        order = MODES if i % 2 == 0 else MODES[::-1]
        for mode in order:
            totals[mode].append(steppers[mode].step())
        for mode in order:  # a second, phase-by-phase step per mode
            phases[mode].append(steppers[mode].step(split=True))
    row = {"preset": preset, "img": img, "batch": batch, "steps": steps}
    for mode in MODES:
        row[mode] = statistics.median(t["total"] for t in totals[mode])
        row[f"{mode} cpu"] = statistics.median(t["cpu"] for t in totals[mode])
        row[f"{mode} phases"] = {k: statistics.median(p[k] for p in phases[mode]) for k in phases[mode][0]
                                 if k != "cpu"}
    return row


def peak_memory_mb(preset: str, *, img: int, batch: int, mode: str, device: torch.device, steps: int = 3) -> float:
    """Memory the training itself takes at its peak, in MB (see the module docstring)."""
    if device.type == "cuda":
        stepper = _Stepper(mode, preset=preset, img=img, batch=batch, device=device)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(steps):
            stepper.step()
        return (torch.cuda.max_memory_allocated(device) - base) / 2**20
    out = subprocess.run([sys.executable, __file__, "--_memory", preset, str(img), str(batch), mode, str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["training_mb"]


def _memory_child(preset: str, img: int, batch: int, mode: str, steps: int) -> None:
    torch.set_num_threads(1)
    stepper = _Stepper(mode, preset=preset, img=img, batch=batch, device=torch.device("cpu"))
    base_kb = _status_kb("VmRSS")
    for _ in range(steps):
        stepper.step()
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the (large) parent across exec.
    print(json.dumps({"training_mb": (_status_kb("VmHWM") - base_kb) / 1024}))


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def load_images(folder: Path, size: int, limit: int | None) -> list[torch.Tensor]:
    """Grayscale PNGs listed in ``labels.csv`` (column ``file``), resized to ``size`` x ``size``, in [0, 1]."""
    import csv

    with open(folder / "labels.csv", newline="", encoding="utf-8") as f:
        files = sorted(row["file"] for row in csv.DictReader(f))
    if limit:
        files = files[:limit]
    images = []
    for name in files:
        with Image.open(folder / name) as im:
            array = np.asarray(im.convert("L").resize((size, size), Image.BILINEAR), dtype=np.float32) / 255.0
        images.append(torch.from_numpy(array)[None])
    return images


def bench_loss(images: list[torch.Tensor], *, preset: str, img: int, batch: int, steps: int, lr: float,
               epsilons: list[float], device: torch.device) -> list[dict]:
    split = int(0.8 * len(images))
    train, held_out = images[:split], torch.stack(images[split:]).to(device)
    config = PretrainConfig(preset=preset, img_size=img, batch_size=batch, num_workers=0,
                            degradations=DegradationConfig(), amp=False)

    def held_out_loss(model) -> float:
        model.eval()
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad():
            torch.manual_seed(1234)  # the same masks for every model
            value = model(held_out)[0].item()
        model.train()
        return value

    rows = []
    for epsilon in [None, *epsilons]:
        torch.manual_seed(0)
        model = build_model(config)
        before = held_out_loss(model.to(device))
        privatizer, noise, delta = None, None, None
        if epsilon is not None:
            plan = plan_job(DPConfig(enabled=True, target_epsilon=epsilon, max_grad_norm=1.0), PrivacyPolicy(),
                            site_name="bench", job="bench", num_images=len(train), batch_size=batch, rounds=1,
                            local_steps=steps)
            privatizer = DPPrivatizer(plan, noise_seed=0, sampling_seed=0)
            noise, delta = plan.noise_multiplier, plan.delta
        start = time.perf_counter()
        result = train_local(model=model, dataset=train, config=config, steps=steps, lr=lr, device=device,
                             privatize=privatizer, progress=False, generator_seed=0)
        seconds = time.perf_counter() - start
        if privatizer is not None:
            privatizer.close()
        rows.append({"epsilon": epsilon, "noise": noise, "delta": delta, "before": before,
                     "after": held_out_loss(model), "train_loss": result.mean_loss, "seconds": seconds})
        _logger.warning("loss run epsilon=%s done: held-out %.4f -> %.4f in %.0f s", epsilon, before,
                        rows[-1]["after"], seconds)
    return rows


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--_memory":
        preset, img, batch, mode, steps = sys.argv[2:7]
        _memory_child(preset, int(img), int(batch), mode, int(steps))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--img-tiny", type=int, default=32)
    parser.add_argument("--img-small", type=int, default=224)
    parser.add_argument("--img-base", type=int, default=224)
    parser.add_argument("--batch-tiny", type=int, default=32)
    parser.add_argument("--batch-small", type=int, default=8)
    parser.add_argument("--batch-base", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per mode (median)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (CPU)")
    parser.add_argument("--skip-cost", action="store_true")
    parser.add_argument("--skip-loss", action="store_true")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="image folder with labels.csv (BUSI format)")
    parser.add_argument("--limit", type=int, default=None, help="use at most this many images")
    parser.add_argument("--loss-preset", default="small", choices=["tiny", "small", "base"])
    parser.add_argument("--loss-img", type=int, default=64)
    parser.add_argument("--loss-batch", type=int, default=32)
    parser.add_argument("--loss-steps", type=int, default=120)
    parser.add_argument("--loss-lr", type=float, default=1e-3)
    parser.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 4.0, 8.0])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {args.threads} threads"
    print(f"device: {name}; torch {torch.__version__}")

    if not args.skip_cost:
        rows = []
        for preset in args.presets:
            img, batch = getattr(args, f"img_{preset}"), getattr(args, f"batch_{preset}")
            row = bench_cost(preset, img=img, batch=batch, steps=args.steps, device=device)
            for mode in MODES:
                row[f"{mode} MB"] = peak_memory_mb(preset, img=img, batch=batch, mode=mode, device=device)
            rows.append(row)
        print(f"\nStep time and peak training memory ({args.steps} steps per mode, alternating; median; noise 1.0, "
              "clip 1.0):")
        print("| preset | image | batch | mode | s/step | x non-private | CPU s/step | x non-private (CPU) "
              "| peak MB | x non-private |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            for mode in MODES:
                print(f"| {r['preset']} | {r['img']} | {r['batch']} | {mode} | {r[mode]:.4f} "
                      f"| **{r[mode] / r['non-private']:.2f}** | {r[f'{mode} cpu']:.4f} "
                      f"| {r[f'{mode} cpu'] / r['non-private cpu']:.2f} | {r[f'{mode} MB']:.0f} "
                      f"| {r[f'{mode} MB'] / r['non-private MB']:.2f} |")
        print("\nWhere a step's time goes (s, median of the phase-by-phase steps):")
        print("| preset | mode | phase | s | share of step |")
        print("|---|---|---|---|---|")
        for r in rows:
            for mode in MODES:
                phases = r[f"{mode} phases"]
                for phase, seconds in phases.items():
                    if phase != "total":
                        print(f"| {r['preset']} | {mode} | {phase} | {seconds:.4f} "
                              f"| {seconds / phases['total']:.0%} |")
        goal = [r for r in rows if r["preset"] == "small"]
        for r in goal:
            best = min(("ghost", "hooks"), key=lambda m: r[m])
            ratio = r[best] / r["non-private"]
            print(f"\nHeadline (small preset, from the table): DP-SGD ({best}) {ratio:.2f}x non-private step time "
                  f"(ghost {r['ghost'] / r['non-private']:.2f}x, hooks {r['hooks'] / r['non-private']:.2f}x; CPU time "
                  f"ghost {r['ghost cpu'] / r['non-private cpu']:.2f}x, hooks {r['hooks cpu'] / r['non-private cpu']:.2f}x)"
                  f"; goal <= 2x {'met' if ratio <= 2 else 'missed'}")

    if not args.skip_loss:
        if not (args.data / "labels.csv").is_file():
            print(f"\nloss comparison skipped: no image set at {args.data}")
            return 0
        images = load_images(args.data, args.loss_img, args.limit)
        rows = bench_loss(images, preset=args.loss_preset, img=args.loss_img, batch=args.loss_batch,
                          steps=args.loss_steps, lr=args.loss_lr, epsilons=args.epsilons, device=device)
        n_train = int(0.8 * len(images))
        print(f"\nMAE loss, {args.loss_preset} preset at {args.loss_img} px, {args.data.name}: {n_train} training "
              f"images, {len(images) - n_train} held out; {args.loss_steps} steps, batch {args.loss_batch} "
              f"(Poisson with DP), lr {args.loss_lr:g} constant, clip 1.0, PRV accountant:")
        print("| DP | target epsilon | delta | noise multiplier | held-out loss before | held-out loss after "
              "| mean training loss | s |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            if r["epsilon"] is None:
                print(f"| off | - | - | - | {r['before']:.4f} | {r['after']:.4f} | {r['train_loss']:.4f} "
                      f"| {r['seconds']:.0f} |")
            else:
                print(f"| on | {r['epsilon']:g} | {r['delta']:.2g} | {r['noise']:.3f} | {r['before']:.4f} "
                      f"| {r['after']:.4f} | {r['train_loss']:.4f} | {r['seconds']:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
