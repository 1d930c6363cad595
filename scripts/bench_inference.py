#!/usr/bin/env python3
"""Inference benchmark: core.selftransfer.Upscale (auto and each backend / precision) against vs-mlrt's ORT and
OpenVINO plugins in the same VapourSynth, on the same clip, bundle and machine, plus the raw backends without
VapourSynth.

    pip install '.[bench]'           # vapoursynth-mlrt-ort, vapoursynth-mlrt-ov
    python scripts/bench_inference.py --frames 6 --rounds 2

Protocol: the first --frames frames of the clip are downscaled to 640x360 (the trainer's antialiased bicubic) and
held in memory as an RGBS clip, so decoding is not measured. Each variant runs in its own process (its own peak
RSS, worker processes included), pushing every frame through parallel requests (`clip.frames()`) after warm-up
frames that build the sessions. In those processes VapourSynth's core is created first, so vs-mlrt's libopenvino
is loaded before ours, as in vspipe (variants with `inproc=1` import our OpenVINO first instead: what the worker
process costs). Variants alternate for --rounds rounds; the median fps is reported.

The default bundle is the official CARN-M x2 exported the way `fit` exports it: bf16 measured on held-out frames
of the clip (frames after the benchmarked ones), so `auto` can pick it. Quality: Y (BT.601, shaved by the scale,
8-bit) PSNR against the original frames, and its difference to our fp32 output (ours-ort).
Speed: fps, ratios to each vs-mlrt variant, and GFLOP/s (CARN-M x2: about 182 GFLOP per 640x360 frame) next to
the CPU's nominal peak for the precision computed (2 full-width FMA pipes per core at /proc/cpuinfo's clock).
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

GFLOP_PER_FRAME = 182.0  # CARN-M x2, 640x360 in -> 1280x720 out (91 G multiply-adds)
DEFAULT_VARIANTS = [
    "ours-auto:selftransfer:",
    "ours-auto-2s:selftransfer:num_streams=2",
    "ours-ov-int8:selftransfer:backend=ov,precision=int8",
    "ours-ov-bf16:selftransfer:backend=ov,precision=bf16",
    "ours-ov-bf16-inproc:selftransfer:backend=ov,precision=bf16,inproc=1",
    "ours-ov-fp32:selftransfer:backend=ov,precision=fp32",
    "ours-ort:selftransfer:backend=ort",
    "mlrt-ort:ort:",
    "mlrt-ov:ov:",
    "mlrt-ov-fp16:ov:fp16=1",
    "raw-ort:raw:backend=ort",
    "raw-ov-fp32:raw:backend=ov,precision=fp32",
    "raw-ov-bf16:raw:backend=ov,precision=bf16",
    "raw-ov-int8:raw:backend=ov,precision=int8",
]


def parse_variant(spec: str) -> tuple[str, str, dict]:
    name, kind, opts = spec.split(":", 2)
    kw = {}
    for item in filter(None, opts.split(",")):
        k, v = item.split("=", 1)
        kw[k] = int(v) if v.lstrip("-").isdigit() else v
    return name, kind, kw


def load_frames(clip: str, indices: list[int], width: int, height: int, cache: Path | None):
    """(n, 3, h, w) float32 LR frames and (n, 3, H, W) uint8 HR frames, cached in an .npz between processes."""
    if cache is not None and cache.exists():
        d = np.load(cache)
        return d["lr"], d["hr"]
    from selftransfer_trainer.degrade import degrade
    from selftransfer_trainer.video import read_frames

    lr, hr = [], []
    for _, _, rgb in read_frames(clip, indices):
        if rgb.shape[:2] != (height * 2, width * 2):
            raise SystemExit(f"--clip must be {width * 2}x{height * 2}, not {rgb.shape[1]}x{rgb.shape[0]}")
        lr.append(degrade(rgb, 2).astype(np.float32).transpose(2, 0, 1) / 255.0)
        hr.append(rgb.transpose(2, 0, 1))
    lr_a, hr_a = np.stack(lr), np.stack(hr)
    if cache is not None:
        np.savez(cache, lr=lr_a, hr=hr_a)
    return lr_a, hr_a


def cpu_info() -> dict:
    from vs_selftransfer.backend_base import NATIVE_FLAGS, cpu_flags, native_support

    flags = cpu_flags()
    model, mhz = platform.processor() or platform.machine(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model in ("", platform.machine()):
                model = line.split(":", 1)[1].strip()
            if line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0))
    width = 512 if "avx512f" in flags else 256 if "avx2" in flags else 128
    fp32 = 2 * 2 * width // 32  # FLOP per cycle per core: 2 FMA pipes x lanes x (multiply + add)
    peak = {"fp32": fp32 * cores * (mhz or 0) / 1000}
    if native_support("bf16", flags):
        peak["bf16"] = 2 * peak["fp32"]  # a bf16 dot product does 2 multiply-adds per fp32 lane
    if native_support("int8", flags):
        peak["int8"] = 4 * peak["fp32"]  # a VNNI dot product does 4 u8 x s8 multiply-adds per 32-bit lane
    shown = sorted(f for f in flags if f.startswith(("avx512", "amx", "avx_vnni", "avx2", "fma")))
    return {"model": model, "mhz": mhz, "cores": cores, "flags": shown, "vector_bits": width,
            "native": {p: native_support(p, flags) for p in NATIVE_FLAGS}, "peak_gflops": peak}


def tree_peak_rss_mb() -> tuple[float, float]:
    """(this process's peak RSS, the sum of its live children's peaks) in MB, from /proc (VmHWM)."""
    def hwm(pid) -> float:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
        except OSError:
            pass
        return 0.0

    children = set()
    for task in Path("/proc/self/task").iterdir():
        try:
            children.update((task / "children").read_text().split())
        except OSError:
            pass
    return hwm("self"), sum(hwm(pid) for pid in children)


def tree_cpu_seconds() -> float:
    """CPU seconds (user + system) used so far by this process and its live children (the ov worker processes):
    on a shared machine, core-seconds per frame say what a variant costs better than wall time does."""
    t = os.times()
    total = t.user + t.system
    tick = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            pids = (task / "children").read_text().split()
        except OSError:
            continue
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
    return total


def child(args) -> None:
    """Run one variant in this process and print a JSON line."""
    name, kind, kw = parse_variant(args.child)
    d = np.load(args.cache)
    lr = d["lr"]
    n, _, h, w = lr.shape
    warm = args.warmup
    # Warm-up frames are other pictures (the timed ones mirrored) at other frame numbers: nothing the timed run
    # asks for can come from VapourSynth's frame cache or from temporal reuse.
    frames = np.concatenate([np.ascontiguousarray(lr[np.arange(warm) % n, :, :, ::-1]), lr])
    outs = np.empty((n, 3, h * args.scale, w * args.scale), np.uint8) if args.keep else None
    inproc = kw.pop("inproc", 0)
    picked = None
    kept = {"s": 0.0, "cpu": 0.0}

    def keep(i, planes) -> None:
        """Keep output ``i`` for the dB column: the harness's work, taken out of the timed figures."""
        t, c = time.perf_counter(), time.process_time()
        outs[i] = np.round(np.clip(np.asarray(planes), 0, 1) * 255)  # a list of planes is stacked here
        kept["s"] += time.perf_counter() - t
        kept["cpu"] += time.process_time() - c

    if kind == "raw":  # the backend and the tiling function, no VapourSynth: what the bridge costs
        from vs_selftransfer import runtime
        up = runtime.create(args.model, width=w, height=h, **kw)
        picked = runtime.LAST_UPSCALE.get("last_upscale")
        dst = np.empty((3, h * args.scale, w * args.scale), np.float32)
        for i in range(warm):
            up.process(0, i, list(frames[i]), list(dst))
        t0, c0 = time.perf_counter(), tree_cpu_seconds()
        for i in range(n):
            up.process(0, warm + i, list(frames[warm + i]), list(dst))
            if outs is not None:
                keep(i, dst)
        elapsed, cpu_s = time.perf_counter() - t0, tree_cpu_seconds() - c0
    else:
        if inproc:
            # Our OpenVINO first, then the core: vs-mlrt's core.ov then binds to the library already loaded.
            from vs_selftransfer.backend_ov import import_openvino
            import_openvino()
        import vapoursynth as vs
        core = vs.core  # autoloads vs-mlrt's plugins (and its libopenvino) now, as vspipe does before a script
        core.max_cache_size = 256
        base = core.std.BlankClip(width=w, height=h, format=vs.RGBS, length=warm + n, fpsnum=24, fpsden=1,
                                  keep=True)

        def fill(n, f):
            fout = f.copy()
            for p in range(3):
                np.asarray(fout[p])[:] = frames[n][p]
            return fout

        src = core.std.ModifyFrame(base, base, fill)
        if kind == "selftransfer":
            out = core.selftransfer.Upscale(src, model=args.model, **kw)
            picked = core.selftransfer.Version().get("last_upscale")
        elif kind == "ort":
            out = core.ort.Model(src, network_path=args.onnx, **kw)
        elif kind == "ov":
            out = core.ov.Model(src, network_path=args.onnx, **kw)
        else:
            raise SystemExit(f"unknown variant kind {kind!r}")
        if warm:
            for f in out[:warm].frames(close=True):  # warm-up: sessions, engines, first-call allocations
                pass
        t0, c0 = time.perf_counter(), tree_cpu_seconds()
        for i, f in enumerate(out[warm:].frames(close=True)):
            if outs is not None:
                keep(i, [np.asarray(f[p]) for p in range(3)])
        elapsed, cpu_s = time.perf_counter() - t0, tree_cpu_seconds() - c0
    elapsed, cpu_s = elapsed - kept["s"], cpu_s - kept["cpu"]
    if outs is not None:
        np.save(args.keep, outs)
    own, workers = tree_peak_rss_mb()
    print(json.dumps({"name": name, "fps": n / elapsed, "seconds": elapsed, "cpu_s_per_frame": cpu_s / n,
                      "peak_rss_mb": own + workers,
                      "peak_rss_own_mb": own, "peak_rss_workers_mb": workers, "picked": picked}))


def y_psnr(a: np.ndarray, b: np.ndarray, scale: int) -> float:
    from selftransfer_trainer.metrics import psnr_y
    return float(np.mean([psnr_y(x / 255.0, y / 255.0, scale) for x, y in zip(a, b)]))


def computed_precision(name: str, row: dict, cpu: dict) -> str:
    """The precision a variant computes in: ours from what the runtime picked; OpenVINO computes bf16 by default
    where the CPU has it (vs-mlrt sets no precision hint; its fp16 graph runs the same way on a CPU)."""
    picked = row.get("picked") or ""
    for p in ("int8", "bf16", "fp32"):
        if picked.split(" ")[1:2] == [p]:
            return p
    if name.startswith("mlrt-ov") or ("bf16" in name):
        return "bf16" if cpu["native"]["bf16"] else "fp32"
    return "fp32"


def encoded(frames: np.ndarray, path: Path) -> np.ndarray:
    """``frames`` (n, 3, h, w) float32 through an x264 encode (CRF 18, yuv420p) and back: what a decoder gives the
    filter, so that "repeated" means what it means in real video, not in a synthetic array."""
    from selftransfer_trainer.video import read_frames

    n, _, h, w = frames.shape
    rgb = np.round(np.clip(frames, 0, 1) * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24", "-s", f"{w}x{h}", "-r", "24",
                    "-i", "-", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p",
                    str(path)], input=rgb.tobytes(), check=True)
    return np.stack([f.transpose(2, 0, 1) for _, _, f in read_frames(str(path))]).astype(np.float32) / 255.0


def reuse_study(args, work: Path, lr: np.ndarray) -> dict:
    """Exact temporal reuse on a static shot (one picture held), an animation on twos (each picture twice) and
    moving video (no repeats), whole frames and 128-px tiles: windows run, s/frame with reuse=1 and reuse=0, and the
    cost of the check alone (the same frames through a backend that costs nothing)."""
    from vs_selftransfer import runtime
    from vs_selftransfer.tiling import tile_windows, tiled_upscale

    n = len(lr)
    clips = {"static shot": lr[[0] * n], "animation on twos": lr[np.arange(n) // 2], "moving": lr}
    results = {}
    for clip_name, frames in clips.items():
        frames = encoded(frames, work / f"reuse-{clip_name.replace(' ', '_')}.mp4")
        _, _, h, w = frames.shape
        for tile in ((0, 128) if clip_name != "moving" else (0,)):
            row = {}
            for reuse in (1, 0):
                up = runtime.create(args.model, tilesize=tile, reuse=reuse, width=w, height=h)
                slot = up._slots[0]
                calls = []
                engine = slot.backend
                slot.backend = lambda x, engine=engine: (calls.append(1), engine(x))[1]
                dst = np.empty((3, h * args.scale, w * args.scale), np.float32)
                up.process(0, 0, list(frames[0][:, ::-1].copy()), list(dst))  # warm-up on another picture
                calls.clear()
                t0 = time.perf_counter()
                for i in range(n):
                    up.process(0, i, list(frames[i]), list(dst))
                row[f"reuse={reuse}"] = {"s_per_frame": (time.perf_counter() - t0) / n, "windows_run": len(calls)}
                per_frame = len(tile_windows(h, tile, up.overlap)) * len(tile_windows(w, tile, up.overlap))
                row["windows_total"] = n * per_frame
                row["picked"] = runtime.LAST_UPSCALE.get("last_upscale")
            results[f"{clip_name}, tile {tile or 'whole'}"] = row
            print(f"  reuse: {clip_name}, tile {tile or 'whole frame'}: {row}", file=sys.stderr)

    # The check alone: a backend that returns a ready output, so only reuse's comparisons and copies differ.
    frames = encoded(lr, work / "reuse-moving.mp4")
    _, _, h, w = frames.shape
    ready = np.zeros((1, 3, h * args.scale, w * args.scale), np.float32)
    dst = [np.empty((h * args.scale, w * args.scale), np.float32) for _ in range(3)]
    buffer = np.empty((1, 3, h, w), np.float32)
    check = {}
    for reuse in (None, {}):
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for f in frames:
                tiled_upscale(lambda x: ready, list(f), dst, args.scale, 0, 0, buffer=buffer, reuse=reuse)
            best = min(best, (time.perf_counter() - t0) / len(frames))
        check["reuse=1" if reuse is not None else "reuse=0"] = best
    results["check_cost_ms_per_frame"] = 1000 * (check["reuse=1"] - check["reuse=0"])
    print(f"  reuse check on moving video: {results['check_cost_ms_per_frame']:.2f} ms/frame "
          f"(bridge without any backend: {1000 * check['reuse=0']:.2f} ms/frame)", file=sys.stderr)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clip", default=str(ROOT.parent / "shared" / "data" / "bigbuckbunny.mp4"))
    ap.add_argument("--model", help="bundle (.stm); default: the official CARN-M x2 exported from --init the way fit "
                                    "exports it: bf16 and int8 measured on held-out frames of --clip, int8 "
                                    "calibrated on other frames")
    ap.add_argument("--init", default=str(ROOT.parent / "shared" / "data" / "carn_m_official_x234.pth"))
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", nargs="*", default=DEFAULT_VARIANTS,
                    help="NAME:KIND:k=v,... with KIND selftransfer|ort|ov|raw; inproc=1 imports our OpenVINO "
                         "before the core (default: %(default)s)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--reuse-study", action="store_true",
                    help="only measure exact temporal reuse (reuse=1) on a static shot, an animation on twos and "
                         "moving video, with the default backend")
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
    cache = work / "frames.npz"
    _, hr = load_frames(args.clip, list(range(args.frames)), 640, 360, cache)
    if not args.model:
        from selftransfer_trainer.export import export_bundle
        from selftransfer_trainer.weights import initial_model
        from vs_selftransfer.model import ModelConfig

        held_out = [args.frames + 8 * k for k in range(1, 4)]  # frames the benchmark does not run
        calib_at = [args.frames + 8 * k + 4 for k in range(0, 4)]  # and others again for int8 calibration
        lr_v, hr_v = load_frames(args.clip, held_out + calib_at, 640, 360, None)
        lr_u8 = [np.round(lr * 255).astype(np.uint8).transpose(1, 2, 0) for lr in lr_v]
        val = [(lr, h.transpose(1, 2, 0)) for lr, h in zip(lr_u8[:3], hr_v[:3])]
        args.model = str(work / "generic_x2.stm")
        print("exporting the bundle (bf16 and int8 measured on held-out frames)...", file=sys.stderr)
        export_bundle(initial_model(ModelConfig(scale=2), args.init), args.model, torchscript=False, tensorrt=False,
                      val=val, int8={"calib": lr_u8[3:], "val": val})
    from vs_selftransfer.bundle import Bundle
    bundle = Bundle.open(args.model)
    scale = bundle.scale
    if args.reuse_study:
        args.scale = scale
        lr, _ = load_frames(args.clip, list(range(args.frames)), 640, 360, cache)
        results = reuse_study(args, work, lr)
        print(json.dumps(results, indent=1))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2))
        return 0
    onnx_path = work / "model.onnx"
    onnx_path.write_bytes(bundle.member("model.onnx"))
    cpu = cpu_info()

    variants = [parse_variant(v) for v in args.variants]
    runs: dict[str, list[dict]] = {v[0]: [] for v in variants}
    errors: dict[str, str] = {}
    loads = []
    for r in range(args.rounds):
        for name, kind, kw in variants:
            if name in errors:
                continue
            spec = next(s for s in args.variants if s.startswith(name + ":"))
            cmd = [sys.executable, __file__, "--child", spec, "--model", args.model,
                   "--warmup", str(args.warmup), "--cache", str(cache), "--onnx", str(onnx_path),
                   "--scale", str(scale)]
            if r == 0:
                cmd += ["--keep", str(work / f"{name}.npy")]
            load = os.getloadavg()[0]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode != 0:
                errors[name] = (p.stderr.strip().splitlines() or ["exit %d" % p.returncode])[-1]
                print(f"  {name}: failed: {errors[name]}", file=sys.stderr)
                continue
            res = json.loads(p.stdout.strip().splitlines()[-1])
            res["load"] = load
            loads.append(load)
            runs[name].append(res)
            print(f"  round {r + 1} {name}: {res['fps']:.3f} fps, {res['cpu_s_per_frame']:.2f} core-s/frame, "
                  f"peak RSS {res['peak_rss_mb']:.0f} MB, "
                  f"load {load:.1f}", file=sys.stderr)

    ref_name = "ours-ort" if "ours-ort" in runs else variants[0][0]
    ref = np.load(work / f"{ref_name}.npy") if (work / f"{ref_name}.npy").exists() else None
    ref_hr = y_psnr(ref, hr, scale) if ref is not None else None
    table = []
    for name, _, _ in variants:
        if not runs[name]:
            table.append({"name": name, "error": errors.get(name, "no runs")})
            continue
        row = {"name": name, "fps": statistics.median(r["fps"] for r in runs[name]),
               "fps_runs": [r["fps"] for r in runs[name]], "loads": [r["load"] for r in runs[name]],
               "cpu_s_per_frame": statistics.median(r["cpu_s_per_frame"] for r in runs[name]),
               "peak_rss_mb": max(r["peak_rss_mb"] for r in runs[name]),
               "peak_rss_workers_mb": max(r["peak_rss_workers_mb"] for r in runs[name]),
               "picked": runs[name][0].get("picked")}
        row["precision"] = computed_precision(name, row, cpu)
        row["gflops"] = GFLOP_PER_FRAME * row["fps"]
        out = np.load(work / f"{name}.npy") if (work / f"{name}.npy").exists() else None
        if out is not None:
            row["y_psnr_vs_hr"] = y_psnr(out, hr, scale)
            if ref_hr is not None:
                row["db_vs_ours_fp32"] = row["y_psnr_vs_hr"] - ref_hr
        table.append(row)

    base = {r["name"]: r for r in table if "fps" in r}
    mlrt = [n for n in base if n.startswith("mlrt-")]
    print(f"\nCPU: {cpu['model']}, {cpu['cores']} cores at {cpu['mhz']} MHz, {cpu['vector_bits']}-bit vectors; "
          f"flags: {' '.join(cpu['flags'])}")
    print("native: " + ", ".join(f"{p} {f or 'no'}" for p, f in cpu["native"].items()) + "; nominal peak GFLOP/s: "
          + ", ".join(f"{p} {v:.0f}" for p, v in cpu["peak_gflops"].items()))
    print(f"{args.frames} frames 640x360 -> {640 * scale}x{360 * scale}, {args.rounds} rounds (median), load average "
          f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f} during the runs; bundle {args.model}")
    header = f"{'variant':20s} {'fps':>6s} " + " ".join(f"{'x ' + n[5:]:>9s}" for n in mlrt) + \
        f" {'prec':>5s} {'GFLOP/s':>8s} {'% peak':>6s} {'core-s/f':>8s} {'RSS MB':>7s} {'Y-PSNR':>7s}" \
        f" {'dB vs fp32':>10s}"
    print(header)
    for row in table:
        if "error" in row:
            print(f"{row['name']:20s} failed: {row['error']}")
            continue
        ratios = " ".join(f"{row['fps'] / base[n]['fps']:9.2f}" for n in mlrt)
        peak = cpu["peak_gflops"].get(row["precision"])
        share = f"{100 * row['gflops'] / peak:6.1f}" if peak else f"{'-':>6s}"
        print(f"{row['name']:20s} {row['fps']:6.3f} {ratios} {row['precision']:>5s} {row['gflops']:8.1f} {share} "
              f"{row['cpu_s_per_frame']:8.2f} {row['peak_rss_mb']:7.0f} {row.get('y_psnr_vs_hr', float('nan')):7.3f} "
              f"{row.get('db_vs_ours_fp32', float('nan')):+10.3f}")
    for row in table:
        if row.get("picked"):
            print(f"  {row['name']}: {row['picked']}")
    for ours, raw in (("ours-ort", "raw-ort"), ("ours-ov-bf16-inproc", "raw-ov-bf16"), ("ours-ov-fp32", "raw-ov-fp32"),
                      ("ours-ov-int8", "raw-ov-int8")):
        if ours in base and raw in base:
            print(f"bridge cost ({ours} vs {raw}): {100 * (1 - base[ours]['fps'] / base[raw]['fps']):+.1f}%")
    if "ours-ov-bf16" in base and "ours-ov-bf16-inproc" in base:
        print(f"worker-process cost (ours-ov-bf16 vs ours-ov-bf16-inproc): "
              f"{100 * (1 - base['ours-ov-bf16']['fps'] / base['ours-ov-bf16-inproc']['fps']):+.1f}%")
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": table, "frames": args.frames, "rounds": args.rounds,
                                               "cpu": cpu, "model": args.model}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
