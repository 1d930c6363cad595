"""``selftransfer script`` and ``selftransfer upscale``: use a bundle on a whole video.

``script`` prints a ready VapourSynth script (BestSource -> ``core.selftransfer.Upscale`` -> output) for people who
edit their own pipelines. ``upscale`` runs that script as ``vspipe -c y4m | ffmpeg``, muxing the upscaled video
with the source's audio, subtitles, chapters and metadata.

Output safety: ffmpeg writes ``.<OUT name>.partial<OUT suffix>`` in OUT's directory, and only when vspipe *and*
ffmpeg both exit successfully is that file fsynced and renamed to OUT. A failure, Ctrl-C or SIGTERM kills both
children and removes the partial file. A SIGKILL cannot be caught: then the partial file stays behind (its name
says what it is; both children die with us through PR_SET_PDEATHSIG), and the next ``upscale`` to the same OUT
replaces it. A file named OUT therefore always holds a finished encode.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from vs_selftransfer.errors import UserError
from vs_selftransfer.colour import is_sd
from vs_selftransfer.files import fsync_dir
from vs_selftransfer import runtime
from vs_selftransfer.backend_base import parse_device

BACKENDS = ("auto", *runtime.BACKENDS)
PRECISIONS = runtime.PRECISIONS
PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow", "placebo")
# encoder -> (ffmpeg encoder name, default crf (None: lossless, no crf/preset), crf range)
ENCODERS = {
    "x264": ("libx264", 18, (0, 51)),
    "x265": ("libx265", 20, (0, 51)),
    "ffv1": ("ffv1", None, None),
}
# OUT suffix -> ffmpeg muxer. Passed with -f: the partial file's name must not decide the container.
CONTAINERS = {".mkv": "matroska", ".mp4": "mp4", ".m4v": "mp4", ".mov": "mov"}
# Where a text subtitle goes when the container cannot store its codec as is.
TEXT_SUBTITLE_CODEC = {"matroska": "srt", "mp4": "mov_text", "mov": "mov_text"}
# Audio the container cannot store is re-encoded to this (AAC goes into all three containers).
FALLBACK_AUDIO_CODEC, FALLBACK_AUDIO_BITRATE = "aac", "192k"
PARTIAL_MARK = ".partial"
SCRATCH_PREFIX = "selftransfer-upscale-"  # + pid + random: a temp folder per run, for the .vpy and trial muxes
STDERR_TAIL_LINES = 25


# -- filter options (shared by both commands) -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class FilterOptions:
    """Arguments for core.selftransfer.Upscale; None leaves the plugin's default. The plugin's runtime validates
    them all again at script evaluation; checking here too fails before any decoding starts."""
    backend: str | None = None
    device: str | None = None
    tilesize: tuple[int, ...] | None = None  # (size,) or (width, height), input pixels; 0 = no tiling that way
    overlap: int | None = None
    num_streams: int | None = None
    threads: int | None = None
    precision: str | None = None

    @classmethod
    def from_args(cls, args) -> "FilterOptions":
        opts = cls(backend=args.backend, device=args.device, tilesize=_parse_tilesize(args.tilesize),
                   overlap=args.overlap, num_streams=args.num_streams, threads=args.threads,
                   precision=args.precision)
        opts.validate()
        return opts

    def validate(self) -> None:
        if self.backend is not None and self.backend not in BACKENDS:
            raise UserError(f"--backend must be one of {', '.join(BACKENDS)}, not {self.backend!r}")
        if self.device is not None:
            try:
                parse_device(self.device)
            except ValueError as e:
                raise UserError(f"--device: {e}") from None
        if self.overlap is not None and self.overlap < 0:
            raise UserError(f"--overlap must be 0 or more pixels, not {self.overlap}")
        if self.num_streams is not None and self.num_streams < 1:
            raise UserError(f"--num-streams must be at least 1, not {self.num_streams}")
        if self.threads is not None and self.threads < 0:
            raise UserError(f"--threads must be 0 (automatic) or more, not {self.threads}")
        if self.precision is not None and self.precision not in PRECISIONS:
            raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")

    def plugin_kwargs(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                out[f.name] = (value[0] if len(value) == 1 else list(value)) if f.name == "tilesize" else value
        return out


def _parse_tilesize(text: str | None) -> tuple[int, ...] | None:
    if text is None:
        return None
    m = re.fullmatch(r"\s*(\d+)\s*(?:[xX]\s*(\d+)\s*)?", text)
    if not m:
        raise UserError(f"--tilesize must be N or WxH in input pixels (0: no tiling), not {text!r}")
    return tuple(int(g) for g in m.groups() if g is not None)


def _add_filter_arguments(p) -> None:
    g = p.add_argument_group("filter options (core.selftransfer.Upscale; unset ones use the plugin's defaults)")
    g.add_argument("--backend", choices=BACKENDS, help="inference backend (auto: fastest installed for the device)")
    g.add_argument("--device", help="cpu (default), cuda[:N] (NVIDIA) or gpu[:N] (Intel, OpenVINO)")
    g.add_argument("--tilesize", metavar="N|WxH", help="tile size in input pixels (0: no tiling)")
    g.add_argument("--overlap", type=int, help="context pixels around each tile")
    g.add_argument("--num-streams", type=int, help="frames processed in parallel")
    g.add_argument("--threads", type=int, help="CPU threads per stream (0: automatic)")
    g.add_argument("--precision", choices=PRECISIONS, help="inference precision")


# -- the script ----------------------------------------------------------------------------------------------

def _utf8_path(path: str | os.PathLike, what: str) -> str:
    """Absolute path as text a script can carry; VapourSynth passes strings as UTF-8."""
    text = os.path.abspath(os.fspath(path))
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError(f"{what} {text!r}: the path is not valid UTF-8, which VapourSynth needs; rename it") from None
    return text


SCRIPT_TEMPLATE = """\
# Made by selftransfer {version}: upscales SOURCE with the self-transfer model bundle MODEL.
#
#   vspipe --info this.vpy                  output size, frame count and format, without rendering
#   vspipe -c y4m this.vpy - | ffmpeg -i - -c:v libx264 -crf 18 out.mkv
#
# `selftransfer upscale` runs that pipeline for you and keeps the source's audio, subtitles and chapters too.
import os

import vapoursynth as vs

core = vs.core

SOURCE = {source!r}
MODEL = {model!r}{model_summary}

{source_block}
# Trim, crop, denoise or deinterlace here, before upscaling: the model sees exactly this clip.

# The model works in RGB and the filter takes YUV or RGB: a GRAY source goes through as YUV with neutral
# chroma (R = G = B) and comes back as GRAY.
gray = clip.format.color_family == vs.GRAY
if gray:
    clip = core.resize.Point(clip, format=clip.format.replace(color_family=vs.YUV, subsampling_w=0, subsampling_h=0))

# core.selftransfer.Upscale knobs; one left out takes its default (in brackets):
#   backend      ['auto'] the fastest one installed for the device: on the CPU 'ov' (OpenVINO) if installed,
#                else 'ort' (ONNX Runtime); on CUDA 'trt' (TensorRT) if the bundle has an engine, else 'torch'.
#                'torch' and 'trt' run code stored in the bundle: pick them only for bundles you trust.
#   device       ['cpu'], 'cuda' / 'cuda:N' (NVIDIA) or 'gpu' / 'gpu:N' (Intel, with OpenVINO).
#   tilesize     [whole frame up to {auto_tile_max_pixels} pixels, else {auto_tile}] tile width, or [width, height],
#                in input pixels; 0 = no tiling. Tiles bound memory; larger ones run faster.
#   overlap      [{overlap}] context pixels around each tile. At least the network's reach (22) keeps tiles
#                seamless (tiled output = untiled output); less is faster but can show seams.
#   num_streams  [1] frames processed at once, one inference session each.
#   threads      [CPU cores / num_streams] CPU threads per session; 0 = automatic.
#   precision    ['fp32'] 'fp16' and 'bf16' for GPUs, 'int8' when the bundle carries an int8 model.
clip = core.selftransfer.Upscale(clip, model=MODEL{call_args})
if gray:
    clip = core.std.ShufflePlanes(clip, 0, vs.GRAY)

# y4m (vspipe -c y4m) carries YUV and GRAY only: an RGB source leaves as 4:4:4 YUV.
if clip.format.color_family == vs.RGB:
    clip = core.resize.Bicubic(clip, format=clip.format.replace(color_family=vs.YUV), matrix_s="709")

clip.set_output()
"""

SOURCE_CACHED = """\
# BestSource (pip: vapoursynth-bestsource) decodes frame-accurately. It indexes the whole file when it first
# opens it; cachemode=1 keeps that index under INDEX_CACHE (your cache directory, never beside the video) so
# the next run starts at once. cachemode=0 never writes an index.
INDEX_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                           "selftransfer", "bsindex")
clip = core.bs.VideoSource(source=SOURCE, cachemode=1, cachepath=INDEX_CACHE)
"""

SOURCE_UNCACHED = """\
# BestSource (pip: vapoursynth-bestsource) decodes frame-accurately. This script is read once, front to back,
# so its index stays in memory (cachemode=0): nothing is written beside the video or anywhere else.
clip = core.bs.VideoSource(source=SOURCE, cachemode=0)
"""


def build_script(source: str | os.PathLike, model: str | os.PathLike, options: FilterOptions, *,
                 index_cache: bool = True, model_summary: str = "") -> str:
    """The .vpy text. ``index_cache``: let BestSource keep its index in the user's cache directory (worth it when the
    script is run more than once); False writes nothing anywhere (the one-shot ``upscale`` run). Paths are written
    with repr(), so quotes, backslashes and non-ASCII names stay intact."""
    from vs_selftransfer import __version__

    return SCRIPT_TEMPLATE.format(
        version=__version__,
        source=_utf8_path(source, "input"),
        model=_utf8_path(model, "--model"),
        model_summary=f"  # {model_summary}" if model_summary else "",
        source_block=SOURCE_CACHED if index_cache else SOURCE_UNCACHED,
        call_args="".join(f", {name}={value!r}" for name, value in options.plugin_kwargs().items()),
        auto_tile_max_pixels=runtime.AUTO_TILE_MAX_PIXELS,
        auto_tile=runtime.AUTO_TILE,
        overlap=runtime.DEFAULT_OVERLAP,
    )


def _model_summary(bundle) -> str:
    return f"{bundle.arch}, x{bundle.scale}"


def add_script_arguments(p) -> None:
    p.add_argument("input", help="source video")
    p.add_argument("--model", required=True, help="model bundle (.stm)")
    p.add_argument("-o", "--output", help="write the script to this .vpy instead of printing it")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    _add_filter_arguments(p)


def run_script(args) -> int:
    from vs_selftransfer.files import check_output_path
    from vs_selftransfer.probe import probe
    from vs_selftransfer.bundle import Bundle
    from vs_selftransfer.files import atomic_write

    options = FilterOptions.from_args(args)
    probe(args.input)
    bundle = Bundle.open(args.model)
    out = Path(args.output) if args.output else None
    if out is not None:
        check_output_path(out, force=args.force)
    text = build_script(args.input, args.model, options, index_cache=True, model_summary=_model_summary(bundle))
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write(out, text.encode("utf-8"))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(out, 0o666 & ~umask)  # a script to share and edit, not a secret (the temp file was 0600)
    return 0


# -- checks --------------------------------------------------------------------------------------------------

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
        raise UserError(f"input {path}: ffprobe cannot read it: {_last_lines(done.stderr, 3) or 'unknown error'}")
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
    return None if done.returncode == 0 else (_last_lines(done.stderr, 1) or _status(done.returncode))


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


def build_ffmpeg_command(ffmpeg: str, source: Path, partial: Path, *, muxer: str, video_args: list[str],
                         streams: SourceStreams, plan: StreamPlan, extra: list[str]) -> list[str]:
    cmd = [ffmpeg, "-hide_banner", "-nostdin", "-nostats", "-loglevel", "error"]
    if abs(streams.video_offset) > 5e-4:  # keep A/V sync when the video starts after the audio
        cmd += ["-itsoffset", f"{streams.video_offset:.6f}"]
    cmd += ["-f", "yuv4mpegpipe", "-i", "pipe:0", "-i", str(source), "-map", "0:v:0"]
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
    cmd += ["-f", muxer, "-y", str(partial)]
    return cmd


# -- progress --------------------------------------------------------------------------------------------------

class Progress:
    """Frames done / total, fps and ETA on stderr: one rewritten line on a terminal, a line per 10% otherwise."""

    def __init__(self, total: int | None, stream=None):
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = total
        self.done = 0
        self.first_frame_at: float | None = None  # rate is measured from the first frame, not from startup
        self.first_done = 0
        self._last_decile = -1
        self._last_draw = 0.0
        self._lock = threading.Lock()

    def indexing(self, percent: int) -> None:
        with self._lock:
            if self.interactive:
                self._draw(f"indexing source: {percent}%")

    def frames(self, done: int, total: int) -> None:
        with self._lock:
            now = time.monotonic()
            if self.first_frame_at is None:
                self.first_frame_at = now
                self.first_done = done
            self.done, self.total = done, total
            line = self.line(now)
            if self.interactive:
                if now - self._last_draw >= 0.2 or done == total:
                    self._draw(line)
            else:
                decile = done * 10 // max(total, 1)
                if decile > self._last_decile:
                    self._last_decile = decile
                    print(f"selftransfer upscale: {line}", file=self.stream, flush=True)

    def fps(self, now: float | None = None) -> float:
        if self.first_frame_at is None:
            return 0.0
        elapsed = (now or time.monotonic()) - self.first_frame_at
        return (self.done - self.first_done) / elapsed if elapsed > 0 else 0.0

    def line(self, now: float | None = None) -> str:
        fps = self.fps(now)
        total = self.total or 0
        eta = _clock((total - self.done) / fps) if fps > 0 and total else "?"
        pct = f" ({100 * self.done // total}%)" if total else ""
        return f"frames {self.done}/{total or '?'}{pct}, {fps:.2f} fps, ETA {eta}"

    def _draw(self, text: str) -> None:
        self._last_draw = time.monotonic()
        self.stream.write(f"\r{text}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.interactive and self._last_draw:
            self.stream.write("\n")
            self.stream.flush()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


_VSPIPE_FRAME = re.compile(r"Frame: (\d+)/(\d+)")
_VSPIPE_INDEX = re.compile(r"index progress (\d+)%")
_VSPIPE_DONE = re.compile(r"Output (\d+) frames in ")


def _lines(chunks):
    """Whole lines from text chunks; CR ends a line too (vspipe's progress rewrites one line with CR)."""
    pending = ""
    for chunk in chunks:
        pending += chunk
        parts = re.split(r"\r\n|[\r\n]", pending)
        pending = parts.pop()
        yield from parts
    if pending:
        yield pending


def parse_vspipe_stderr(chunks, progress: Progress, tail: collections.deque) -> None:
    """Feed vspipe's progress lines to ``progress``; keep the other lines (errors) in ``tail``."""
    for line in _lines(chunks):
        _vspipe_line(line, progress, tail)


def _vspipe_line(line: str, progress: Progress, tail: collections.deque) -> None:
    if m := _VSPIPE_FRAME.fullmatch(line.strip()):
        progress.frames(int(m.group(1)), int(m.group(2)))
    elif m := _VSPIPE_DONE.match(line.strip()):  # vspipe prints progress only now and then; this is the count
        progress.frames(int(m.group(1)), progress.total or int(m.group(1)))
    elif m := _VSPIPE_INDEX.search(line):
        progress.indexing(int(m.group(1)))
    elif line.strip():
        tail.append(line.rstrip())


def _collect_lines(chunks, tail: collections.deque) -> None:
    tail.extend(line.rstrip() for line in _lines(chunks) if line.strip())


def _read_text(pipe):
    """Decoded chunks of a child's stderr as they come (not line-buffered: vspipe's progress ends in CR)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    while chunk := os.read(pipe.fileno(), 65536):
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


# -- the pipeline -----------------------------------------------------------------------------------------------

class PipelineError(Exception):
    """vspipe or ffmpeg failed; the message names which and quotes its last stderr lines."""


class _Terminated(BaseException):
    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _die_with_parent(parent_pid: int):
    """preexec_fn (Linux): the child gets SIGKILL when we die, even by SIGKILL, so no orphan keeps encoding."""
    if not sys.platform.startswith("linux"):
        return None

    def set_pdeathsig():
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent_pid:  # we died between fork and prctl
            os._exit(1)
    return set_pdeathsig


def run_pipeline(vspipe_cmd: list[str], ffmpeg_cmd: list[str], progress: Progress, *,
                 vspipe_environment: dict | None = None) -> None:
    """vspipe | ffmpeg. Raises PipelineError naming the process that failed first; kills both on any exit."""
    parent = os.getpid()
    vspipe = subprocess.Popen(vspipe_cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=vspipe_environment, preexec_fn=_die_with_parent(parent))
    procs = [vspipe]
    killed: set[int] = set()
    try:
        ffmpeg = subprocess.Popen(ffmpeg_cmd, stdin=vspipe.stdout, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  preexec_fn=_die_with_parent(parent))
        procs.append(ffmpeg)
        vspipe.stdout.close()  # only ffmpeg holds the read end: if it dies, vspipe gets EPIPE instead of blocking
        vs_tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
        ff_tail: collections.deque = collections.deque(maxlen=STDERR_TAIL_LINES)
        readers = [
            threading.Thread(target=parse_vspipe_stderr, args=(_read_text(vspipe.stderr), progress, vs_tail),
                             daemon=True),
            threading.Thread(target=_collect_lines, args=(_read_text(ffmpeg.stderr), ff_tail), daemon=True),
        ]
        for t in readers:
            t.start()
        while any(p.poll() is None for p in procs):
            if any(p.returncode not in (None, 0) for p in procs):
                for other in procs:  # once one has failed, the other cannot produce anything useful
                    if other.poll() is None:
                        other.kill()
                        killed.add(other.pid)
            time.sleep(0.05)
        for t in readers:
            t.join(timeout=5)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                killed.add(p.pid)
            p.wait()
    _raise_on_failure(vspipe, ffmpeg, vs_tail, ff_tail, killed)


def _raise_on_failure(vspipe, ffmpeg, vs_tail, ff_tail, killed) -> None:
    """Blame the process that failed by itself: not one we killed, and not vspipe dying because ffmpeg went away
    (SIGPIPE, or "fwrite() call failed ... errno: 32" when SIGPIPE is ignored)."""
    def failed_by_itself(p):
        return p.returncode != 0 and p.pid not in killed

    vspipe_own = (failed_by_itself(vspipe) and vspipe.returncode != -signal.SIGPIPE
                  and not any("errno: 32" in line or "Broken pipe" in line for line in vs_tail))
    if vspipe_own:
        from vs_selftransfer import PLUGIN_HINT

        hint = f"\n({PLUGIN_HINT})" if _plugin_missing("\n".join(vs_tail)) else ""
        raise PipelineError(f"vspipe failed ({_status(vspipe.returncode)}):\n{_indent(vs_tail)}{hint}")
    if failed_by_itself(ffmpeg):
        raise PipelineError(f"ffmpeg failed ({_status(ffmpeg.returncode)}):\n{_indent(ff_tail)}")
    if vspipe.returncode != 0 or ffmpeg.returncode != 0:
        raise PipelineError(f"vspipe {_status(vspipe.returncode)}, ffmpeg {_status(ffmpeg.returncode)}:\n"
                            f"{_indent([*vs_tail, *ff_tail])}")


def _plugin_missing(vspipe_stderr: str) -> bool:
    return ("No attribute with the name selftransfer" in vspipe_stderr
            or "namespace named selftransfer" in vspipe_stderr)


def preflight(vspipe: str, model: str | os.PathLike, options: FilterOptions, width: int, height: int,
              scratch: Path) -> None:
    """Evaluate Upscale on a blank clip of the source's size before anything is decoded: a missing plugin or
    backend, or an argument the runtime refuses, is reported at once rather than after BestSource has indexed
    the whole source (minutes for a film). Raises UserError with the plugin's own message."""
    from vs_selftransfer import PLUGIN_HINT

    call_args = "".join(f", {name}={value!r}" for name, value in options.plugin_kwargs().items())
    script = scratch / "preflight.vpy"
    script.write_text(
        "import vapoursynth as vs\n"
        f"clip = vs.core.std.BlankClip(width={width}, height={height}, format=vs.YUV444P8, length=1)\n"
        f"vs.core.selftransfer.Upscale(clip, model={_utf8_path(model, '--model')!r}{call_args}).set_output()\n",
        encoding="utf-8")
    done = subprocess.run([vspipe, "--info", str(script), "-"], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, errors="replace", env=vspipe_env())
    if done.returncode == 0:
        return
    if _plugin_missing(done.stderr):
        raise UserError(PLUGIN_HINT)
    reason = next((line.removeprefix("Python exception:").strip() for line in done.stderr.splitlines()
                   if line.startswith("Python exception:")), None)
    raise UserError(reason or f"vspipe cannot evaluate the filter ({_status(done.returncode)}): "
                              f"{_last_lines(done.stderr, 3)}")


def _status(code: int) -> str:
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"


def _indent(lines) -> str:
    return "\n".join(f"  {line}" for line in lines) or "  (no error output)"


def _last_lines(text: str, n: int) -> str:
    return " | ".join(line.strip() for line in text.strip().splitlines()[-n:])


# -- selftransfer upscale ---------------------------------------------------------------------------------------

def add_upscale_arguments(p) -> None:
    p.add_argument("input", help="source video")
    p.add_argument("-o", "--output", required=True,
                   help=f"output video ({', '.join(CONTAINERS)}); written as .NAME{PARTIAL_MARK}.EXT beside it and "
                        "renamed only when complete")
    p.add_argument("--model", required=True, help="model bundle (.stm)")
    p.add_argument("--encoder", default="x264", help=f"video encoder: {', '.join(ENCODERS)} (default: %(default)s)")
    p.add_argument("--crf", type=int, help="x264/x265 quality (lower is better; default 18 for x264, 20 for x265)")
    p.add_argument("--preset", help="x264/x265 speed preset (default: medium)")
    p.add_argument("--ffmpeg-args", default="",
                   help="extra ffmpeg output options, shell-quoted, added after the encoder's (e.g. \"-pix_fmt "
                        "yuv420p -b:a 128k\")")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--verbose", action="store_true", help="print the vspipe and ffmpeg command lines")
    _add_filter_arguments(p)


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    encoder: str
    crf: int | None
    preset: str | None
    extra: list[str]

    @classmethod
    def from_args(cls, args) -> "EncodeOptions":
        if args.encoder not in ENCODERS:
            raise UserError(f"--encoder must be one of {', '.join(ENCODERS)}, not {args.encoder!r}")
        _, default_crf, crf_range = ENCODERS[args.encoder]
        if default_crf is None and (args.crf is not None or args.preset is not None):
            raise UserError(f"--crf and --preset do not apply to --encoder {args.encoder} (lossless)")
        if args.crf is not None and not crf_range[0] <= args.crf <= crf_range[1]:
            raise UserError(f"--crf must be in {crf_range[0]}..{crf_range[1]} for {args.encoder}, not {args.crf}")
        if args.preset is not None and args.preset not in PRESETS:
            raise UserError(f"--preset must be one of {', '.join(PRESETS)}, not {args.preset!r}")
        try:
            extra = shlex.split(args.ffmpeg_args or "")
        except ValueError as e:
            raise UserError(f"--ffmpeg-args cannot be parsed: {e}") from None
        return cls(args.encoder, args.crf, args.preset, extra)


def partial_path(out: Path) -> Path:
    """Where ffmpeg writes before the rename: hidden, next to OUT, obviously unfinished, same suffix."""
    return out.with_name(f".{out.name}{PARTIAL_MARK}{out.suffix}")


class _PartialFile:
    """The temp output: created up front (proving the directory is writable), locked so two runs for one OUT
    cannot clobber each other, emptied if a killed run left it behind, removed unless ``commit`` renamed it."""

    def __init__(self, out: Path):
        self.out = out
        self.path = partial_path(out)
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise UserError(f"--output {out}: cannot write in {out.parent}: {e.strerror}") from None
        try:
            import fcntl  # POSIX; elsewhere two runs for one OUT are not kept apart

            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:
            pass
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"--output {out}: another selftransfer upscale is writing it ({self.path})") from None
        os.ftruncate(self.fd, 0)  # a stale partial file from a killed run
        self.committed = False

    def commit(self) -> None:
        os.fsync(self.fd)  # same inode ffmpeg wrote (it opens the path with O_TRUNC, it does not replace it)
        os.replace(self.path, self.out)
        self.committed = True
        fsync_dir(self.out.parent)

    def close(self) -> None:
        if not self.committed:
            try:
                os.unlink(self.path)
            except FileNotFoundError:
                pass
        os.close(self.fd)


def run_upscale(args) -> int:
    from vs_selftransfer.files import check_output_path
    from vs_selftransfer.probe import probe
    from vs_selftransfer.bundle import Bundle

    options = FilterOptions.from_args(args)
    encode = EncodeOptions.from_args(args)
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
    bundle = Bundle.open(model)
    if os.path.lexists(out) and source.exists() and os.path.samefile(source, out):
        raise UserError(f"--output {out}: is the input video")
    check_output_path(out, force=args.force)
    if info.vfr:
        print(f"selftransfer upscale: warning: {source} has a variable frame rate; the output is constant "
              f"{info.fps:.3f} fps, so it drifts from the audio where the source's frame durations vary",
              file=sys.stderr)
    out_size = (info.width * bundle.scale, info.height * bundle.scale)

    _remove_stale_scratch()
    scratch = Path(tempfile.mkdtemp(prefix=f"{SCRATCH_PREFIX}{os.getpid()}-"))
    partial = None
    previous_handlers = _trap_termination()
    try:
        preflight(tools.vspipe, model, options, info.width, info.height, scratch)
        plan = plan_streams(tools.ffmpeg, source_path, streams, muxer, scratch)
        for warning in plan.warnings:
            print(f"selftransfer upscale: warning: {warning}", file=sys.stderr)
        script = scratch / "upscale.vpy"
        script.write_text(build_script(source_path, model, options, index_cache=False,
                                       model_summary=_model_summary(bundle)), encoding="utf-8")
        partial = _PartialFile(out_path)
        vspipe_cmd = [tools.vspipe, "-c", "y4m", "-p", str(script), "-"]
        ffmpeg_cmd = build_ffmpeg_command(
            tools.ffmpeg, source_path, partial.path, muxer=muxer,
            video_args=encoder_args(encode.encoder, encode.crf, encode.preset, muxer)
            + color_args(streams.video, *out_size),
            streams=streams, plan=plan, extra=encode.extra)
        if args.verbose:
            print(f"selftransfer upscale: {shlex.join(vspipe_cmd)} | {shlex.join(ffmpeg_cmd)}", file=sys.stderr)
        progress = Progress(total=info.frames)
        started = time.monotonic()
        try:
            run_pipeline(vspipe_cmd, ffmpeg_cmd, progress, vspipe_environment=vspipe_env())
        finally:
            progress.close()
        partial.commit()
        seconds = time.monotonic() - started
        print(f"selftransfer upscale: wrote {out} ({progress.done} frames, {out_size[0]}x{out_size[1]}, "
              f"{seconds:.1f} s, {progress.done / seconds if seconds > 0 else 0:.2f} fps)", file=sys.stderr)
        return 0
    except PipelineError as e:
        print(f"selftransfer upscale: error: {e}", file=sys.stderr)
        return 1
    except _Terminated as e:
        done = f"{out} was complete and is kept" if partial is not None and partial.committed else "nothing written"
        print(f"selftransfer upscale: terminated by {signal.Signals(e.signum).name}; {done}", file=sys.stderr)
        return 128 + e.signum
    finally:
        if partial is not None:
            partial.close()
        shutil.rmtree(scratch, ignore_errors=True)
        _restore_handlers(previous_handlers)


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


def _trap_termination() -> dict:
    """SIGTERM/SIGHUP unwind like Ctrl-C does (KeyboardInterrupt), so children die and the partial file goes."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        raise _Terminated(signum)

    signals = [signal.SIGTERM, *([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])]
    return {sig: signal.signal(sig, handler) for sig in signals}


def _restore_handlers(previous: dict) -> None:
    for sig, old in previous.items():
        signal.signal(sig, old)
