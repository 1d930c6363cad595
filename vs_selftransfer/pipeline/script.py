"""``selftransfer script``: print (or write) a ready VapourSynth script, BestSource -> ``core.selftransfer.Upscale``
-> output, for people who edit their own pipelines. ``selftransfer upscale`` runs the same script through vspipe."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from vs_selftransfer import tiling
from vs_selftransfer.errors import UserError
from vs_selftransfer.pipeline.options import FilterOptions, add_filter_arguments


def utf8_path(path: str | os.PathLike, what: str) -> str:
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
#                else 'ort' (ONNX Runtime); on CUDA 'torch', built from the bundle's weights (data only).
#                'torch' and 'trt' named here run code stored in the bundle (its TorchScript / TensorRT
#                members): name them only for bundles you trust.
#   device       ['cpu'], 'cuda' / 'cuda:N' (NVIDIA) or 'gpu' / 'gpu:N' (Intel, with OpenVINO).
#   tilesize     [whole frame up to {auto_tile_max_pixels} pixels, else {auto_tile}] tile width, or [width, height],
#                in input pixels; 0 = no tiling. Tiles bound memory; larger ones run faster.
#   overlap      [{overlap}] context pixels around each tile. At least the network's reach (22) keeps tiles
#                seamless (tiled output = untiled output); less is faster but can show seams.
#   num_streams  [1] frames processed at once, one inference session each.
#   threads      [CPU cores / num_streams] CPU threads per session; 0 = automatic.
#   precision    ['auto'] the bundle's int8 / bf16 graph where fit measured it within 0.05 dB on this CPU's
#                engine, else fp32; or 'fp32', 'fp16' / 'bf16' (GPUs, CPUs with native bf16), 'int8'.
#   reuse        [1] exact temporal reuse: a tile identical to the previous frame's reuses its output (lossless).
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
        source=utf8_path(source, "input"),
        model=utf8_path(model, "--model"),
        model_summary=f"  # {model_summary}" if model_summary else "",
        source_block=SOURCE_CACHED if index_cache else SOURCE_UNCACHED,
        call_args=options.call_args(),
        auto_tile_max_pixels=tiling.AUTO_TILE_MAX_PIXELS,
        auto_tile=tiling.AUTO_TILE,
        overlap=tiling.OVERLAP,
    )


def model_summary(bundle) -> str:
    return f"{bundle.arch}, x{bundle.scale}"


def open_bundle(path: str | os.PathLike):
    """The ``--model`` bundle, validated; its errors name the flag."""
    from vs_selftransfer.bundle import Bundle, BundleError

    try:
        return Bundle.open(path)
    except BundleError as e:
        raise UserError(f"--model {e}") from None


def add_arguments(p) -> None:
    p.add_argument("input", help="source video")
    p.add_argument("--model", required=True, help="model bundle (.stm)")
    p.add_argument("-o", "--output", help="write the script to this .vpy instead of printing it")
    p.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    add_filter_arguments(p)


def run(args) -> int:
    from vs_selftransfer.files import atomic_write, check_output_path
    from vs_selftransfer.probe import probe

    options = FilterOptions.from_args(args)
    probe(args.input)
    bundle = open_bundle(args.model)
    out = Path(args.output) if args.output else None
    if out is not None:
        check_output_path(out, force=args.force, inputs=[args.input, args.model])
    text = build_script(args.input, args.model, options, index_cache=True, model_summary=model_summary(bundle))
    if out is None:
        sys.stdout.write(text)
    else:
        atomic_write(out, text.encode("utf-8"))  # with the user's normal file mode: a script to share and edit
    return 0
