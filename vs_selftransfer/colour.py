"""The one colour-matrix rule for video that does not say which YUV matrix it uses.

What players assume (mpv, VLC, zimg's callers): BT.601 (SMPTE 170M) for SD sizes, width <= 1024 and height <= 576,
BT.709 for everything larger. The trainer decodes its training frames with it, the plugin converts the clip with it
(``selftransfer.c`` asks this module), and ``selftransfer upscale`` tags its output with it, so a frame is turned
into RGB the same way when the model learns from it and when the model is applied to it.
"""
from __future__ import annotations

# ITU-T H.273 matrix coefficients, as VapourSynth's _Matrix and ffmpeg's colorspace tags number them.
MATRIX_BT709 = 1
MATRIX_ST170M = 6


def is_sd(width: int, height: int) -> bool:
    """Whether an untagged video of this (displayed) size is taken to be standard definition."""
    return width <= 1024 and height <= 576


def default_matrix(width: int, height: int) -> int:
    """The H.273 matrix of an untagged YUV video of this size: BT.601 (170M) for SD, BT.709 above."""
    return MATRIX_ST170M if is_sd(width, height) else MATRIX_BT709
