"""selftransfer's VapourSynth side: the model bundle, the tiling, the backends and the runtime of the native filter.

In a script::

    import vapoursynth as vs
    import vs_selftransfer
    clip = vs_selftransfer.upscale(clip, "video.stm")            # same as core.selftransfer.Upscale(clip, ...)

This package is imported by the trainer too (bundle, tiling): nothing heavy is imported here.
"""
from __future__ import annotations

# The one version number of the project: setup.py reads it from here and compiles it into the plugin.
__version__ = "0.1.0"

PLUGIN_HINT = ("the selftransfer VapourSynth plugin is not loaded: install the package (pip install .), or while "
               "developing build it with `python setup.py build_ext --inplace` and set "
               "VAPOURSYNTH_EXTRA_PLUGIN_PATH=<repo>/build/vsplugin")


def upscale(clip, model, *, backend: str | None = None, device: str | None = None,
            tilesize: int | list[int] | None = None, overlap: int | None = None, num_streams: int | None = None,
            precision: str | None = None, threads: int | None = None, scale: int | None = None,
            reuse: bool | int | None = None):
    """``core.selftransfer.Upscale`` as a function; arguments left at None take the plugin's defaults.

    model: path of the .stm bundle. backend: "auto" | "ort" | "ov" | "torch" | "trt". device: "cpu" | "cuda" |
    "cuda:N" | "gpu" | "gpu:N". tilesize: tile width, or [width, height], in input pixels (0 = whole frame).
    overlap: context pixels around each tile. num_streams: frames processed at once. precision: "auto" (on the
    CPU the bundle's per-video int8 or bf16 graph where fit accepted it for the backend and the CPU runs it
    natively, else fp32) | "fp32" | "fp16" | "bf16" | "int8". threads: CPU threads per stream. scale: the factor
    you expect (an error if the bundle's differs).
    reuse: exact temporal reuse (default on): a tile whose input, context included, is bit-identical to the same
    tile of the previous frame its stream processed gets that frame's output back without running the network, so
    the output is the same either way; False (0) runs every tile.
    """
    import os

    import vapoursynth as vs

    core = vs.core
    if not hasattr(core, "selftransfer"):
        raise RuntimeError(PLUGIN_HINT)
    if isinstance(tilesize, int):
        tilesize = [tilesize]
    if isinstance(reuse, bool):
        reuse = int(reuse)  # the plugin's argument is an int: 0 or 1
    given = {"backend": backend, "device": device, "tilesize": tilesize, "overlap": overlap,
             "num_streams": num_streams, "precision": precision, "threads": threads, "scale": scale, "reuse": reuse}
    return core.selftransfer.Upscale(clip, model=os.fspath(model), **{k: v for k, v in given.items() if v is not None})
