#!/usr/bin/env python3
"""Soak test of core.selftransfer.Upscale: push many small frames through the filter and watch the memory.

    python scripts/soak.py --frames 10000                  # the hardening check: RSS growth after warm-up < 5%
    python scripts/soak.py --frames 300 --warmup 100       # a quick smoke run

Every frame differs (seeded noise), goes through the whole graph (YUV -> RGBS -> model -> YUV, the props copy) and
is checked for finite values. RSS is read from /proc/self/status (VmRSS) every --sample-every frames; the script
prints it after the warm-up and at the end, and exits 1 when it grew more than --max-growth percent in between.
Without --model it exports the official CARN-M x2 weights (--init) to a temporary bundle first.

Besides RSS, each sample prints glibc's own accounting (mallinfo2): bytes the program holds ("in use") and bytes
freed but kept by the allocator ("retained"). A leak shows as growing "in use"; growing "retained" with flat "in
use" is glibc keeping freed pages in its per-thread heaps, which RSS counts too. So at the two points compared (end
of warm-up, end) the script samples RSS, then asks glibc to return its free pages (malloc_trim(0)) and samples
again: the pass/fail check is on the trimmed RSS, which a leak still grows and allocator retention does not; both
figures are printed. ``--no-trim`` checks the raw RSS instead.

The bundle is exported in a child process: the filter itself never imports PyTorch for ort/ov, and PyTorch's
~500 MiB in the baseline would hide growth in the percentage.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                       "fsmblks", "uordblks", "fordblks", "keepcost")]


def malloc_mib() -> tuple[float, float] | None:
    """(in use, free but retained) by glibc's malloc, in MiB; None where mallinfo2 is missing (not glibc >= 2.33)."""
    try:
        mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    mallinfo2.restype = MallInfo2
    info = mallinfo2()
    return (info.uordblks + info.hblkhd) / 2**20, info.fordblks / 2**20


def parse_size(text: str) -> tuple[int, int]:
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 32x32, not {text!r}") from None
    if w < 8 or h < 8 or w % 2 or h % 2:
        raise argparse.ArgumentTypeError(f"size must be even and at least 8x8, not {text!r}")
    return w, h


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, not {value}")
    return value


def make_bundle(init: str, directory: str) -> str:
    import subprocess

    path = os.path.join(directory, "soak_x2.stm")
    code = ("import sys; from selftransfer_trainer.export import export_bundle; "
            "from vs_selftransfer.model import ModelConfig; from selftransfer_trainer.weights import initial_model; "
            "export_bundle(initial_model(ModelConfig(scale=2), sys.argv[1]), sys.argv[2], torchscript=False, "
            "tensorrt=False, check=False)")
    subprocess.run([sys.executable, "-c", code, init, path], check=True, cwd=ROOT)
    return path


def trim_malloc() -> bool:
    """Return glibc's free heap pages to the system (malloc_trim(0)); False where there is no glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").malloc_trim(0) or True)
    except (OSError, AttributeError):
        return False


def load_plugin(core) -> None:
    if hasattr(core, "selftransfer"):
        return
    dev = ROOT / "build" / "vsplugin" / "libselftransfer.so"
    if not dev.exists():
        sys.exit("soak: the selftransfer plugin is not loaded and there is no dev build: pip install . or "
                 "python setup.py build_ext --inplace")
    core.std.LoadPlugin(str(dev))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=positive, default=10_000, help="frames to push through (default 10000)")
    p.add_argument("--warmup", type=positive, default=1000, help="frames before the reference RSS sample")
    p.add_argument("--sample-every", type=positive, default=500, help="RSS sampling interval in frames")
    p.add_argument("--size", type=parse_size, default=(32, 32), help="input frame size WxH (default 32x32)")
    p.add_argument("--format", default="YUV420P8", help="input format, a vapoursynth preset name (default YUV420P8)")
    p.add_argument("--model", help="bundle to run (default: the official weights exported to a temporary bundle)")
    p.add_argument("--init", default="official", help="weights for the temporary bundle: official or a path")
    p.add_argument("--backend", default="auto")
    p.add_argument("--num-streams", type=positive)
    p.add_argument("--max-growth", type=float, default=5.0, help="allowed RSS growth after warm-up, percent")
    p.add_argument("--no-trim", action="store_true", help="check the raw RSS, not the RSS after malloc_trim(0)")
    args = p.parse_args(argv)
    if args.warmup >= args.frames:
        p.error("--warmup must be smaller than --frames")

    import numpy as np

    try:  # before the first core: vs-mlrt's core.ov ships its own libopenvino (see tests/test_plugin.py)
        import openvino  # noqa: F401
    except ImportError:
        pass
    import vapoursynth as vs

    core = vs.core
    load_plugin(core)
    fmt = getattr(vs, args.format, None)
    if not isinstance(fmt, vs.PresetVideoFormat):
        p.error(f"--format: unknown format {args.format!r}")
    fmt = core.get_video_format(fmt)

    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        model = args.model or make_bundle(args.init, tmp)
        w, h = args.size
        blank = core.std.BlankClip(format=vs.RGBS, width=w, height=h, length=args.frames, keep=True)
        patterns = np.random.default_rng(0).random((64, 3, h, w), dtype=np.float32)

        def noise(n, f):
            out = f.copy()
            for plane in range(3):
                np.asarray(out[plane])[:] = patterns[n % 64, plane]
            return out

        clip = core.std.ModifyFrame(blank, blank, noise)
        if fmt.color_family == vs.YUV:
            clip = core.resize.Bicubic(clip, format=fmt.id, matrix_s="709")
        else:
            clip = core.resize.Point(clip, format=fmt.id)
        kw = {"backend": args.backend}
        if args.num_streams:
            kw["num_streams"] = args.num_streams
        out = core.selftransfer.Upscale(clip, model=model, **kw)

        print(f"soak: {args.frames} frames {w}x{h} {fmt.name} -> {out.width}x{out.height}, backend {args.backend}, "
              f"{core.num_threads} VapourSynth threads", flush=True)
        start = time.perf_counter()
        samples = []  # (frame, RSS, malloc in use, malloc retained)
        compared = {}  # frame -> (raw RSS, RSS after malloc_trim)
        for n, frame in enumerate(out.frames(close=True), 1):
            if not np.isfinite(np.asarray(frame[0])).all():
                print(f"soak: frame {n - 1} has non-finite values", file=sys.stderr)
                return 1
            del frame
            if n == args.warmup or n % args.sample_every == 0 or n == args.frames:
                in_use, retained = malloc_mib() or (float("nan"), float("nan"))
                samples.append((n, rss_mib(), in_use, retained))
                rate = n / (time.perf_counter() - start)
                trimmed = ""
                if n in (args.warmup, args.frames):
                    trim = not args.no_trim and trim_malloc()
                    compared[n] = (samples[-1][1], rss_mib() if trim else samples[-1][1])
                    trimmed = f", after malloc_trim {compared[n][1]:.1f} MiB"
                # Python's own objects live in pymalloc arenas, which mallinfo does not count.
                print(f"soak: frame {n:>6}: RSS {samples[-1][1]:.1f} MiB (malloc in use {in_use:.1f}, retained "
                      f"{retained:.1f}; Python blocks {sys.getallocatedblocks()}){trimmed}, {rate:.1f} fps"
                      f"{' (end of warm-up)' if n == args.warmup else ''}", flush=True)
        first, last = next(s for s in samples if s[0] == args.warmup), samples[-1]
        (raw0, trim0), (raw1, trim1) = compared[args.warmup], compared[args.frames]
        raw_growth, trim_growth = 100 * (raw1 - raw0) / raw0, 100 * (trim1 - trim0) / trim0
        growth = raw_growth if args.no_trim else trim_growth
        print(f"soak: {args.frames} frames in {time.perf_counter() - start:.0f} s; from frame {args.warmup} to the end: "
              f"RSS{' (before each malloc_trim)' if not args.no_trim else ''} {raw0:.1f} -> {raw1:.1f} MiB "
              f"({raw_growth:+.2f}%), after malloc_trim {trim0:.1f} -> {trim1:.1f} MiB ({trim_growth:+.2f}%); checked: {'raw' if args.no_trim else 'trimmed'} {growth:+.2f}% (limit "
              f"{args.max_growth}%), max raw {max(s[1] for s in samples if s[0] >= args.warmup):.1f}; malloc in use "
              f"{first[2]:.1f} -> {last[2]:.1f} MiB, retained {first[3]:.1f} -> {last[3]:.1f} MiB")
        return 0 if growth <= args.max_growth else 1

if __name__ == "__main__":
    sys.exit(main())
