"""``selftransfer`` command line. Each subcommand lives in the module that does the work; this file only maps
names to modules (explicitly, no registry). Every module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from vs_selftransfer.errors import UserError

# Listed in the order the data flows.
COMMANDS = {
    "frames": ("selftransfer_trainer.keyframes", "pick keyframes (I-frames, scene cuts, even fill) and held-out frames"),
    "pairs": ("selftransfer_trainer.pairs", "make HR/LR training pairs in an HDF5 file"),
    "train": ("selftransfer_trainer.train", "fine-tune CARN-M on a pairs file"),
    "export": ("selftransfer_trainer.export", "export a checkpoint as a model bundle (.stm)"),
    "fit": ("selftransfer_trainer.fit", "all of the above: VIDEO -> MODEL.stm"),
    "eval": ("selftransfer_trainer.evaluation.evaluate", "prove it: bicubic vs generic vs self-transfer on unseen frames"),
    "script": ("vs_selftransfer.pipeline.script", "print a ready .vpy that upscales a video with a bundle"),
    "upscale": ("vs_selftransfer.pipeline.upscale", "upscale a video with a bundle: vspipe | ffmpeg, keeping audio/subtitles"),
    "info": ("selftransfer_trainer.export", "show a bundle's manifest after validating it"),
    "experiment": ("selftransfer_trainer.experiment",
                   "check the source setting on any HD clip: downscale it, fit on that alone, score against it"),
    "demo": ("selftransfer_trainer.demo", "fit, evaluate and upscale the bundled sample clip (Big Buck Bunny)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="selftransfer", description="Per-video super-resolution for VapourSynth: "
                                     "fine-tune CARN-M on a video's own keyframes, run it with core.selftransfer.Upscale.")
    parser.add_argument("--version", action="version", version=f"selftransfer {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    argv = sys.argv[1:] if argv is None else argv
    # Import only the module of the command being run (torch, VapourSynth... are heavy).
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_)
        if name == wanted:
            mod = importlib.import_module(module)
            (getattr(mod, f"add_{name}_arguments", None) or mod.add_arguments)(p)
    args = parser.parse_args(argv)
    mod = importlib.import_module(COMMANDS[args.command][0])
    runner = getattr(mod, f"run_{args.command}", None) or mod.run
    from vs_selftransfer.bundle import BundleError
    try:
        return int(runner(args) or 0)
    except (UserError, BundleError, FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError) as e:
        print(f"selftransfer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"selftransfer {args.command}: interrupted", file=sys.stderr)
        return 130


def _version() -> str:
    from vs_selftransfer import __version__
    return __version__


if __name__ == "__main__":
    # `python -m selftransfer_trainer.cli` runs this file as __main__, a second copy whose UserError is not the
    # UserError the commands raise: run the importable module's main so the except clause matches.
    from selftransfer_trainer.cli import main as _main

    sys.exit(_main())
