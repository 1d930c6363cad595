"""``selftransfer upscale``: a bundle on a whole video, as ``vspipe -c y4m | ffmpeg``, muxing the upscaled video
with the source's audio, subtitles, chapters and metadata. Validate everything (arguments, tools, source, bundle,
output path, the filter itself on a blank clip), plan the streams, then run the pipeline into a partial file that
becomes OUT only when both processes succeeded (see ``process``)."""
from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vs_selftransfer.errors import UserError
from vs_selftransfer.pipeline import cluster
from vs_selftransfer.pipeline.media import (CONTAINERS, build_ffmpeg_command, color_args, encoder_args, find_tools,
                                            inspect_source, plan_streams, vspipe_env)
from vs_selftransfer.pipeline.options import (EncodeOptions, FilterOptions, add_encode_arguments,
                                              add_filter_arguments)
from vs_selftransfer.pipeline.process import (PartialFile, PipelineError, Terminated, exit_status, last_lines,
                                              plugin_missing, restore_handlers, run_pipeline, trap_termination)
from vs_selftransfer.pipeline.progress import Progress
from vs_selftransfer.pipeline.script import build_script, model_summary, open_bundle, utf8_path

SCRATCH_PREFIX = "selftransfer-upscale-"  # + pid + random: a temp folder per run, for the .vpy and trial muxes


def add_arguments(p) -> None:
    p.add_argument("input", help="source video")
    p.add_argument("-o", "--output", required=True,
                   help=f"output video ({', '.join(CONTAINERS)}); written to a new file in its folder that becomes "
                        "OUTPUT only when complete")
    p.add_argument("--model", required=True, help="model bundle (.stm)")
    add_encode_arguments(p)
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--verbose", action="store_true", help="print the vspipe and ffmpeg command lines")
    add_filter_arguments(p)
    cluster.add_arguments(p)


def preflight(vspipe: str, model: str | os.PathLike, options: FilterOptions, width: int, height: int,
              scratch: Path) -> None:
    """Evaluate Upscale on a blank clip of the source's size before anything is decoded: a missing plugin or
    backend, or an argument the runtime refuses, is reported at once rather than after BestSource has indexed
    the whole source (minutes for a film). Raises UserError with the plugin's own message."""
    from vs_selftransfer import PLUGIN_HINT

    script = scratch / "preflight.vpy"
    model_text = utf8_path(model, "--model")
    script.write_text(
        "import vapoursynth as vs\n"
        f"clip = vs.core.std.BlankClip(width={width}, height={height}, format=vs.YUV444P8, length=1)\n"
        f"vs.core.selftransfer.Upscale(clip, model={model_text!r}{options.call_args()}).set_output()\n",
        encoding="utf-8")
    done = subprocess.run([vspipe, "--info", str(script), "-"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", env=vspipe_env())
    if done.returncode == 0:
        return
    if plugin_missing(done.stderr):
        raise UserError(PLUGIN_HINT)
    reason = next((line.removeprefix("Python exception:").strip() for line in done.stderr.splitlines()
                   if line.startswith("Python exception:")), None)
    raise UserError(reason or f"vspipe cannot evaluate the filter ({exit_status(done.returncode)}): "
                              f"{last_lines(done.stderr, 3)}")


def run(args) -> int:
    from vs_selftransfer.files import check_output_path
    from vs_selftransfer.probe import probe

    options = FilterOptions.from_args(args)
    encode = EncodeOptions.from_args(args)
    cluster.check_arguments(args)
    source, out, model = Path(args.input), Path(args.output), Path(args.model)
    muxer = CONTAINERS.get(out.suffix.lower())
    if muxer is None:
        raise UserError(f"--output {out}: unsupported container {out.suffix or '(no extension)'!r}; "
                        f"use one of {', '.join(CONTAINERS)}")
    if encode.encoder == "ffv1" and muxer == "mp4":
        raise UserError(f"--output {out}: MP4 cannot store FFV1; use .mkv or .mov with --encoder ffv1")
    tools = find_tools()
    info = probe(source)
    # Absolute paths for ffmpeg: a name like "-x.mp4" or "concat:a|b" would otherwise be read as an option or a
    # protocol.
    source_path, out_path = Path(os.path.abspath(source)), Path(os.path.abspath(out))
    streams = inspect_source(tools.ffprobe, source_path)
    bundle = open_bundle(model)
    check_output_path(out, force=args.force, inputs=[source, model])
    if info.vfr:
        print(f"selftransfer upscale: warning: {source} has a variable frame rate; the output is constant "
              f"{info.fps:.3f} fps, so it drifts from the audio where the source's frame durations vary",
              file=sys.stderr)
    out_size = (info.width * bundle.scale, info.height * bundle.scale)

    _remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    partial = store = None
    previous_handlers = trap_termination()
    try:
        preflight(tools.vspipe, model, options, info.width, info.height, scratch)
        plan = plan_streams(tools.ffmpeg, source_path, streams, muxer, scratch)
        for warning in plan.warnings:
            print(f"selftransfer upscale: warning: {warning}", file=sys.stderr)
        script = scratch / "upscale.vpy"
        script.write_text(build_script(source_path, model, options, index_cache=False,
                                       model_summary=model_summary(bundle)), encoding="utf-8")
        partial = PartialFile(out_path, force=args.force)
        vspipe_cmd = [tools.vspipe, "-c", "y4m", "-p", str(script), "-"]
        ffmpeg_cmd = build_ffmpeg_command(
            tools.ffmpeg, source_path, partial.ffmpeg_target, muxer=muxer,
            video_args=encoder_args(encode.encoder, encode.crf, encode.preset, muxer)
            + color_args(streams.video, *out_size),
            streams=streams, plan=plan, extra=encode.extra)
        if args.verbose and args.ray is None:
            print(f"selftransfer upscale: {shlex.join(vspipe_cmd)} | {shlex.join(ffmpeg_cmd)}", file=sys.stderr)
        progress = Progress(total=info.frames)
        started = time.monotonic()
        try:
            if args.ray is None:
                run_pipeline(vspipe_cmd, ffmpeg_cmd, progress, vspipe_environment=vspipe_env(),
                             ffmpeg_pass_fds=partial.pass_fds)
            else:  # the same script in chunks on a Ray cluster, joined with the same muxing (see cluster)
                store = cluster.upscale_in_chunks(
                    args, source=source_path, model=Path(os.path.abspath(model)), options=options, encode=encode,
                    muxer=muxer, tools=tools, info=info, streams=streams, stream_plan=plan,
                    output=partial.ffmpeg_target, pass_fds=partial.pass_fds, out=out_path, out_size=out_size,
                    scratch=scratch, progress=progress)
        finally:
            progress.close()
        partial.commit()
        if store is not None:
            store.remove()
        seconds = time.monotonic() - started
        print(f"selftransfer upscale: wrote {out} ({progress.done} frames, {out_size[0]}x{out_size[1]}, "
              f"{seconds:.1f} s, {progress.done / seconds if seconds > 0 else 0:.2f} fps)", file=sys.stderr)
        return 0
    except PipelineError as e:
        print(f"selftransfer upscale: error: {e}", file=sys.stderr)
        return 1
    except Terminated as e:
        done = f"{out} was complete and is kept" if partial is not None and partial.committed else "nothing written"
        print(f"selftransfer upscale: terminated by {signal.Signals(e.signum).name}; {done}", file=sys.stderr)
        return 128 + e.signum
    finally:
        if partial is not None:
            partial.close()
        if store is not None:
            store.close()
        shutil.rmtree(scratch, ignore_errors=True)
        restore_handlers(previous_handlers)


def _remove_stale_scratch() -> None:
    """Delete the scratch folders (the .vpy, trial muxes) that SIGKILLed runs of this user left in the temp dir:
    the ones whose process is gone. (A live process that reused the pid keeps its folder: harmless.)"""
    pattern = re.compile(re.escape(SCRATCH_PREFIX) + r"(\d+)-\w+")
    try:
        entries = list(os.scandir(tempfile.gettempdir()))
    except OSError:
        return
    for entry in entries:
        m = pattern.fullmatch(entry.name)
        if not m or not entry.is_dir(follow_symlinks=False) or entry.stat().st_uid != os.getuid():
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(entry.path, ignore_errors=True)
        except (PermissionError, OverflowError):
            pass
