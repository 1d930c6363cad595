"""The one tiling function: used by the runtime (every backend), by validation in the trainer and by the CLI.

A frame is cut into cores of ``tile`` x ``tile`` LR pixels; each core is run with ``overlap`` pixels of context on
every side, and only the core's output is kept. Windows keep one fixed size (shifted inward at the borders rather
than shrunk), so a backend sees one input shape per clip: engines and caches are built once. With ``overlap`` at
least the network's receptive radius (22 LR px for CARN/CARN-M) the tiled output equals the untiled one up to
float summation order; smaller overlaps trade exactness for speed.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

# LR px of context around each tile, wherever a frame is tiled (the filter, evaluation, training validation): at
# least the network's receptive radius (``vs_selftransfer.model.RECEPTIVE_RADIUS``, 22 for CARN/CARN-M), so tiled
# output equals untiled output; rounded up to a multiple of 8 for aligned windows.
OVERLAP = 24
# The automatic tile rule (``auto_tile``). Whole frames are the fastest: tiles recompute their overlap, which costs
# more than cache locality wins (OpenVINO, 1 thread, one 640x360 frame: whole 8.9 s, 256-px tiles 22.6 s, 192 14.1 s,
# 128 17.2 s; docs/benchmarks.md). Tiles bound memory instead: the activations of one window take about 3.6 kB per
# input pixel in eager PyTorch fp32 (measured: +0.82 GB at 640x368, +0.91 GB at 512x512), about 1.5 kB in ONNX
# Runtime. So frames up to AUTO_TILE_MAX_PIXELS (640x360 and 512x512 fit) run whole, larger ones in AUTO_TILE tiles,
# whose windows with the overlap (432x432 px, +0.65 GB eager) stay inside the same bound.
AUTO_TILE_MAX_PIXELS = 512 * 512
AUTO_TILE = 384


def auto_tile(width: int, height: int) -> int:
    """The automatic tile side in LR pixels for a frame of ``width`` x ``height`` input pixels (0: the whole frame),
    used by the filter (``tilesize`` unset), ``selftransfer eval`` and training validation alike."""
    return 0 if width * height <= AUTO_TILE_MAX_PIXELS else AUTO_TILE


def tile_windows(size: int, tile: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """Along one axis: (window_start, window_end, core_start, core_end) for each tile, in LR pixels."""
    if size <= 0:
        raise ValueError(f"size must be positive, not {size}")
    if tile <= 0 or tile + 2 * overlap >= size:
        return [(0, size, 0, size)]  # one window would see the whole axis anyway
    win = min(size, tile + 2 * overlap)
    out = []
    for core0 in range(0, size, tile):
        core1 = min(core0 + tile, size)
        w0 = min(max(core0 - overlap, 0), size - win)
        out.append((w0, w0 + win, core0, core1))
    return out


def window_shape(height: int, width: int, tile_h: int, tile_w: int, overlap: int) -> tuple[int, int]:
    """The (fixed) LR window shape a backend will see for a frame of this size."""
    ys, xs = tile_windows(height, tile_h, overlap), tile_windows(width, tile_w, overlap)
    return ys[0][1] - ys[0][0], xs[0][1] - xs[0][0]


def tiled_upscale(
    run: Callable[[np.ndarray], np.ndarray],
    src: Sequence[np.ndarray],
    dst: Sequence[np.ndarray],
    scale: int,
    tile: int | tuple[int, int] = 0,
    overlap: int = 0,
    buffer: np.ndarray | None = None,
    reuse: dict | None = None,
) -> int:
    """Upscale planar ``src`` (C arrays of HxW float32) into planar ``dst`` (C arrays of sH x sW).

    ``run`` maps a contiguous (1, C, h, w) float32 array to a (1, C, s*h, s*w) array (numpy or anything
    ``np.asarray`` accepts). Planes may be strided views, e.g. VapourSynth frame memory: the only copy made on the
    way in is into the window buffer the backend reads (pass ``buffer`` to reuse one between frames).

    ``reuse``: exact temporal reuse. Pass the same dict for consecutive frames; when a window's input (the tile
    with its context) is bit-identical to the one last seen at that position, its stored output is copied instead
    of running the backend. Lossless: the backend would compute the same numbers from the same input. Common in
    animation and static shots. Returns the number of windows actually run.
    """
    channels = len(src)
    if channels == 0 or len(dst) != channels:
        raise ValueError(f"src and dst must have the same number of planes, not {len(src)} and {len(dst)}")
    h, w = src[0].shape
    for p in dst:
        if p.shape != (h * scale, w * scale):
            raise ValueError(f"dst plane shape {p.shape} is not scale x src shape {(h, w)}")
    tile_h, tile_w = (tile, tile) if isinstance(tile, int) else tile
    if overlap < 0:
        raise ValueError(f"overlap must be >= 0, not {overlap}")
    ys, xs = tile_windows(h, tile_h, overlap), tile_windows(w, tile_w, overlap)
    wh, ww = ys[0][1] - ys[0][0], xs[0][1] - xs[0][0]
    if buffer is None or buffer.shape != (1, channels, wh, ww) or buffer.dtype != np.float32:
        buffer = np.empty((1, channels, wh, ww), np.float32)
    if reuse is not None and reuse.get("geometry") != (h, w, wh, ww, scale):
        reuse.clear()  # a new frame geometry invalidates every stored window
        reuse["geometry"] = (h, w, wh, ww, scale)
    s = scale
    ran = 0
    for y0, y1, cy0, cy1 in ys:
        for x0, x1, cx0, cx1 in xs:
            for c in range(channels):
                buffer[0, c] = src[c][y0:y1, x0:x1]
            oy, ox = (cy0 - y0) * s, (cx0 - x0) * s
            core = (slice(None), slice(oy, oy + (cy1 - cy0) * s), slice(ox, ox + (cx1 - cx0) * s))
            key = (y0, x0, cy0, cx0)
            hit = reuse.get(key) if reuse is not None else None
            if hit is not None and np.array_equal(hit[0], buffer):
                out_core = hit[1]
            else:
                out = np.asarray(run(buffer))
                ran += 1
                if out.shape != (1, channels, wh * s, ww * s):
                    raise ValueError(f"backend returned shape {out.shape}, expected {(1, channels, wh * s, ww * s)}")
                out_core = out[0][core]
                if reuse is not None:
                    if hit is not None and hit[1].shape == out_core.shape:  # refill the arrays: no allocation
                        np.copyto(hit[0], buffer)
                        np.copyto(hit[1], out_core)
                    else:
                        reuse[key] = (buffer.copy(), out_core.copy())
            for c in range(channels):
                dst[c][cy0 * s:cy1 * s, cx0 * s:cx1 * s] = out_core[c]
    return ran


def upscale_image(run: Callable[[np.ndarray], np.ndarray], img: np.ndarray, scale: int,
                  tile: int | tuple[int, int] = 0, overlap: int = 0) -> np.ndarray:
    """Convenience for (C, H, W) float32 images: returns a new (C, sH, sW) array."""
    img = np.asarray(img, dtype=np.float32)
    c, h, w = img.shape
    out = np.empty((c, h * scale, w * scale), np.float32)
    tiled_upscale(run, list(img), list(out), scale, tile, overlap)
    return out
