#!/usr/bin/env python3
"""Fine-tuning benchmark: seconds per step and patches per second of the training step, and the time a fit-like
run needs to reach +0.5 / +1.0 dB over the generic model on held-out frames.

    python scripts/bench_train.py                               # throughput, synthetic patches, CPU (+ GPU if any)
    python scripts/bench_train.py --video ../shared/data/bigbuckbunny.mp4      # throughput on the clip's patches
    python scripts/bench_train.py --to-gain ../shared/data/bigbuckbunny.mp4 \\
        --init ../shared/data/carn_m_official_x234.pth --minutes 5              # time to +0.5 / +1.0 dB

Throughput protocol: every variant trains the same CARN-M (official weights when --init is given, else a seeded
random init; the speed is the same) on batches of --batch LR patches of --patch px with L1 + Adam (+ gradient
clipping, as the trainer does). Variants run in one process, alternating A/B/C... for --rounds rounds; each round
times --steps steps after --warmup untimed ones, and the median over rounds is reported. Variants:

  baseline       the plain loop: fp32, eager, channels-first (NCHW), PyTorch's default thread count
  default        what `selftransfer train` does on this device: channels-last, every core, precision "auto"
                 (fp32 on CPUs, fp16 AMP on CUDA)
  bf16           default + bf16 autocast (CPU); emulated, so slow, when the CPU lacks native bf16 (AVX512-BF16/AMX)
  compile        default + torch.compile (inductor; the compile time is reported separately, and must be paid
                 back within a fit's budget to be worth it)
  fused_adam     default + Adam(fused=True)
  nchw_all       fp32 NCHW with every core (isolates the channels-last effect)

The data pipeline is timed on its own (PatchSampler, one batch) so you can see it never starves the step.

--to-gain: picks frames and makes pairs like `selftransfer fit` (24 training and 4 held-out frames, bicubic), then
runs trainer.train.train with --minutes (or --steps) and a validation every --val-every steps, and prints when the
held-out Y-PSNR first reached generic + 0.5 dB and + 1.0 dB, both in pure training-step seconds and in wall seconds
(validations included), with the final and best PSNR. --variant baseline runs the same with the plain loop's
settings (channels-first, default threads, fp32) for the "no loss in final PSNR" comparison.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

THROUGHPUT_VARIANTS = ("baseline", "default", "bf16", "compile", "fused_adam", "nchw_all")
DEFAULT_THREADS = torch.get_num_threads()  # PyTorch's own default, read before anything changes it


def machine() -> dict:
    from selftransfer_trainer.train import cpu_has_native_bf16, resolve_threads

    info = {"cpu": platform.processor() or platform.machine(), "cores_usable": resolve_threads(0),
            "torch_default_threads": DEFAULT_THREADS, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "torch": torch.__version__, "python": platform.python_version()}
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                               info["cpu"])
    except OSError:
        pass
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# -- throughput -----------------------------------------------------------------------------------------------------

def make_batches(args, device):
    """A fixed list of batches (real patches when a video or pairs file is given), so every variant sees the same."""
    g = torch.Generator().manual_seed(0)
    if args.pairs:
        from selftransfer_trainer.pairs import Pairs, PatchSampler

        with Pairs(args.pairs) as pairs:
            sampler = PatchSampler(pairs, patch=args.patch, batch=args.batch, seed=0)
        t = time.perf_counter()
        batches = [sampler.sample() for _ in range(8)]
        sampler_s = (time.perf_counter() - t) / 8
        scale = sampler.scale
    else:
        scale = args.scale
        batches = []
        for _ in range(8):
            hr = torch.rand(args.batch, 3, args.patch * scale, args.patch * scale, generator=g)
            lr = F.avg_pool2d(hr, scale)
            batches.append((lr, hr))
        sampler_s = None
    return [(lr.to(device), hr.to(device)) for lr, hr in batches], sampler_s, scale


class Variant:
    def __init__(self, name: str, args, device, scale: int):
        from vs_selftransfer.model import ModelConfig, build_model
        from selftransfer_trainer.train import resolve_precision, resolve_threads

        self.name = name
        self.device = device
        torch.manual_seed(0)
        model = build_model(ModelConfig(scale=scale))
        if args.init:
            from selftransfer_trainer.weights import initial_model

            model = initial_model(ModelConfig(scale=scale), args.init)
        channels_last = name not in ("baseline", "nchw_all")
        self.threads = DEFAULT_THREADS if name == "baseline" else (args.threads or resolve_threads(0))
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.to(device=device, memory_format=self.memory_format).train()
        precision = "fp32" if name in ("baseline", "nchw_all") else resolve_precision("auto", device)
        if name == "bf16":
            precision = "bf16"
        self.precision = precision
        self.autocast = (torch.autocast("cuda", dtype=torch.float16) if precision == "amp" else
                         torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else None)
        self.scaler = torch.amp.GradScaler("cuda", enabled=precision == "amp")
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-5, fused=True if name == "fused_adam" else None)
        self.forward = self.model
        self.compile_s = None
        if name == "compile":
            self.forward = torch.compile(self.model)

    def step(self, lr, hr) -> float:
        lr = lr.contiguous(memory_format=self.memory_format)
        hr = hr.contiguous(memory_format=self.memory_format)
        if self.autocast is not None:
            with self.autocast:
                sr = self.forward(lr)
        else:
            sr = self.forward(lr)
        loss = F.l1_loss(sr.float(), hr)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return float(loss.detach())

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()


def throughput(args) -> dict:
    device = torch.device(args.device)
    batches, sampler_s, scale = make_batches(args, device)
    variants = []
    for name in args.variants:
        if name == "fused_adam" and device.type == "cpu":
            try:
                torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True)
            except (RuntimeError, ValueError) as e:
                print(f"skip fused_adam: {e}", file=sys.stderr)
                continue
        try:
            v = Variant(name, args, device, scale)
            torch.set_num_threads(v.threads)
            if name == "compile":  # compile on first call: time it apart from the steps
                t = time.perf_counter()
                v.step(*batches[0])
                v.sync()
                v.compile_s = time.perf_counter() - t
            variants.append(v)
        except Exception as e:  # noqa: BLE001 - a variant this machine cannot run is reported and skipped
            print(f"skip {name}: {type(e).__name__}: {e}", file=sys.stderr)
    times: dict[str, list[float]] = {v.name: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:
            torch.set_num_threads(v.threads)
            for i in range(args.warmup):
                v.step(*batches[i % len(batches)])
            v.sync()
            t = time.perf_counter()
            for i in range(args.steps):
                v.step(*batches[i % len(batches)])
            v.sync()
            times[v.name].append((time.perf_counter() - t) / args.steps)
            print(f"round {r + 1}/{args.rounds} {v.name:11s} {times[v.name][-1]:.3f} s/step", file=sys.stderr)
    base = statistics.median(times["baseline"]) if times.get("baseline") else None
    rows = []
    for v in variants:
        s = statistics.median(times[v.name])
        rows.append({"variant": v.name, "threads": v.threads, "precision": v.precision,
                     "channels_last": v.memory_format == torch.channels_last, "s_per_step": s,
                     "patches_per_s": args.batch / s, "lr_megapixels_per_s": args.batch * args.patch ** 2 / s / 1e6,
                     "speedup_vs_baseline": base / s if base else None, "compile_s": v.compile_s,
                     "rounds": times[v.name]})
    return {"device": str(device), "batch": args.batch, "patch": args.patch, "scale": scale,
            "data": "pairs " + str(args.pairs) if args.pairs else "synthetic", "sampler_s_per_batch": sampler_s,
            "results": rows}


def print_throughput(res: dict) -> None:
    print(f"\ntraining step on {res['device']}: batch {res['batch']} x {res['patch']} px LR patches, "
          f"x{res['scale']}, data: {res['data']}")
    if res["sampler_s_per_batch"] is not None:
        print(f"data pipeline: {res['sampler_s_per_batch'] * 1e3:.2f} ms per batch (PatchSampler, in memory)")
    print(f"{'variant':12s} {'threads':>7s} {'precision':>9s} {'NHWC':>5s} {'s/step':>8s} {'patches/s':>10s} "
          f"{'vs base':>8s} {'compile s':>9s}")
    for r in res["results"]:
        speed = f"{r['speedup_vs_baseline']:.2f}x" if r["speedup_vs_baseline"] else "-"
        comp = f"{r['compile_s']:.1f}" if r["compile_s"] is not None else "-"
        print(f"{r['variant']:12s} {r['threads']:7d} {r['precision']:>9s} {str(r['channels_last']):>5s} "
              f"{r['s_per_step']:8.3f} {r['patches_per_s']:10.1f} {speed:>8s} {comp:>9s}")


# -- time to gain ---------------------------------------------------------------------------------------------------

def make_pairs(video: str, folder: Path, scale: int) -> Path:
    from selftransfer_trainer.keyframes import select_frames, summary
    from selftransfer_trainer.pairs import write_pairs

    selection = select_frames(video, target=24, val=4, seed=0)
    print(summary(selection), file=sys.stderr)
    path = folder / "pairs.h5"
    write_pairs(path, selection, scale)
    return path


def to_gain(args) -> dict:
    from selftransfer_trainer.train import TrainConfig, train

    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        pairs = Path(args.pairs) if args.pairs else make_pairs(args.to_gain, Path(tmp), args.scale)
        common = dict(batch=args.batch, patch=args.patch, val_every=args.val_every, device=args.device,
                      checkpoint_seconds=1e9)
        if args.steps_budget:
            common["steps"] = args.steps_budget
        else:
            common["minutes"] = args.minutes
        if args.variant == "baseline":
            cfg = TrainConfig(channels_last=False, threads=DEFAULT_THREADS, precision="fp32", **common)
        else:
            cfg = TrainConfig(threads=args.threads, precision=args.precision, **common)
        t = time.perf_counter()
        r = train(pairs, Path(tmp) / "run", cfg, init=args.init or "official", progress=False)
        wall = time.perf_counter() - t
    reached = {}
    for gain in (0.5, 1.0):
        hit = next((h for h in r.history if h["psnr_y"] >= r.generic_psnr_y + gain), None)
        reached[f"+{gain} dB"] = None if hit is None else {"step": hit["step"], "train_s": hit["train_s"],
                                                           "wall_s": hit["elapsed_s"]}
    return {"variant": args.variant, "clip": str(args.to_gain or args.pairs), "train_config": cfg.to_dict(),
            "s_per_step": r.s_per_step, "patches_per_s": r.images_per_s, "steps": r.steps, "wall_s": wall,
            "bicubic_psnr_y": r.bicubic_psnr_y, "generic_psnr_y": r.generic_psnr_y,
            "final_psnr_y": r.history[-1]["psnr_y"] if r.history else None,
            "best_psnr_y": r.selftransfer_psnr_y, "shipped": r.shipped, "reached": reached,
            "history": [{k: h[k] for k in ("step", "psnr_y", "train_s", "elapsed_s")} for h in r.history]}


def print_gain(res: dict) -> None:
    print(f"\ntime to gain ({res['variant']} settings) on {res['clip']}: {res['steps']} steps, "
          f"{res['s_per_step']:.3f} s/step, {res['patches_per_s']:.1f} patches/s, wall {res['wall_s']:.0f} s")
    print(f"held-out Y-PSNR: bicubic {res['bicubic_psnr_y']:.3f} dB, generic {res['generic_psnr_y']:.3f} dB, "
          f"final {res['final_psnr_y']:.3f} dB, best {res['best_psnr_y']:.3f} dB -> ships {res['shipped']}")
    for name, hit in res["reached"].items():
        if hit is None:
            print(f"  {name}: not reached")
        else:
            print(f"  {name}: step {hit['step']}, {hit['train_s']:.0f} s of training steps, "
                  f"{hit['wall_s']:.0f} s wall (validations included)")
    print("  curve: " + ", ".join(f"{h['step']}:{h['psnr_y'] - res['generic_psnr_y']:+.2f}" for h in res["history"]))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--video", help="throughput on real patches: make pairs from this video first")
    p.add_argument("--pairs", help="an existing pairs file (instead of --video / synthetic patches)")
    p.add_argument("--init", help="initial weights (throughput: optional; --to-gain: default official)")
    p.add_argument("--scale", type=int, default=2, choices=(2, 3, 4))
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, default=48)
    p.add_argument("--threads", type=int, default=0, help="threads of the non-baseline variants (0: all cores)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    p.add_argument("--variants", default="baseline,default,nchw_all,bf16,fused_adam",
                   help=f"comma-separated, from {', '.join(THROUGHPUT_VARIANTS)} (compile: minutes to compile)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per variant and round")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--to-gain", metavar="VIDEO", help="run a fit-like training on VIDEO; time to +0.5/+1.0 dB")
    p.add_argument("--minutes", type=float, default=5.0, help="--to-gain budget (default 5)")
    p.add_argument("--steps-budget", type=int, default=0, help="--to-gain budget in steps instead of minutes")
    p.add_argument("--val-every", type=int, default=20, help="--to-gain validation interval in steps")
    p.add_argument("--variant", default="default", choices=("default", "baseline"), help="--to-gain settings")
    p.add_argument("--precision", default="auto", help="--to-gain precision of the default variant")
    p.add_argument("--json", help="also write the results here")
    args = p.parse_args()
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(args.variants) - set(THROUGHPUT_VARIANTS)
    if unknown:
        p.error(f"unknown variants {sorted(unknown)}; choose from {', '.join(THROUGHPUT_VARIANTS)}")
    out = {"machine": machine()}
    print(json.dumps(out["machine"]))
    if args.to_gain:
        res = to_gain(args)
        print_gain(res)
        out["to_gain"] = res
    else:
        with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
            if args.video and not args.pairs:
                args.pairs = str(make_pairs(args.video, Path(tmp), args.scale))
            res = throughput(args)
        print_throughput(res)
        out["throughput"] = res
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
