#!/usr/bin/env python3
"""Scaling benchmark for ``selftransfer upscale --ray``: wall time of one video with the one-process pipeline and
with 1 and 2 chunk workers on a local Ray cluster, the per-chunk overheads, the closed-GOP size cost of chunked
x264/x265 encodes, and a model of the wall time on N machines built from those figures.

    pip install '.[cluster]'
    python scripts/bench_scale.py --clip ../shared/data/bigbuckbunny.mp4            # generic CARN-M x2

Protocol
- Input: the clip scaled to --width (x264 CRF 18, a keyframe every --chunk-frames frames, audio copied); the model is
  --model, else the shipped official CARN-M x2 weights exported as a bundle. All runs encode FFV1, so the chunked
  outputs are also checked frame by frame (framemd5) against the one-process output.
- The Ray cluster is started once (its start-up time is reported apart); each chunked run joins it. Per chunk the
  workers report: dispatch (submit -> task start), fetch (bundle/source copies on that machine), prepare (first
  script evaluation on the machine: BestSource index, frame-count check), first frame (vspipe start, script
  evaluation, model load, first inference), render (vspipe | ffmpeg), send (chunk back to the driver). The join
  (concat + mux, stream copy) is timed on the driver.
- Closed GOPs: the source clip at full size encoded by x264 and x265 (the upscale defaults: medium, CRF 18 / 20)
  in one piece and in chunks (each chunk its own encode, as the workers do), joined the same way; sizes and PSNR
  against the source frames.
- Model for N machines like this one: T(N) = cluster start + source hash + copies + ceil(C / N) x (chunk overhead
  + L / fps) + join, with C chunks of L frames, fps the measured per-machine render rate, the source copied once per
  machine over --bandwidth (0: shared storage) and the chunks' bytes coming back over the same link.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sh(*args) -> str:
    done = subprocess.run([str(a) for a in args], check=True, capture_output=True, text=True)
    return done.stdout + done.stderr


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile") if f" {f}" in flags]
    return f"{cpu}, {os.cpu_count()} CPUs, {'/'.join(isa) or 'no AVX-512'}{'' if 'amx_tile' in isa else ', no AMX'}"


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def frame_hashes(path: Path) -> list[str]:
    out = sh("ffmpeg", "-nostdin", "-v", "error", "-i", path, "-map", "0:v:0", "-f", "framemd5", "-")
    return [line.rsplit(",", 1)[1].strip() for line in out.splitlines() if line and not line.startswith("#")]


def prepare(args, work: Path) -> tuple[Path, Path]:
    clip = work / "input.mp4"
    sh("ffmpeg", "-nostdin", "-v", "error", "-y", "-i", args.clip, "-frames:v", args.frames, "-vf",
       f"scale={args.width}:-2", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-g", args.chunk_frames,
       "-keyint_min", args.chunk_frames, "-sc_threshold", "0", "-c:a", "copy", clip)
    if args.model:
        return clip, Path(args.model)
    from selftransfer_trainer.export import export_bundle
    from selftransfer_trainer.weights import initial_model
    from vs_selftransfer.model import ModelConfig

    bundle = work / "generic_x2.stm"
    export_bundle(initial_model(ModelConfig(scale=2), "official"), bundle, tensorrt=False)
    return clip, bundle


def upscale(clip: Path, bundle: Path, out: Path, *extra) -> float:
    from selftransfer_trainer.cli import main

    started = time.monotonic()
    rc = main(["upscale", str(clip), "-o", str(out), "--model", str(bundle), "--encoder", "ffv1", "--force",
               *map(str, extra)])
    if rc != 0:
        raise SystemExit(f"upscale failed ({rc})")
    return time.monotonic() - started


def chunked_run(clip, bundle, out, workers: int, chunk_frames: int) -> dict:
    """One --ray run with the chunk results and the join time captured."""
    from vs_selftransfer.pipeline import chunks as chunking
    from vs_selftransfer.pipeline import cluster

    captured: dict = {"results": [], "join": 0.0}
    render, run_ffmpeg = cluster.render_chunks, chunking.run_ffmpeg

    def spy_render(**kw):
        results = render(**kw)
        captured["results"] += results
        return results

    def spy_ffmpeg(cmd, **kw):
        started = time.monotonic()
        run_ffmpeg(cmd, **kw)
        if kw.get("what", "").startswith("joining"):
            captured["join"] = time.monotonic() - started

    cluster.render_chunks, chunking.run_ffmpeg = spy_render, spy_ffmpeg
    try:
        captured["wall"] = upscale(clip, bundle, out, "--ray", "local", "--workers", workers, "--chunk-frames",
                                   chunk_frames)
    finally:
        cluster.render_chunks, chunking.run_ffmpeg = render, run_ffmpeg
    return captured


def overheads(results: list[dict]) -> dict:
    keys = ("dispatch", "fetch", "prepare", "first_frame", "render", "send", "total")
    out = {k: statistics.mean(r["seconds"][k] for r in results) for k in keys}
    frames = sum(r["chunk"].frames for r in results)
    steady = sum(r["seconds"]["render"] - r["seconds"]["first_frame"] for r in results)
    out["steady_fps"] = (frames - len(results)) / steady if steady > 0 else 0.0
    out["bytes_per_frame"] = sum(r["size"] for r in results) / frames
    return out


def gop_cost(args, work: Path) -> list[dict]:
    """Size and PSNR of x264/x265 encodes of the source in one piece vs in chunks of --gop-chunks frames."""
    from vs_selftransfer.pipeline.chunks import plan_chunks
    from vs_selftransfer.pipeline.media import encoder_args

    source = work / "gop_source.mkv"  # the source frames, lossless, so every encode sees the same input
    sh("ffmpeg", "-nostdin", "-v", "error", "-y", "-i", args.clip, "-frames:v", args.frames, "-map", "0:v:0",
       "-c:v", "ffv1", source)
    rows = []
    for encoder in ("x264", "x265"):
        video_args = encoder_args(encoder, None, None, "matroska")
        for length in [args.frames, *args.gop_chunks]:
            plan = plan_chunks(args.frames, [0], length)
            parts, started = [], time.monotonic()
            for c in plan:
                part = work / f"{encoder}-{length}-{c.start}.mkv"
                sh("ffmpeg", "-nostdin", "-v", "error", "-y", "-i", source, "-vf",
                   f"trim=start_frame={c.start}:end_frame={c.end},setpts=PTS-STARTPTS", "-map", "0:v:0",
                   *video_args, "-f", "matroska", part)
                parts.append(part)
            seconds = time.monotonic() - started
            listing = work / f"{encoder}-{length}.txt"
            listing.write_text("".join(f"file '{p}'\n" for p in parts))
            joined = work / f"{encoder}-{length}.mkv"
            sh("ffmpeg", "-nostdin", "-v", "error", "-y", "-f", "concat", "-safe", "0", "-i", listing, "-c", "copy",
               joined)
            psnr = sh("ffmpeg", "-nostdin", "-i", joined, "-i", source, "-lavfi", "psnr", "-f", "null", "-")
            avg = float(psnr.rsplit("average:", 1)[1].split()[0])
            rows.append({"encoder": encoder, "chunk_frames": length, "chunks": len(plan),
                         "bytes": joined.stat().st_size, "psnr": avg, "seconds": seconds})
    return rows


def model(args, fps: float, overhead: float, join_per_frame: float, cluster_start: float, hash_rate: float,
          bytes_per_frame: float, bandwidth: float) -> list[tuple[int, float, float]]:
    """(machines, seconds, efficiency against a perfect split of the rendering) for 1..64 machines."""
    chunks = math.ceil(args.film_frames / args.film_chunk)
    per_chunk = overhead + args.film_chunk / fps
    source_bytes = args.film_gb * 1e9
    link = bandwidth * 1e6 / 8  # bytes/s
    out = []
    for n in (1, 2, 4, 8, 16, 32, 64):
        copies = (n * source_bytes / link) if link > 0 else 0.0  # the driver's uplink serves every machine
        rounds = math.ceil(chunks / n) * per_chunk
        back = (args.film_frames * bytes_per_frame / link) if link > 0 else 0.0  # overlaps with rendering
        wall = (cluster_start + source_bytes / hash_rate + copies + rounds + args.film_frames * join_per_frame
                + max(0.0, back - rounds))
        out.append((n, wall, args.film_frames / fps / n / wall))
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--clip", default=str(ROOT.parent / "shared" / "data" / "bigbuckbunny.mp4"))
    p.add_argument("--model", help="bundle (default: official CARN-M x2 exported now)")
    p.add_argument("--frames", type=int, default=132)
    p.add_argument("--width", type=int, default=320, help="input width for the upscale runs")
    p.add_argument("--chunk-frames", type=int, default=33)
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--gop-chunks", type=int, nargs="*", default=[66, 33], help="chunk lengths for the GOP cost")
    p.add_argument("--film-frames", type=int, default=180_000, help="the modelled video (2 h at 25 fps)")
    p.add_argument("--film-chunk", type=int, default=1000, help="chunk length in the model")
    p.add_argument("--film-gb", type=float, default=4.0, help="source size in the model")
    p.add_argument("--bandwidth", type=float, default=1000, help="Mbit/s between machines (0: shared storage)")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    logging.getLogger("ray").setLevel(logging.ERROR)

    import ray

    from vs_selftransfer.files import sha256_file

    print(f"machine: {machine()}; {load()}")
    report: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        os.environ.setdefault("XDG_CACHE_HOME", str(work / "cache"))  # BestSource's index: not the user's cache
        clip, bundle = prepare(args, work)
        started = time.monotonic()
        sha256_file(clip)
        hash_rate = clip.stat().st_size / max(time.monotonic() - started, 1e-6)

        one = upscale(clip, bundle, work / "one.mkv")
        reference = frame_hashes(work / "one.mkv")
        print(f"one process: {one:.1f} s for {args.frames} frames ({args.frames / one:.2f} fps); {load()}")
        report["one_process_s"] = one

        started = time.monotonic()
        ray.init(num_cpus=max(args.workers), include_dashboard=False, log_to_driver=False,
                 logging_level=logging.ERROR)
        cluster_start = time.monotonic() - started
        print(f"local Ray cluster start: {cluster_start:.1f} s")
        report["cluster_start_s"] = cluster_start
        runs = {}
        try:
            for workers in args.workers:
                out = work / f"ray{workers}.mkv"
                run = chunked_run(clip, bundle, out, workers, args.chunk_frames)
                exact = frame_hashes(out) == reference
                o = overheads(run["results"])
                runs[workers] = {"wall_s": run["wall"], "join_s": run["join"], "chunks": len(run["results"]),
                                 "exact": exact, **o}
                print(f"--ray local --workers {workers}: {run['wall']:.1f} s ({args.frames / run['wall']:.2f} fps), "
                      f"{len(run['results'])} chunks of <= {args.chunk_frames} frames, frames equal to one process: "
                      f"{'yes' if exact else 'NO'}; {load()}")
                print("  per chunk (mean s): " + ", ".join(
                    f"{k} {o[k]:.2f}" for k in ("dispatch", "fetch", "prepare", "first_frame", "render", "send",
                                                "total")) + f"; steady {o['steady_fps']:.2f} fps; join "
                      f"{run['join']:.2f} s")
        finally:
            ray.shutdown()
        report["runs"] = runs

        gop = gop_cost(args, work)
        report["gop_cost"] = gop
        print(f"closed-GOP cost: source {args.frames} frames at full size, each chunk its own encode; {load()}")
        for enc in ("x264", "x265"):
            rows = [r for r in gop if r["encoder"] == enc]
            base = rows[0]
            for r in rows:
                extra = (r["bytes"] - base["bytes"]) / max(r["chunks"] - 1, 1)
                per_1000 = extra / (base["bytes"] / args.frames * args.film_chunk)
                print(f"  {enc} chunks of {r['chunk_frames']:4d}: {r['bytes'] / 1e3:8.1f} kB "
                      f"({100 * (r['bytes'] / base['bytes'] - 1):+5.1f}%), PSNR {r['psnr']:.2f} dB"
                      + (f"; {extra / 1e3:.1f} kB per chunk start = {100 * per_1000:.2f}% at "
                         f"{args.film_chunk}-frame chunks" if r["chunks"] > 1 else ""))

    one_worker = runs[min(runs)]
    fps = one_worker["steady_fps"] or args.frames / one
    overhead = one_worker["dispatch"] + one_worker["total"] - (one_worker["render"] - one_worker["first_frame"])
    join_per_frame = one_worker["join_s"] / args.frames
    print(f"model: {args.film_frames} frames in {args.film_chunk}-frame chunks, {fps:.2f} fps per machine (this one, "
          f"steady), {overhead:.1f} s overhead per chunk, source {args.film_gb:g} GB copied to each machine over "
          f"{args.bandwidth:g} Mbit/s, or on shared storage")
    x264 = [r for r in gop if r["encoder"] == "x264"][-1]  # what comes back: a lossy encode, chunked
    bytes_per_frame = x264["bytes"] / args.frames
    copied = model(args, fps, overhead, join_per_frame, cluster_start, hash_rate, bytes_per_frame, args.bandwidth)
    shared = model(args, fps, overhead, join_per_frame, cluster_start, hash_rate, bytes_per_frame, 0.0)
    for (n, wall, eff), (_, wall_shared, eff_shared) in zip(copied, shared):
        print(f"  {n:3d} machines: {wall / 3600:7.2f} h (efficiency {100 * eff:5.1f}%) copied, "
              f"{wall_shared / 3600:7.2f} h ({100 * eff_shared:5.1f}%) shared storage")
    report["model"] = [{"machines": n, "hours_copied": a / 3600, "efficiency_copied": ea, "hours_shared": b / 3600,
                        "efficiency_shared": eb} for (n, a, ea), (_, b, eb) in zip(copied, shared)]
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
