#!/usr/bin/env python3
"""Inference benchmark: core.selftransfer.Upscale (each backend / precision) against vs-mlrt's ORT and OpenVINO
plugins on the same clip, the same bundle and the same machine, plus the raw backend without VapourSynth.

    pip install '.[bench]'           # vapoursynth-mlrt-ort, vapoursynth-mlrt-ov, openvino
    python scripts/bench_inference.py --clip ../shared/data/bigbuckbunny.mp4 --model bbb.stm

Protocol: the first --frames frames of the clip are downscaled to 640x360 (MATLAB-like bicubic, the trainer's
degradation) and held in memory as an RGBS clip, so decoding is not measured. Each variant runs in its own
process (clean memory, its own peak RSS) pushing every frame through vspipe-style parallel requests
(`clip.frames()`), after warm-up frames that build the sessions. Variants alternate A/B/C... for --rounds rounds and
the median fps is reported. Quality: every variant's outputs are compared on Y (BT.601, shaved by the scale, 8-bit)
with our fp32 ORT output and with the original 720p frames.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_VARIANTS = [
    "ours-ort:selftransfer:backend=ort",
    "ours-ov:selftransfer:backend=ov",
    "ours-ov-bf16:selftransfer:backend=ov,precision=bf16",
    "ours-ov-int8:selftransfer:backend=ov,precision=int8",
    "ours-torch:selftransfer:backend=torch",
    "mlrt-ort:ort:",
    "mlrt-ov:ov:",
    "mlrt-ov-fp16:ov:fp16=1",
    "raw-ort:raw:backend=ort",
    "raw-ov-bf16:raw:backend=ov,precision=bf16",
]


def parse_variant(spec: str) -> tuple[str, str, dict]:
    name, kind, opts = spec.split(":", 2)
    kw = {}
    for item in filter(None, opts.split(",")):
        k, v = item.split("=", 1)
        kw[k] = int(v) if v.lstrip("-").isdigit() else v
    return name, kind, kw


def load_frames(clip: str, n: int, width: int, height: int, cache: Path) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, h, w) float32 LR frames and (n, 3, H, W) uint8 HR frames, cached in an .npz between processes."""
    if cache.exists():
        d = np.load(cache)
        return d["lr"], d["hr"]
    from selftransfer_trainer.degrade import degrade
    from selftransfer_trainer.video import read_frames

    lr, hr = [], []
    for i, _, rgb in read_frames(clip, list(range(n))):
        if rgb.shape[:2] != (height * 2, width * 2):
            raise SystemExit(f"--clip must be {width * 2}x{height * 2}, not {rgb.shape[1]}x{rgb.shape[0]}")
        lr.append(degrade(rgb, 2).astype(np.float32).transpose(2, 0, 1) / 255.0)
        hr.append(rgb.transpose(2, 0, 1))
    lr_a, hr_a = np.stack(lr), np.stack(hr)
    np.savez(cache, lr=lr_a, hr=hr_a)
    return lr_a, hr_a


def child(args) -> None:
    """Run one variant in this process and print a JSON line."""
    import resource

    name, kind, kw = parse_variant(args.child)
    lr, _ = load_frames(args.clip, args.frames, 640, 360, Path(args.cache))
    n, _, h, w = lr.shape
    warm = min(args.warmup, n)
    outs = np.empty((n, 3, h * args.scale, w * args.scale), np.uint8) if args.keep else None

    if kind == "raw":  # the backend and the tiling function, no VapourSynth: what the bridge costs
        from vs_selftransfer import runtime
        up = runtime.create(args.model, width=w, height=h, **kw)
        dst = np.empty((3, h * args.scale, w * args.scale), np.float32)
        for i in range(warm):
            up.process(0, i, list(lr[i]), list(dst))
        t0 = time.perf_counter()
        for i in range(n):
            up.process(0, i, list(lr[i]), list(dst))
            if outs is not None:
                outs[i] = np.round(np.clip(dst, 0, 1) * 255)
        elapsed = time.perf_counter() - t0
    else:
        if kind == "selftransfer" and kw.get("backend") == "ov":
            # vs-mlrt's core.ov ships its own libopenvino; importing ours first keeps both loadable.
            from vs_selftransfer.backend_ov import import_openvino
            import_openvino()
        import vapoursynth as vs
        core = vs.core
        core.max_cache_size = 256
        base = core.std.BlankClip(width=w, height=h, format=vs.RGBS, length=n, fpsnum=24, fpsden=1, keep=True)

        def fill(n, f):
            fout = f.copy()
            for p in range(3):
                np.asarray(fout[p])[:] = lr[n][p]
            return fout

        src = core.std.ModifyFrame(base, base, fill)
        if kind == "selftransfer":
            out = core.selftransfer.Upscale(src, model=args.model, **kw)
        elif kind == "ort":
            out = core.ort.Model(src, network_path=args.onnx, **kw)
        elif kind == "ov":
            out = core.ov.Model(src, network_path=args.onnx, **kw)
        else:
            raise SystemExit(f"unknown variant kind {kind!r}")
        for i, f in enumerate(out.frames(close=True)):  # warm-up: sessions, engines, caches
            if i + 1 >= warm:
                break
        t0 = time.perf_counter()
        for i, f in enumerate(out.frames(close=True)):
            if outs is not None:
                outs[i] = np.round(np.clip(np.stack([np.asarray(f[p]) for p in range(3)]), 0, 1) * 255)
        elapsed = time.perf_counter() - t0
    if outs is not None:
        np.save(args.keep, outs)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"name": name, "fps": n / elapsed, "seconds": elapsed, "peak_rss_mb": rss_mb}))


def y_psnr(a: np.ndarray, b: np.ndarray, scale: int) -> float:
    from selftransfer_trainer.metrics import psnr_y
    return float(np.mean([psnr_y(x / 255.0, y / 255.0, scale) for x, y in zip(a, b)]))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default=str(ROOT.parent / "shared" / "data" / "bigbuckbunny.mp4"))
    ap.add_argument("--model", help="bundle (.stm); default: the official CARN-M x2 exported from --init")
    ap.add_argument("--init", default=str(ROOT.parent / "shared" / "data" / "carn_m_official_x234.pth"))
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                    help="NAME:KIND:k=v,... with KIND selftransfer|ort|ov|raw (default: %(default)s)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--keep", help=argparse.SUPPRESS)
    ap.add_argument("--cache", help=argparse.SUPPRESS)
    ap.add_argument("--onnx", help=argparse.SUPPRESS)
    ap.add_argument("--scale", type=int, default=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.frames < 1 or args.rounds < 1:
        ap.error("--frames and --rounds must be positive")
    if args.child:
        child(args)
        return 0

    work = Path(tempfile.mkdtemp(prefix="st-bench-"))
    if not args.model:
        from selftransfer_trainer.export import export_bundle
        from vs_selftransfer.model import ModelConfig
        from selftransfer_trainer.weights import initial_model
        args.model = str(work / "generic_x2.stm")
        export_bundle(initial_model(ModelConfig(scale=2), args.init), args.model, torchscript=True, tensorrt=False)
    from vs_selftransfer.bundle import Bundle
    bundle = Bundle.open(args.model)
    scale = bundle.scale
    onnx_path = work / "model.onnx"
    onnx_path.write_bytes(bundle.member("model.onnx"))
    cache = work / "frames.npz"
    _, hr = load_frames(args.clip, args.frames, 640, 360, cache)

    variants = [parse_variant(v) for v in args.variants]
    runs: dict[str, list[dict]] = {v[0]: [] for v in variants}
    errors: dict[str, str] = {}
    for r in range(args.rounds):
        for name, kind, kw in variants:
            if name in errors:
                continue
            spec = next(s for s in args.variants if s.startswith(name + ":"))
            cmd = [sys.executable, __file__, "--child", spec, "--clip", args.clip, "--model", args.model,
                   "--frames", str(args.frames), "--warmup", str(args.warmup), "--cache", str(cache),
                   "--onnx", str(onnx_path), "--scale", str(scale)]
            if r == 0:
                cmd += ["--keep", str(work / f"{name}.npy")]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                errors[name] = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
                print(f"  {name}: failed: {errors[name]}", file=sys.stderr)
                continue
            res = json.loads(p.stdout.strip().splitlines()[-1])
            runs[name].append(res)
            print(f"  round {r + 1} {name}: {res['fps']:.3f} fps, peak RSS {res['peak_rss_mb']:.0f} MB", file=sys.stderr)

    ref_name = next((v[0] for v in variants if v[0] == "ours-ort"), variants[0][0])
    ref = np.load(work / f"{ref_name}.npy") if (work / f"{ref_name}.npy").exists() else None
    table = []
    for name, _, _ in variants:
        if not runs[name]:
            table.append({"name": name, "error": errors.get(name, "no runs")})
            continue
        fps = statistics.median(r["fps"] for r in runs[name])
        row = {"name": name, "fps": fps, "fps_runs": [r["fps"] for r in runs[name]],
               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name])}
        out = np.load(work / f"{name}.npy") if (work / f"{name}.npy").exists() else None
        if out is not None:
            row["y_psnr_vs_hr"] = y_psnr(out, hr, scale)
            if ref is not None:
                row["y_psnr_vs_ours_fp32"] = y_psnr(out, ref, scale)
        table.append(row)
    base = {r["name"]: r for r in table if "fps" in r}
    ref_hr = base.get(ref_name, {}).get("y_psnr_vs_hr")
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
          f"{args.frames} frames 640x360 -> {640 * scale}x{360 * scale}; {args.rounds} rounds; bundle {args.model}")
    print(f"{'variant':16s} {'fps':>7s} {'x mlrt-ort':>10s} {'x mlrt-ov*':>10s} {'RSS MB':>7s} "
          f"{'Y-PSNR/HR':>9s} {'dB vs ours':>10s}")
    mlrt_ov_best = max((base[n]["fps"] for n in base if n.startswith("mlrt-ov")), default=None)
    for row in table:
        if "error" in row:
            print(f"{row['name']:16s} failed: {row['error']}")
            continue
        r_ort = row["fps"] / base["mlrt-ort"]["fps"] if "mlrt-ort" in base else float("nan")
        r_ov = row["fps"] / mlrt_ov_best if mlrt_ov_best else float("nan")
        loss = (row["y_psnr_vs_hr"] - ref_hr) if ref_hr is not None and "y_psnr_vs_hr" in row else float("nan")
        print(f"{row['name']:16s} {row['fps']:7.3f} {r_ort:10.2f} {r_ov:10.2f} {row['peak_rss_mb']:7.0f} "
              f"{row.get('y_psnr_vs_hr', float('nan')):9.3f} {loss:+10.3f}")
    if "raw-ort" in base and "ours-ort" in base:
        print(f"bridge cost (ours-ort vs raw-ort): {100 * (1 - base['ours-ort']['fps'] / base['raw-ort']['fps']):+.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "frames": args.frames, "rounds": args.rounds,
                                               "cpus": os.cpu_count(), "model": args.model}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
