"""``selftransfer experiment CLIP -o DIR``: check the source-setting claim on any HD clip, in one command.

1. Make the source a user would hold: every frame of CLIP downscaled by ``--scale`` (MATLAB antialiased bicubic,
   ``trainer.degrade.imresize``), stored lossless (FFV1, RGB) or, with ``--crf N``, encoded with x264 at CRF N
   (yuv420p, preset medium, tagged with the matrix the colour rule picks for its size) as a normal video with
   its own frame types.
2. ``selftransfer fit SOURCE`` with fit's defaults (the source setting): the fit sees only the source.
3. ``selftransfer eval SOURCE --reference CLIP``: every source frame upscaled and scored against CLIP's frame.

DIR gets ``source.mkv`` / ``source.mp4``, ``source.stm``, ``report/`` and ``experiment.json`` (what was done,
the fit's verdict and the eval's numbers). CLIP must have a constant frame rate; a size that is not a multiple
of the scale is cropped at the bottom/right, and the cropped reference is stored losslessly beside the source.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from fractions import Fraction
from pathlib import Path

from vs_selftransfer.errors import UserError

SOURCE_STEM = "source"
REFERENCE_NAME = "reference.mkv"  # only when CLIP has to be cropped to a multiple of the scale
BUNDLE_NAME = "source.stm"
REPORT_NAME = "report"
RECORD_NAME = "experiment.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Make a low-resolution source from CLIP, fit on the source alone (fit's defaults) and score "
                          "the upscaled source against CLIP.")
    parser.add_argument("clip", help="a high-resolution clip (constant frame rate): the ground truth")
    parser.add_argument("-o", "--output", required=True, help="folder to create for the source, bundle and report")
    parser.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="downscale factor (default 2)")
    parser.add_argument("--crf", type=int, help="also encode the source with x264 at this CRF (0..51); "
                                                "default: a lossless source")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--minutes", type=float, help="fit's training budget in minutes (default: fit's, 5)")
    budget.add_argument("--steps", type=int, help="fit's training budget in steps")
    parser.add_argument("--init", default="official", help="fit's initial weights (default: official)")
    parser.add_argument("--generic", default="official", help="eval's generic model (default: official)")
    parser.add_argument("--frames", type=int, default=24, help="test frames for eval (default 24)")
    parser.add_argument("--no-deployed", dest="deployed", action="store_false",
                        help="skip eval's check through core.selftransfer.Upscale")
    parser.add_argument("--no-vmaf", dest="vmaf", action="store_false", help="eval without VMAF")
    parser.add_argument("--force", action="store_true", help="replace an earlier experiment in OUTPUT")


def run(args) -> int:
    from selftransfer_trainer import fit
    from selftransfer_trainer.evaluation import evaluate
    from vs_selftransfer.probe import probe

    # Every argument is checked before any work.
    if args.crf is not None and not 0 <= args.crf <= 51:
        raise UserError(f"--crf must be an integer in 0..51, not {args.crf}")
    if args.minutes is not None and not args.minutes > 0:
        raise UserError(f"--minutes must be a positive number, not {args.minutes}")
    if args.steps is not None and args.steps < 0:
        raise UserError(f"--steps must be >= 0, not {args.steps}")
    if args.frames < 1:
        raise UserError(f"--frames must be at least 1, not {args.frames}")
    if args.vmaf:
        from selftransfer_trainer.vmaf import check_available

        check_available()  # now, not after the fit
    out = Path(args.output)
    if out.exists():
        if not out.is_dir():
            raise UserError(f"-o {out}: exists and is not a folder")
        if any(out.iterdir()):
            if not (out / RECORD_NAME).is_file() and not (out / BUNDLE_NAME).exists():
                raise UserError(f"-o {out}: a folder that does not hold an experiment; refusing to write into it")
            if not args.force:
                raise UserError(f"-o {out}: holds an earlier experiment (pass --force to replace it)")
    elif not out.parent.is_dir():
        raise UserError(f"-o {out}: the folder {out.parent} does not exist; create it first")
    info = probe(args.clip)
    if info.vfr:
        raise UserError(f"{args.clip}: variable frame rate; the experiment pairs source and clip frames by "
                        "timestamp, so it needs a constant-frame-rate clip")
    lr_w, lr_h = info.width // args.scale, info.height // args.scale
    if min(lr_w, lr_h) < 48:
        raise UserError(f"{args.clip}: {info.width}x{info.height} downscaled x{args.scale} is {lr_w}x{lr_h}, too small "
                        "to fit on (48 px a side at least); use a larger clip or a smaller --scale")
    fit_argv = [str(out / f"{SOURCE_STEM}{'.mp4' if args.crf is not None else '.mkv'}"), "-o",
                str(out / BUNDLE_NAME), "--init", args.init, "--force"]
    if args.minutes is not None:
        fit_argv += ["--minutes", str(args.minutes)]
    if args.steps is not None:
        fit_argv += ["--steps", str(args.steps)]
    fit_parser = argparse.ArgumentParser(prog="selftransfer fit")
    fit.add_arguments(fit_parser)
    fit_args = fit_parser.parse_args(fit_argv)
    fit.resolve_init(fit_args.init)  # a bad --init fails now, not after the source is written

    out.mkdir(exist_ok=True)
    for stale in (RECORD_NAME, f"{SOURCE_STEM}.mp4", f"{SOURCE_STEM}.mkv", REFERENCE_NAME):
        (out / stale).unlink(missing_ok=True)
    t0 = time.perf_counter()
    source = Path(fit_argv[0])
    reference = write_source(args.clip, source, args.scale, args.crf, out / REFERENCE_NAME)
    t_source = time.perf_counter() - t0
    say(f"experiment: source {source} ({lr_w}x{lr_h}, "
        f"{'x264 CRF %d' % args.crf if args.crf is not None else 'lossless'}) from {args.clip}")

    t0 = time.perf_counter()
    fit.run(fit_args)
    t_fit = time.perf_counter() - t0

    t0 = time.perf_counter()
    o = evaluate.Options(video=str(source), model=str(out / BUNDLE_NAME), output=str(out / REPORT_NAME),
                         reference=str(reference), frames=args.frames, generic=args.generic,
                         deployed=args.deployed, force=True, progress=sys.stderr.isatty(), vmaf=args.vmaf)
    report = evaluate.evaluate(o)
    t_eval = time.perf_counter() - t0

    from vs_selftransfer.bundle import Bundle
    from vs_selftransfer.files import atomic_write

    manifest = Bundle.open(out / BUNDLE_NAME).manifest
    s = report["summary"]["all"]
    gain = s["gain_over_generic"]["selftransfer"]
    record = {
        "format": "selftransfer-experiment", "version": 1,
        "clip": {"path": str(args.clip), "sha256": info.sha256, "width": info.width, "height": info.height,
                 "frames": info.frames, "fps": info.fps},
        "source": {"path": str(source), "scale": args.scale, "downscale": "MATLAB imresize bicubic (antialiased)",
                   "codec": "x264" if args.crf is not None else "ffv1 (lossless)", "crf": args.crf},
        "reference": str(reference),
        "fit": {"argv": fit_argv, "setting": manifest.get("setting"), "validation": manifest.get("validation")},
        "result": {m: s["methods"][m]["psnr_y"]["mean"] for m in report["protocol"]["methods"]},
        "gain_psnr_y": {"mean": gain["psnr_y_mean"], "min": gain["psnr_y_min"], "max": gain["psnr_y_max"],
                        "frames_better": gain["frames_better"], "frames_worse": gain["frames_worse"]},
        "test_frames": s["frames"],
        "timings_s": {"source": t_source, "fit": t_fit, "eval": t_eval},
    }
    atomic_write(out / RECORD_NAME, (json.dumps(record, indent=1) + "\n").encode())
    r = record["result"]
    print(f"experiment {Path(args.clip).name} -> {out}\n"
          f"  source: {record['source']['codec']}{' CRF %d' % args.crf if args.crf is not None else ''}, "
          f"{lr_w}x{lr_h}; fit shipped {manifest.get('validation', {}).get('shipped')}\n"
          f"  Y-PSNR against the clip ({s['frames']} frames): bicubic {r['bicubic']:.2f} dB, generic "
          f"{r['generic']:.2f} dB, self-transfer {r['selftransfer']:.2f} dB; gain over generic "
          f"{gain['psnr_y_mean']:+.3f} dB (worst frame {gain['psnr_y_min']:+.3f}, {gain['frames_better']} better, "
          f"{gain['frames_worse']} worse)\n  report: {out / REPORT_NAME / 'report.md'}")
    return 0


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def write_source(clip: str, source: Path, scale: int, crf: int | None, cropped_reference: Path) -> Path:
    """Write the downscaled source (and, when CLIP is not a multiple of the scale, the cropped reference);
    returns the reference to score against. Both are written to temporary names and renamed when complete."""
    import av
    import numpy as np

    from selftransfer_trainer.degrade import crop_to_scale, imresize
    from selftransfer_trainer.video import read_frames
    from vs_selftransfer.colour import MATRIX_BT709, default_matrix
    from vs_selftransfer.probe import open_video, probe, video_stream

    info = probe(clip)
    with open_video(info.path) as c:
        rate = video_stream(info.path, c).average_rate or Fraction(info.fps).limit_denominator(1001)
    needs_crop = info.width % scale or info.height % scale
    lr_w, lr_h = info.width // scale, info.height // scale
    bt709 = default_matrix(lr_w, lr_h) == MATRIX_BT709
    tmp = source.with_name(f".{source.name}.tmp{source.suffix}")
    tmp_ref = cropped_reference.with_name(f".{cropped_reference.name}.tmp.mkv")
    writers = [_Writer(tmp, lr_w, lr_h, rate, crf, bt709)]
    if needs_crop:
        writers.append(_Writer(tmp_ref, lr_w * scale, lr_h * scale, rate, None, bt709))
    try:
        for i, _, rgb in read_frames(clip):
            hr = np.ascontiguousarray(crop_to_scale(rgb, scale))
            writers[0].write(imresize(hr, 1.0 / scale), i)
            if needs_crop:
                writers[1].write(hr, i)
        for w in writers:
            w.close()
        tmp.replace(source)
        if needs_crop:
            tmp_ref.replace(cropped_reference)
    except BaseException:
        for w in writers:
            w.abort()
        tmp.unlink(missing_ok=True)
        tmp_ref.unlink(missing_ok=True)
        raise
    del av
    return cropped_reference if needs_crop else Path(clip)


class _Writer:
    """One video stream: FFV1 RGB (lossless) or x264 yuv420p at a CRF, frame i at time i / rate."""

    def __init__(self, path: Path, width: int, height: int, rate: Fraction, crf: int | None, bt709: bool):
        import av

        self.container = av.open(str(path), "w")
        self.lossless = crf is None
        self.stream = self.container.add_stream("ffv1" if self.lossless else "libx264", rate=rate)
        self.stream.width, self.stream.height = width, height
        self.stream.pix_fmt = "bgr0" if self.lossless else "yuv420p"
        self.matrix = "ITU709" if bt709 else "ITU601"
        if not self.lossless:
            # threads=1: the same clip gives the same source bytes on every machine.
            self.stream.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
            cc = self.stream.codec_context
            cc.colorspace = 1 if bt709 else 6  # tagged, so every reader converts with the matrix written with
            cc.color_range = 1  # limited (MPEG)
        self.stream.codec_context.time_base = 1 / Fraction(rate)

    def write(self, rgb, index: int) -> None:
        import av

        frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
        if not self.lossless:
            frame = frame.reformat(format="yuv420p", dst_colorspace=self.matrix, dst_color_range="MPEG")
        frame.pts = index
        for packet in self.stream.encode(frame):
            self.container.mux(packet)

    def close(self) -> None:
        for packet in self.stream.encode(None):
            self.container.mux(packet)
        self.container.close()

    def abort(self) -> None:
        try:
            self.container.close()
        except Exception:  # noqa: BLE001 - already failing; the temporary file is removed next
            pass
