"""``selftransfer fit VIDEO -o MODEL.stm``: the whole offline phase in one command.

Two settings, recorded in the manifest's ``setting`` block and shown by ``selftransfer info``:

* **source** (the default): VIDEO is what you hold and will upscale. Training pairs are VIDEO's frames (HR) and
  their synthetic degradation (LR), one octave below where the bundle will run. The degradation is estimated
  from VIDEO itself (``--degradation auto``, ``trainer.source``: codec and mean quantiser from the bitstream,
  matched by trial x264 video encodes), so the model learns to undo what this source went through; for a
  compressed source the HR targets are the generic model's output on the frames' clean downscale
  (``trainer.teacher``), not the compressed frames. What ships is decided by ``SOURCE_RULE`` below, from
  measurements against real references (docs/source_only.md).
* **delivery** (``--delivery``): VIDEO is the master; the bundle will upscale a smaller stream made from it
  (bicubic by default, ``--degradation x264 --crf N`` for a compressed stream). Validation on held-out frames
  of VIDEO measures exactly that use, so the best validated checkpoint ships when it beats generic.

probe the video -> pick training and held-out frames (``trainer.keyframes.select_frames``) -> HR/LR pairs
(``trainer.pairs.write_pairs``) -> fine-tune (``trainer.train.train``) -> bundle (``trainer.export.export_bundle``).

Intermediate files go to a work folder (``--work-dir``, default ``MODEL.work`` next to the output): ``fit.json``
(what the folder was made for), ``frames.json``, ``pairs.h5`` and ``run/`` (the training checkpoint). It is removed
after a successful run unless ``--keep-work``. Every file in it, and the bundle, is written to a temporary name,
fsynced and renamed, so a killed run leaves only complete files (and temporaries that the next run deletes).

``--resume`` after an interruption reuses a complete pairs file made from the same video with the same settings,
and continues training from the last checkpoint. Without ``--resume`` the work folder's earlier state is discarded.
The ``--minutes`` budget is the training stage's (baselines, steps, validations); picking frames, making pairs and
exporting come on top (seconds to a minute for a short clip).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

from vs_selftransfer.errors import UserError
from selftransfer_trainer.degrade import CRF_RANGE, DEGRADATIONS
from selftransfer_trainer.train import add_config_arguments, check_budget_args, config_from_args

WORK_MARKER = "fit.json"
FRAMES_JSON = "frames.json"
PAIRS_H5 = "pairs.h5"
RUN_DIR = "run"
WORK_FORMAT = "selftransfer-fit-work"
INT8_CALIB_FRAMES = 8  # spread over the training frames: enough for MinMax ranges, and quick


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="the video to learn from")
    parser.add_argument("-o", "--output", required=True, help="model bundle to write (.stm)")
    parser.add_argument("--scale", type=int, default=2, choices=(2, 3, 4), help="upscaling factor (default 2)")
    add_config_arguments(parser)
    parser.add_argument("--delivery", action="store_true",
                        help="the delivery case: VIDEO is the master, and the bundle will upscale a smaller stream "
                             "made from it. Default: the source case, you will upscale VIDEO itself")
    parser.add_argument("--degradation", default="auto", choices=("auto",) + DEGRADATIONS,
                        help="how LR training inputs are made: auto (default: in the source case, estimated from "
                             "VIDEO's bitstream: bicubic for a lossless source; for a compressed one, bicubic then "
                             "x264 coded as a video at the CRF that matches its quantiser, with the generic model's "
                             "output on the clean downscale as targets; bicubic in the delivery case), bicubic "
                             "(MATLAB imresize), cv2_cubic, or x264 (bicubic then an x264 encode of each frame "
                             "alone at --crf; targets: the frames)")
    parser.add_argument("--crf", type=int, default=None, help="x264 CRF for --degradation x264 (0..51, default 23)")
    parser.add_argument("--frames", type=int, default=24, help="training frames to pick (default 24)")
    parser.add_argument("--val-frames", type=int, default=4,
                        help="held-out validation frames that decide whether training helped (default 4)")
    parser.add_argument("--work-dir", help="folder for intermediate files (default: OUTPUT.work next to the output)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder after success")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output bundle")
    parser.add_argument("--int8", default="auto", choices=("auto", "qat", "off"),
                        help="auto (default): also calibrate an int8 graph on the training frames (post-training "
                             "quantization) and ship it only if its Y-PSNR loss on the held-out frames is within "
                             "0.05 dB, so precision=auto can run it (the fastest CPU path where the CPU has VNNI or "
                             "AMX; adds about 20 s on 2 cores); qat: make that graph by quantization-aware "
                             "fine-tuning on the training pairs instead (closer to fp32 on fine-tuned weights, adds "
                             "a few minutes; same gate); off: no int8 graph")
    parser.add_argument("--progress", action="store_true", help="show the progress bar even when not on a terminal")


def run(args) -> int:
    from vs_selftransfer.files import check_output_path
    from selftransfer_trainer.video import check_trainable
    from vs_selftransfer.probe import probe

    t_start = time.perf_counter()
    timings: dict[str, float] = {}
    # Every argument is checked before any work.
    check_budget_args(args)
    if args.crf is not None and args.degradation != "x264":
        raise UserError(f"--crf only applies to --degradation x264 (with --degradation {args.degradation} the "
                        "CRF is not used)")
    if args.crf is not None and not CRF_RANGE[0] <= args.crf <= CRF_RANGE[1]:
        raise UserError(f"--crf must be an integer in {CRF_RANGE[0]}..{CRF_RANGE[1]}, not {args.crf}")
    if args.frames < 1:
        raise UserError(f"--frames must be at least 1, not {args.frames}")
    if args.val_frames < 1:
        raise UserError(f"--val-frames must be at least 1 (validation decides what ships), not {args.val_frames}")
    cfg = config_from_args(args, scale=args.scale)
    output = check_output_path(args.output, args.force, inputs=[args.video, args.init])
    init_desc = resolve_init(args.init)
    info = probe(args.video)
    check_trainable(info, args.scale, cfg.patch)
    work = Path(args.work_dir) if args.work_dir else output.with_suffix(".work")
    if work.exists() and not work.is_dir():
        raise UserError(f"--work-dir {work}: exists and is not a folder")
    if work.resolve() == output.resolve():
        raise UserError(f"--work-dir {work}: must not be the output file itself")
    if work.resolve() == output.resolve().parent:
        raise UserError(f"--work-dir {work}: must not be the output's folder (it is deleted after success)")
    setting = "delivery" if args.delivery else "source"
    estimate = None
    degradation, crf = args.degradation, (args.crf if args.crf is not None else 23)
    coding, teacher = "frame", False
    if degradation == "auto" and setting == "source":
        from selftransfer_trainer.source import estimate_source

        estimate = estimate_source(info.path, args.scale)
        degradation, crf = estimate.degradation["method"], estimate.degradation.get("crf", 23)
        coding = estimate.degradation.get("coding", "frame")
        # A compressed source's own frames carry its compression: the targets come from the teacher instead.
        teacher = not estimate.lossless
        say(f"source: {estimate.how}" + ("; targets: the generic model's output on the clean downscale"
                                           if teacher else ""))
    elif degradation == "auto":
        degradation = "bicubic"
    timings["probe_s"] = time.perf_counter() - t_start

    # The work folder, and what it was made for: --resume only reuses work made from the same inputs.
    t = time.perf_counter()
    spec = {
        "format": WORK_FORMAT,
        "video": {"path": info.path, "size": Path(info.path).stat().st_size, "sha256": info.sha256},
        "scale": args.scale, "setting": setting, "degradation": degradation,
        "crf": crf if degradation == "x264" else None, "coding": coding, "teacher": teacher,
        "frames": args.frames, "val_frames": args.val_frames, "seed": args.seed, "init": args.init,
    }
    created_work = not work.exists()
    work.mkdir(parents=True, exist_ok=True)
    remove_temporaries(output.parent, output.name)
    remove_temporaries(work, PAIRS_H5, FRAMES_JSON, WORK_MARKER)
    marker = work / WORK_MARKER
    resume = args.resume
    if resume and marker.is_file():
        old = read_marker(marker)
        if old != spec:
            changed = [k for k in spec if old.get(k) != spec[k]] if isinstance(old, dict) else ["everything"]
            raise UserError(f"{work} holds work for other inputs or settings ({', '.join(changed)} differ); rerun "
                            "without --resume to start over, or with the original settings")
    elif resume:
        say(f"--resume: {work} holds no earlier run; starting from the beginning")
        resume = False
    if not resume:
        discard_work(work)
    from vs_selftransfer.files import atomic_write

    atomic_write(marker, (json.dumps(spec, indent=1) + "\n").encode())

    # Frames and pairs.
    pairs_path = work / PAIRS_H5
    if resume and pairs_usable(pairs_path, spec):
        say(f"--resume: reusing {pairs_path}")
    else:
        from selftransfer_trainer.keyframes import select_frames, summary
        from selftransfer_trainer.pairs import write_pairs

        selection = select_frames(info.path, target=args.frames, val=args.val_frames, seed=args.seed)
        say(summary(selection))
        atomic_write(work / FRAMES_JSON, (json.dumps(selection.to_json(), indent=1) + "\n").encode())
        teach = None
        if teacher:
            from selftransfer_trainer.teacher import GenericTeacher
            from selftransfer_trainer.train import model_config, resolve_threads

            teach = GenericTeacher(model_config(cfg, args.scale), init_desc["path"], init_desc["name"],
                                   init_desc["sha256"], resolve_threads(cfg.threads))
        write_pairs(pairs_path, selection, args.scale, degradation, crf, coding=coding, teacher=teach)
        del selection  # the decoded frames: the pairs file has what training needs
    timings["frames_pairs_s"] = time.perf_counter() - t

    # Training.
    from selftransfer_trainer.train import train

    if estimate is not None and estimate.lossless:
        # SOURCE_RULE ships generic for a lossless source: only the baselines are measured (no step is run).
        say("source: lossless, so the generic weights ship (why: docs/source_only.md); only the baselines are "
            "measured. Pass --degradation bicubic to fine-tune anyway")
        cfg = dataclasses.replace(cfg, steps=0, minutes=0.0)
    t = time.perf_counter()
    result = train(pairs_path, work / RUN_DIR, cfg, init=init_desc["path"], resume=resume,
                   progress=True if args.progress else None)
    timings["train_s"] = time.perf_counter() - t
    timings["train_total_s"] = result.wall_s  # over every resumed call

    # Export.
    from selftransfer_trainer.export import export_bundle
    from selftransfer_trainer.pairs import Pairs

    t = time.perf_counter()
    with Pairs(pairs_path) as pairs:
        source = dict(pairs.source, size=spec["video"]["size"])
        frames = {
            "train": list(pairs.train_indices), "val": list(pairs.val_indices),
            "kinds": {"train": list(pairs.train_kinds), "val": list(pairs.val_kinds)},
            "times": {"train": list(pairs.train_times), "val": list(pairs.val_times)},
            "selection": dict(pairs.selection),
        }
        degradation = dict(pairs.degradation)
        target = dict(pairs.target)
        # The held-out (LR, HR) frames on which export measures what bf16 (and int8) would cost for this video:
        # the runtime's precision="auto" uses a lower precision only where that measurement accepted it.
        val_pairs = [pairs.val_pair(i) for i in range(len(pairs.val_indices))]
        int8 = None
        if args.int8 != "off":  # LR frames for calibration
            n_train = len(pairs.train_indices)
            calib = [pairs.train_pair(i)[0] for i in range(0, n_train, max(1, n_train // INT8_CALIB_FRAMES))]
            int8 = {"calib": calib[:INT8_CALIB_FRAMES], "val": val_pairs}
            if args.int8 == "qat":  # the pairs file is still there: the work folder goes after export
                from selftransfer_trainer.qat import QATConfig

                int8.update(pairs=pairs_path, qat=QATConfig(seed=args.seed, threads=result.threads))
    train_config = dict(cfg.to_dict(), init=init_desc["name"], init_sha256=init_desc["sha256"],
                        horizon=result.horizon, device=result.device, precision=result.precision,
                        threads=result.threads)
    validation = result.validation()
    setting_block = setting_evidence(setting, estimate, validation, args.degradation, target)
    if setting_block["ships"] == "generic" and result.shipped != "generic":  # the rule overrides validation
        from selftransfer_trainer.weights import initial_model

        result.model = initial_model(result.model_config, init_desc["path"])
        validation.update(shipped="generic", shipped_psnr_y=validation["generic_psnr_y"], best_step=0)
    if setting_block["why"] != validation["message"] and setting_block["ships"] == "generic":
        validation["message"] = f"shipping the generic weights: {setting_block['why']}"
    extra = {
        "source": source, "frames": frames, "degradation": degradation, "train_config": train_config,
        "validation": validation, "setting": setting_block,
        "timings": dict(timings, s_per_step=result.s_per_step, images_per_s=result.images_per_s),
    }
    check_output_path(output, args.force, inputs=[args.video, args.init])  # it may have appeared meanwhile
    manifest = export_bundle(result.model, output, extra=extra, int8=int8, val=val_pairs)
    timings["export_s"] = time.perf_counter() - t

    if not args.keep_work:
        discard_work(work)
        (work / WORK_MARKER).unlink(missing_ok=True)
        if created_work or not any(work.iterdir()):
            shutil.rmtree(work, ignore_errors=True)
    timings["total_s"] = time.perf_counter() - t_start
    print_summary(args, output, manifest, result, frames, timings, work if args.keep_work else None)
    return 0


# -- which case, and what ships ----------------------------------------------------------------------------------

SETTING_TEXT = {
    "source": "the source case: for upscaling this video itself (training pairs are its own frames and their "
              "degradation, one octave below)",
    "delivery": "the delivery case: for upscaling a smaller stream made from this video (its master)",
}


SOURCE_RULE = (
    "source case: a lossless source ships the generic weights (its only degradation is the bicubic downscale the "
    "generic model was trained for; measured against real references, gains at the source's scale did not carry "
    "an octave up: docs/source_only.md); a compressed source learns to map its frames' downscale, x264-coded as a "
    "video at the CRF that matches its quantiser, to the generic model's output on the clean downscale (the "
    "teacher), and ships the best validated checkpoint when it beats generic on the held-out frames; otherwise "
    "generic ships")


def source_rule(estimate, validation: dict, asked_degradation: str) -> tuple[str, str, str]:
    """(what ships, why, the rule) in the source case; see SOURCE_RULE."""
    if estimate is None:  # a degradation given by hand: the user's recipe, judged by its validation
        return validation["shipped"], validation["message"], ("source case, degradation given by hand "
                                                              f"({asked_degradation}): the validation decides")
    if estimate.lossless:
        return "generic", ("the source is lossless, so the generic model already matches its degradation, and "
                           "fine-tuning on it did not beat generic at the true scale in our measurements"), SOURCE_RULE
    return validation["shipped"], validation["message"], SOURCE_RULE


def setting_evidence(setting: str, estimate, validation: dict, asked_degradation: str, target: dict) -> dict:
    """The manifest's ``setting`` block: which case the bundle is for, what the source went through, what the
    training targets were, what ships and why (``SOURCE_RULE``)."""
    block = {"kind": setting, "text": SETTING_TEXT[setting],
             "degradation_from": ("estimated from the source" if estimate is not None else
                                  "default of the delivery case" if asked_degradation == "auto" else "given"),
             "estimate": estimate.to_dict() if estimate is not None else None,
             "target": target,
             "finetuned_validation_gain_db": (validation["shipped_psnr_y"] - validation["generic_psnr_y"]
                                              if validation["shipped"] == "selftransfer" else None)}
    ships, why = validation["shipped"], validation["message"]
    if setting == "source":
        ships, why, rule = source_rule(estimate, validation, asked_degradation)
        block["rule"] = rule
    block.update(ships=ships, why=why)
    return block


# -- helpers ----------------------------------------------------------------------------------------------------

def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def resolve_init(init: str) -> dict:
    """Check ``--init`` before any work: the official checkpoint is fetched (or found in the cache) now, a path
    must be a file. Returns {"name", "path" (what train() loads), "sha256"}."""
    from selftransfer_trainer.weights import official_checkpoint
    from vs_selftransfer.files import sha256_file

    if init == "none":
        return {"name": "none", "path": "none", "sha256": None}
    if init == "official":
        try:
            path = official_checkpoint("carn_m")
        except (RuntimeError, ValueError) as e:
            raise UserError(f"--init official: {e}") from None
        return {"name": "official", "path": str(path), "sha256": sha256_file(path)}
    path = Path(init)
    if not path.is_file():
        raise UserError(f"--init {init}: no such weights file" if not path.exists() else f"--init {init}: not a file")
    return {"name": path.name, "path": str(path), "sha256": sha256_file(path)}


def read_marker(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def pairs_usable(path: Path, spec: dict) -> bool:
    """A complete pairs file from this video with this scale and degradation (pairs files are written atomically,
    so an existing one is complete unless damaged afterwards)."""
    from selftransfer_trainer.pairs import VIDEO_WINDOW, Pairs

    if not path.is_file():
        return False
    try:
        with Pairs(path) as pairs:
            want = {"method": spec["degradation"], "scale": spec["scale"]}
            if spec["degradation"] == "x264":
                want["crf"] = spec["crf"]
            if spec["coding"] == "video":
                want.update(coding="video", window=VIDEO_WINDOW)
            return (pairs.scale == spec["scale"] and pairs.degradation == want
                    and (pairs.target["kind"] == "teacher") == spec["teacher"]
                    and pairs.source["sha256"] == spec["video"]["sha256"]
                    and len(pairs.val_indices) == spec["val_frames"] and len(pairs.train_indices) > 0)
    except (UserError, OSError, KeyError, ValueError):
        return False


def discard_work(work: Path) -> None:
    """Remove what an earlier run left in the work folder (only the files fit itself writes)."""
    for name in (FRAMES_JSON, PAIRS_H5):
        (work / name).unlink(missing_ok=True)
    _discard_run(work / RUN_DIR)


def _discard_run(run_dir: Path) -> None:
    from selftransfer_trainer.train import CHECKPOINT, MODEL, RESULT

    if run_dir.is_dir():
        for name in (CHECKPOINT, MODEL, RESULT):
            (run_dir / name).unlink(missing_ok=True)
        remove_temporaries(run_dir, CHECKPOINT, MODEL, RESULT)
        try:
            run_dir.rmdir()
        except OSError:
            pass  # not empty: something that is not ours


def remove_temporaries(folder: Path, *names: str) -> None:
    """Temporaries of atomic writes interrupted by a kill (named ``.NAME.<random>.tmp``)."""
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)


def print_summary(args, output: Path, manifest: dict, result, frames: dict, timings: dict, kept: Path | None) -> None:
    v = manifest["validation"]
    kinds = frames["kinds"]["train"]
    counts = ", ".join(f"{kinds.count(k)} {k}" for k in ("key", "scene", "even") if kinds.count(k))
    gain = (v["shipped_psnr_y"] - v["generic_psnr_y"])
    tuned = "none (no step ran)" if v["selftransfer_psnr_y"] is None else f"{v['selftransfer_psnr_y']:.3f} dB"
    speed = (f"{result.s_per_step:.2f} s/step, {result.images_per_s:.1f} patches/s" if result.s_per_step
             else "no timed step")
    lines = [
        f"fit {Path(args.video).name} -> {output}",
        f"  setting: {manifest['setting']['text']}",
        f"  frames: {len(frames['train'])} training ({counts}), {len(frames['val'])} held-out validation "
        f"{frames['val']}",
        f"  training: {result.steps} steps ({speed}) on {result.device}, {result.precision}, {result.threads} "
        f"threads, batch {result.train_config.batch} x {result.train_config.patch} px",
        f"  validation PSNR-Y: bicubic {v['bicubic_psnr_y']:.3f} dB, generic {v['generic_psnr_y']:.3f} dB, "
        f"self-transfer best {tuned}",
        f"  shipped: {v['shipped']} ({v['shipped_psnr_y']:.3f} dB, {gain:+.3f} dB over generic on validation) - "
        f"{v['message']}",
        f"  wall time: {timings['total_s']:.0f} s (probe {timings['probe_s']:.1f} s, frames+pairs "
        f"{timings['frames_pairs_s']:.1f} s, training {timings['train_s']:.0f} s, export {timings['export_s']:.1f} s)",
    ]
    q = manifest.get("precision", {}).get("int8")
    if q:
        lines.append(f"  int8: {'shipped' if q['accepted'] else 'not shipped'} (loss {q['loss_db']:+.3f} dB on the "
                     f"held-out frames via {q['engine']}"
                     + (f" with {q['float_layers']} float layers" if q.get("float_layers") else "") +
                     f", budget {q['budget_db']} dB; "
                     f"{q['s_per_val_frame']['fp32']:.2f} -> {q['s_per_val_frame']['int8']:.2f} s/frame)")
    if kept is not None:
        lines.append(f"  work folder kept: {kept}")
    print("\n".join(lines))
