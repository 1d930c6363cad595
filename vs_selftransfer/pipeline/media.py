"""What ``selftransfer upscale`` needs around the filter: the tools (vspipe, ffmpeg, ffprobe) and vspipe's
environment, what ffprobe sees in the source, which of its audio/subtitle/attachment streams the output container
takes (asked of this ffmpeg by trial muxes), and the ffmpeg command that encodes vspipe's y4m and muxes them with it,
colour tags included."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from vs_selftransfer.colour import is_sd
from vs_selftransfer.errors import UserError
from vs_selftransfer.pipeline.options import ENCODERS
from vs_selftransfer.pipeline.process import exit_status, last_lines

# OUT suffix -> ffmpeg muxer. Passed with -f: the partial file's name must not decide the container.
CONTAINERS = {".mkv": "matroska", ".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}
# Where a text subtitle goes when the container cannot store its codec as is.
TEXT_SUBTITLE_CODEC = {"matroska": "srt", "mp4": "mov_text", "mov": "mov_text"}
# Audio the container cannot store is re-encoded to this (AAC goes into all three containers).
FALLBACK_AUDIO_CODEC, FALLBACK_AUDIO_BITRATE = "aac", "192k"


# -- tools ------------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Tools:
    vspipe: str
    ffmpeg: str
    ffprobe: str


def find_tools() -> Tools:
    return Tools(vspipe=_find_vspipe(), ffmpeg=_find_program("ffmpeg"), ffprobe=_find_program("ffprobe"))


def _find_vspipe() -> str:
    # The vapoursynth wheel ships the real vspipe binary inside the package; the ``vspipe`` in the venv's bin/ is a
    # Python wrapper that runs it as a grandchild (and exits 0 on Ctrl-C). Run the binary itself so signals, exit
    # status and PR_SET_PDEATHSIG reach the process doing the work. A system install has only the binary on PATH.
    import importlib.util

    spec = importlib.util.find_spec("vapoursynth")
    if spec is not None and spec.origin:
        inside = Path(spec.origin).with_name("vspipe")
        if inside.is_file() and os.access(inside, os.X_OK):
            return str(inside)
    for candidate in (shutil.which("vspipe"), shutil.which("vspipe", path=str(Path(sys.executable).parent))):
        if candidate:
            return candidate
    raise UserError("vspipe not found: install VapourSynth (pip install vapoursynth) in this environment")


def vspipe_env() -> dict:
    """The environment for vspipe.

    - The first time a venv's VapourSynth runs a script, VSScript configures itself by running the
      ``vapoursynth config`` command, which lives beside this Python: that directory goes on PATH, so a venv that
      was never activated (``.venv/bin/selftransfer ...``) works too.
    - Run from a source checkout (not an installed package), the plugin's Python half must import this same
      vs_selftransfer, so the checkout goes on PYTHONPATH; an installed one is found anyway."""
    import site

    import vs_selftransfer

    env = dict(os.environ)
    bindir = Path(sys.executable).parent  # not resolved: a venv's python is a symlink out of the venv
    if (bindir / "vapoursynth").exists():
        env["PATH"] = os.pathsep.join([str(bindir), *filter(None, [env.get("PATH")])])
    root = Path(vs_selftransfer.__file__).resolve().parent.parent
    installed = {Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]}
    if root not in installed:
        env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _find_program(name: str) -> str:
    found = shutil.which(name)
    if not found:
        raise UserError(f"{name} not found on PATH: install FFmpeg (e.g. apt install ffmpeg)")
    return found


# -- source inventory ------------------------------------------------------------------------------------------

@dataclasses.dataclass
class SourceStreams:
    """What ffprobe sees in the input: the video stream vspipe reads, and what ffmpeg may copy beside it."""
    video: dict
    audio: list[dict]
    subtitles: list[dict]
    attachments: list[dict]
    start_time: float  # of the file: ffmpeg shifts the source's streams by -start_time

    @property
    def video_offset(self) -> float:
        """Seconds from the file's start to the first video frame; the y4m pipe starts at 0."""
        return _seconds(self.video.get("start_time"), self.start_time) - self.start_time


def _seconds(value, default: float = 0.0) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return out if math.isfinite(out) else default


def inspect_source(ffprobe: str, path: Path) -> SourceStreams:
    cmd = [ffprobe, "-v", "error", "-of", "json", "-show_streams", "-show_format", str(path)]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    if done.returncode != 0:
        raise UserError(f"input {path}: ffprobe cannot read it: {last_lines(done.stderr, 3) or 'unknown error'}")
    try:
        info = json.loads(done.stdout)
    except json.JSONDecodeError as e:
        raise UserError(f"input {path}: unreadable ffprobe output: {e}") from None
    streams = info.get("streams", [])
    videos = [s for s in streams if s.get("codec_type") == "video"
              and not s.get("disposition", {}).get("attached_pic")]
    if not videos:
        raise UserError(f"input {path}: has no video stream")
    return SourceStreams(
        video=videos[0],
        audio=[s for s in streams if s.get("codec_type") == "audio"],
        subtitles=[s for s in streams if s.get("codec_type") == "subtitle"],
        attachments=[s for s in streams if s.get("codec_type") == "attachment"],
        start_time=_seconds(info.get("format", {}).get("start_time")),
    )


# -- the ffmpeg side ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class StreamPlan:
    """Input-stream maps and per-output-stream codec options for the source's non-video streams."""
    maps: list[str]
    codec_args: list[str]
    warnings: list[str]


def _trial_mux(ffmpeg: str, source: Path, maps: list[str], codec_args: list[str], muxer: str,
               scratch: Path) -> str | None:
    """Ask this ffmpeg whether the muxer takes these streams as planned, by writing just the header. None when it
    does, else ffmpeg's reason. (Asking the ffmpeg that will run beats a table: what fits where changes between
    versions, e.g. FLAC in MP4.)"""
    out = scratch / "trial"
    cmd = [ffmpeg, "-nostdin", "-hide_banner", "-v", "error", "-i", str(source), *maps, *codec_args,
           "-t", "0", "-f", muxer, "-y", str(out)]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, errors="replace")
    if out.exists():
        out.unlink()
    return None if done.returncode == 0 else (last_lines(done.stderr, 1) or exit_status(done.returncode))


def _conversion(kind: str, muxer: str, position: int) -> list[str] | None:
    """Codec options that make stream ``position`` (among the output's streams of ``kind``) fit the muxer."""
    if kind == "a":
        return [f"-c:a:{position}", FALLBACK_AUDIO_CODEC, f"-b:a:{position}", FALLBACK_AUDIO_BITRATE]
    if kind == "s":  # works for text subtitles; ffmpeg cannot turn bitmap subtitles into text
        return [f"-c:s:{position}", TEXT_SUBTITLE_CODEC[muxer]]
    return None


def plan_streams(ffmpeg: str, source: Path, streams: SourceStreams, muxer: str, scratch: Path) -> StreamPlan:
    """Copy every audio/subtitle (and, into Matroska, attachment) stream the container can store; convert the ones
    it cannot (audio -> AAC, text subtitles -> the container's text format); drop the rest with a warning."""
    kinds = [("a", s) for s in streams.audio] + [("s", s) for s in streams.subtitles]
    if muxer == "matroska":
        kinds += [("t", s) for s in streams.attachments]
    all_maps = [arg for _, s in kinds for arg in ("-map", f"0:{s['index']}")]
    if not kinds or _trial_mux(ffmpeg, source, all_maps, ["-c", "copy"], muxer, scratch) is None:
        return StreamPlan(maps=all_maps, codec_args=[], warnings=[])
    # Something does not fit: decide stream by stream (a few header-only ffmpeg runs).
    plan = StreamPlan(maps=[], codec_args=[], warnings=[])
    kept = {"a": 0, "s": 0, "t": 0}  # output streams of each kind so far: per-stream options are numbered so
    for kind, s in kinds:
        index, codec, what = s["index"], s.get("codec_name", "unknown"), _stream_name(kind)
        one = ["-map", f"0:{index}"]
        reason = _trial_mux(ffmpeg, source, one, ["-c", "copy"], muxer, scratch)
        if reason is None:
            plan.maps += one
            kept[kind] += 1
            continue
        conversion = _conversion(kind, muxer, kept[kind])
        if conversion is not None and _trial_mux(ffmpeg, source, one, _conversion(kind, muxer, 0), muxer,
                                                 scratch) is None:
            plan.maps += one
            plan.codec_args += conversion
            kept[kind] += 1
            plan.warnings.append(f"{what} stream #{index} ({codec}) cannot be stored in {muxer} as is: "
                                 f"converted to {conversion[1]}")
            continue
        plan.warnings.append(f"{what} stream #{index} ({codec}) cannot be stored in {muxer} ({reason}): dropped "
                             f"(a .mkv output keeps it)")
    return plan


def _stream_name(kind: str) -> str:
    return {"a": "audio", "s": "subtitle", "t": "attachment"}[kind]


def encoder_args(encoder: str, crf: int | None, preset: str | None, muxer: str) -> list[str]:
    name, default_crf, _ = ENCODERS[encoder]
    if default_crf is None:  # FFV1: lossless intra-only, with per-slice CRCs so damage is detectable
        return ["-c:v", name, "-level", "3", "-g", "1", "-slicecrc", "1"]
    args = ["-c:v", name, "-preset", preset or "medium", "-crf", str(default_crf if crf is None else crf)]
    if encoder == "x265":
        args += ["-x265-params", "log-level=error"]
        if muxer in ("mp4", "mov"):
            args += ["-tag:v", "hvc1"]  # the HEVC tag Apple players require
    return args


def color_args(video: dict, out_width: int | None, out_height: int | None) -> list[str]:
    """The source's colour tags for the output (y4m does not carry them). An untagged SD source is tagged BT.601
    explicitly: players guess BT.601 for untagged SD but BT.709 for untagged HD, so an untagged HD output would
    shift colours."""
    args = []
    for key, option in (("color_range", "-color_range"), ("color_space", "-colorspace"),
                        ("color_transfer", "-color_trc"), ("color_primaries", "-color_primaries")):
        value = video.get(key)
        if value and value not in ("unknown", "reserved", "unspecified"):
            args += [option, value]
    width, height = int(video.get("width") or 0), int(video.get("height") or 0)
    if ("-colorspace" not in args and out_width and out_height and width and height
            and is_sd(width, height) and not is_sd(out_width, out_height)):
        args += ["-colorspace", "smpte170m"]
    return args


def build_ffmpeg_command(ffmpeg: str, source: Path, output: str | Path, *, muxer: str, video_args: list[str],
                         streams: SourceStreams, plan: StreamPlan, extra: list[str],
                         video_input: tuple[str, ...] = ("-f", "yuv4mpegpipe", "-i", "pipe:0")) -> list[str]:
    """``output``: what ffmpeg writes, the partial file (its name or its /proc/self/fd path), never OUT itself.
    ``video_input``: the input options of the upscaled video (vspipe's y4m on stdin; the chunk join passes a
    concat list)."""
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error"]
    if abs(streams.video_offset) > 5e-4:  # keep A/V sync when the video starts after the audio
        cmd += ["-itsoffset", f"{streams.video_offset:.6f}"]
    cmd += [*video_input, "-i", str(source), "-map", "0:v:0"]
    cmd += [arg.replace("0:", "1:", 1) if arg.startswith("0:") else arg for arg in plan.maps]
    cmd += ["-map_metadata", "1", "-map_chapters", "1"]
    # Any -map_metadata:s option would turn off ffmpeg's per-stream copy for the audio and subtitles, so the video
    # stream's language and title are set by value (its other tags, like the encoder, describe the old stream).
    tags = {k.lower(): v for k, v in streams.video.get("tags", {}).items()}
    for key in ("language", "title"):
        if tags.get(key) and not (key == "language" and tags[key] == "und"):
            cmd += ["-metadata:s:v:0", f"{key}={tags[key]}"]
    cmd += video_args
    cmd += ["-c:a", "copy", "-c:s", "copy"]
    if muxer == "matroska":
        cmd += ["-c:t", "copy"]
    cmd += plan.codec_args
    if muxer in ("mp4", "mov"):
        cmd += ["-movflags", "+faststart"]
    cmd += extra
    cmd += ["-f", muxer, "-y", str(output)]
    return cmd
