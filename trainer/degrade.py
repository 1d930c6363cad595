"""Degradations: how a high-resolution (HR) frame becomes the low-resolution (LR) input the model learns from.

- ``bicubic`` (default): MATLAB ``imresize(img, 1/scale)``: Keys cubic (a = -0.5) widened by the scale when
  shrinking (antialiasing), symmetric border. The official CARN weights were trained on DIV2K LR images made this
  way, so fine-tuning on the same degradation keeps the generic model's starting point meaningful.
- ``cv2_cubic``: the seed's ``cv2.resize(INTER_CUBIC)``: 4 taps whatever the scale, so it aliases when shrinking.
- ``x264``: ``bicubic`` then one encode/decode with libx264 at a given CRF (yuv420p), for low-resolution footage
  that was also compressed. ``degrade`` encodes each frame alone, so it gets intra-frame (I-frame) artifacts;
  ``x264_video_roundtrip`` encodes a run of consecutive frames as a video (P- and B-frame artifacts too), which
  ``trainer.pairs`` uses for a degradation with ``"coding": "video"``.

HR frames are first cropped at the bottom/right to a multiple of the scale (``crop_to_scale``), so LR and HR
align exactly (LR pixel (y, x) covers HR pixels [y*s, (y+1)*s) x [x*s, (x+1)*s)); at most scale-1 pixel rows
and columns are lost, which is how odd-sized videos are handled.
"""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np

DEGRADATIONS = ("bicubic", "cv2_cubic", "x264")
CRF_RANGE = (0, 51)


def crop_to_scale(img: np.ndarray, scale: int) -> np.ndarray:
    """Crop an (H, W, ...) image at the bottom/right so both sides are multiples of ``scale`` (a view)."""
    _check_scale(scale)
    h, w = img.shape[:2]
    if h < scale or w < scale:
        raise ValueError(f"image {w}x{h} is smaller than the scale {scale}")
    return img[: h - h % scale, : w - w % scale]


def degrade(hr: np.ndarray, scale: int, method: str = "bicubic", crf: int = 23) -> np.ndarray:
    """HR RGB uint8 (H, W, 3) -> LR RGB uint8 (H // scale, W // scale, 3) by ``method`` (see module doc)."""
    _check_scale(scale)
    if method not in DEGRADATIONS:
        raise ValueError(f"unknown degradation {method!r}; choose one of {', '.join(DEGRADATIONS)}")
    hr = np.asarray(hr)
    if hr.dtype != np.uint8 or hr.ndim != 3 or hr.shape[2] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {hr.dtype} {hr.shape}")
    hr = crop_to_scale(hr, scale)
    if method == "cv2_cubic":
        import cv2

        h, w = hr.shape[:2]
        return cv2.resize(hr, (w // scale, h // scale), interpolation=cv2.INTER_CUBIC)
    lr = imresize(hr, 1.0 / scale)
    if method == "x264":
        lr = x264_roundtrip(lr, crf)
    return lr


# ----------------------------------------------------------------------------------------------- MATLAB imresize

def cubic(x: np.ndarray) -> np.ndarray:
    """Keys' cubic convolution kernel with a = -0.5, as MATLAB's ``imresize`` defines it."""
    ax = np.abs(x)
    ax2, ax3 = ax * ax, ax * ax * ax
    return ((1.5 * ax3 - 2.5 * ax2 + 1.0) * (ax <= 1)
            + (-0.5 * ax3 + 2.5 * ax2 - 4.0 * ax + 2.0) * ((ax > 1) & (ax <= 2)))


def contributions(in_length: int, out_length: int, scale: float,
                  antialiasing: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize's ``contributions``: for each output pixel, the input pixels (0-based indices, border
    mirrored symmetrically) and their weights, both (out_length, taps). Taps whose weight is zero for every output
    pixel are dropped, as MATLAB does."""
    weights, raw = _contributions_unmirrored(in_length, out_length, scale, antialiasing)
    # Symmetric border: 1..n, n..1 repeated (the edge pixel is duplicated, as MATLAB's aux vector does).
    aux = np.concatenate([np.arange(in_length), np.arange(in_length - 1, -1, -1)])
    return weights, np.ascontiguousarray(aux[np.mod(raw, aux.size)])


def _contributions_unmirrored(in_length: int, out_length: int, scale: float, antialiasing: bool):
    """``contributions`` before mirroring: weights and 0-based input indices that may fall outside the image."""
    kernel_width = 4.0
    if scale < 1 and antialiasing:
        # Shrinking: widen the kernel by 1/scale so it also low-pass filters (antialiasing).
        def h(v):
            return scale * cubic(scale * v)
        kernel_width /= scale
    else:
        h = cubic
    x = np.arange(1, out_length + 1, dtype=np.float64)  # MATLAB's 1-based output coordinates
    u = x / scale + 0.5 * (1.0 - 1.0 / scale)  # their centres in input coordinates (1-based)
    left = np.floor(u - kernel_width / 2.0)
    taps = int(math.ceil(kernel_width)) + 2
    ind = left[:, None] + np.arange(taps)[None, :]
    weights = h(u[:, None] - ind)
    weights /= weights.sum(axis=1, keepdims=True)
    keep = np.any(weights != 0, axis=0)
    return np.ascontiguousarray(weights[:, keep]), np.ascontiguousarray(ind[:, keep].astype(np.int64) - 1)


def output_length(in_length: int, scale: float) -> int:
    # MATLAB: ceil(scale * size). The tolerance keeps 720 * (1/3) = 240.00000000000003 at 240.
    return max(1, int(math.ceil(in_length * scale - 1e-9)))


def imresize(img: np.ndarray, scale: float, antialiasing: bool = True) -> np.ndarray:
    """Resize an (H, W) or (H, W, C) image by ``scale`` like MATLAB's ``imresize(img, scale)`` (bicubic).

    Float input -> float64 output (no rounding, no clipping). uint8 input -> uint8 output, rounded and saturated
    after each axis exactly as MATLAB's ``imresizemex`` does for uint8 images (the DIV2K LR images were made so).
    Axes are resized rows first (MATLAB's order for equal scales).
    """
    if not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive number, got {scale!r}")
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"expected an (H, W) or (H, W, C) image, got shape {img.shape}")
    is_uint8 = img.dtype == np.uint8
    if not is_uint8 and not np.issubdtype(img.dtype, np.floating):
        raise ValueError(f"expected a uint8 or float image, got {img.dtype}")
    out = img
    for axis in (0, 1):
        n = img.shape[axis]
        plan = _integer_shrink_plan(n, float(scale), antialiasing, channels=img.shape[2] if img.ndim == 3 else 1)
        if plan is not None:
            out = _shrink_axis_filtered(out, axis, *plan)
        else:
            weights, ind = contributions(n, output_length(n, scale), float(scale), antialiasing)
            out = _resize_axis(out, axis, weights, ind)
        if is_uint8:
            out = _round_uint8(out)
    return out


def _integer_shrink_plan(n: int, scale: float, antialiasing: bool, channels: int):
    """For shrinking by an integer factor s, every output pixel i uses the same weights on input pixels
    s*i + first + k: the resize is then a 1-D correlation keeping every s-th sample, which OpenCV's vectorised
    filter does several times faster than gathering taps. Returns (weights, first, s), or None when the general
    path is needed (non-integer factor, image shorter than the kernel, more than 4 channels)."""
    inverse = 1.0 / scale
    step = round(inverse)
    if not antialiasing or step < 2 or abs(inverse - step) > 1e-9 or channels > 4:
        return None
    weights, raw = _contributions_unmirrored(n, output_length(n, scale), scale, antialiasing)
    first = int(raw[0, 0])
    taps = weights.shape[1]
    same = np.allclose(weights, weights[0], rtol=0, atol=1e-12) and np.array_equal(
        raw, first + step * np.arange(raw.shape[0])[:, None] + np.arange(taps)[None, :])
    if not same or n < taps or not 0 <= -first < taps:
        return None
    return weights[0].copy(), first, step


def _shrink_axis_filtered(img: np.ndarray, axis: int, weights: np.ndarray, first: int, step: int) -> np.ndarray:
    import cv2

    src = np.ascontiguousarray(img, dtype=np.float64)
    one = np.ones(1, np.float64)
    # Correlation anchored so that filtered[m] = sum_k w[k] * src[m + first + k]; BORDER_REFLECT (fedcba|abcdef)
    # is MATLAB's symmetric border.
    if axis == 0:
        filtered = cv2.sepFilter2D(src, cv2.CV_64F, one, weights, anchor=(0, -first), borderType=cv2.BORDER_REFLECT)
        out = filtered[::step]
    else:
        filtered = cv2.sepFilter2D(src, cv2.CV_64F, weights, one, anchor=(-first, 0), borderType=cv2.BORDER_REFLECT)
        out = filtered[:, ::step]
    if img.ndim == 3 and out.ndim == 2:  # OpenCV drops a trailing channel axis of size 1
        out = out[:, :, None]
    return np.ascontiguousarray(out)


def _resize_axis(img: np.ndarray, axis: int, weights: np.ndarray, ind: np.ndarray) -> np.ndarray:
    """out[i] = sum_k weights[i, k] * img[ind[i, k]] along ``axis``, one tap at a time (a gather and a
    multiply-add per tap: ~8 taps at x2, far cheaper than a dense (out x in) matrix product)."""
    moved = np.moveaxis(img, axis, 0)
    shape = (weights.shape[0],) + (1,) * (moved.ndim - 1)
    acc = np.zeros((weights.shape[0],) + moved.shape[1:], np.float64)
    for k in range(weights.shape[1]):
        acc += weights[:, k].reshape(shape) * moved[ind[:, k]]
    return np.moveaxis(acc, 0, axis)


def _round_uint8(x: np.ndarray) -> np.ndarray:
    # MATLAB rounds halves away from zero (np.round would round them to even); negatives saturate to 0 anyway.
    return np.clip(np.floor(x + 0.5), 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------- x264

def x264_roundtrip(lr: np.ndarray, crf: int = 23, with_qp: bool = False):
    """Encode one RGB uint8 frame alone with libx264 (yuv420p, CRF ``crf``) and decode it back to RGB uint8: an
    intra-coded (I) frame. ``with_qp``: return (rgb, mean QP over the frame's macroblocks) instead
    (``trainer.source`` matches a source's quantiser with it)."""
    out = x264_video_roundtrip([lr], crf, with_qp)
    return (out[0][0], out[1][0]) if with_qp else out[0]


def x264_video_roundtrip(frames: list[np.ndarray], crf: int = 23, with_qp: bool = False, fps: int = 25):
    """Encode RGB uint8 frames of one shape as one libx264 video (yuv420p, CRF ``crf``, preset medium, x264's
    default GOP: an I-frame, then P- and B-frames predicted from their neighbours) and decode it back: a list of
    RGB uint8 frames, in order. ``with_qp``: return (frames, [mean QP per frame]) instead.

    A video's P- and B-frames are coded at higher quantisers than a lone frame and carry inter-prediction
    artifacts (smeared texture, drifting detail) that intra coding does not; a source that went through a video
    encoder has mostly those (``trainer.source``). yuv420p needs even sides: an odd row/column is replicated from
    the edge before encoding and cut off after, so the output has the input's shape. RGB<->YUV uses BT.601
    limited range both ways, through the accurate swscale path every frame the project decodes takes
    (``trainer.video.frame_to_rgb``): the conversion then loses almost nothing and adds no bias (swscale's default
    inexact path made the decoded frames about a level darker), and the codec does the degrading.
    """
    import av

    from selftransfer_trainer.video import frame_to_rgb, sws_flags

    if type(crf) is not int or not CRF_RANGE[0] <= crf <= CRF_RANGE[1]:
        raise ValueError(f"crf must be an integer in {CRF_RANGE[0]}..{CRF_RANGE[1]}, got {crf!r}")
    if not frames:
        raise ValueError("x264_video_roundtrip needs at least one frame")
    h, w = frames[0].shape[:2]
    if any(f.shape != frames[0].shape for f in frames):
        raise ValueError("x264_video_roundtrip needs frames of one shape")
    enc = av.CodecContext.create("libx264", "w")
    enc.width, enc.height, enc.pix_fmt = w + w % 2, h + h % 2, "yuv420p"
    enc.time_base = Fraction(1, fps)
    enc.framerate = Fraction(fps, 1)
    # One thread (x264's frame threading is not bit-exact). A lone frame is then identical from run to run; a run
    # of frames only nearly (x264's macroblock-tree rate control varies slightly between runs at some sizes, about
    # 0.1 dB per frame; no-mbtree would make it exact, but sources are encoded with x264's defaults).
    enc.thread_count, enc.thread_type = 1, "NONE"
    enc.options = {"crf": str(crf), "preset": "medium", "threads": "1"}
    packets = []
    for n, lr in enumerate(frames):
        padded = np.pad(lr, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(padded), format="rgb24")
        yuv = frame.reformat(format="yuv420p", dst_colorspace="ITU601", dst_color_range="MPEG",
                             interpolation=sws_flags())
        yuv.pts = n
        packets.extend(enc.encode(yuv))
    packets.extend(enc.encode(None))
    dec = av.CodecContext.create("h264", "r")
    # One decoding thread: with frame threading the exported quantiser tables of B-frames come out wrong.
    dec.thread_count, dec.thread_type = 1, "NONE"
    if with_qp:
        dec.options = {"export_side_data": "venc_params"}
    decoded = []
    for packet in packets:
        decoded.extend(dec.decode(packet))
    decoded.extend(dec.decode(None))
    if len(decoded) != len(frames):
        raise RuntimeError(f"x264 round trip produced {len(decoded)} frames instead of {len(frames)}")
    decoded.sort(key=lambda f: f.pts)
    rgb = [np.ascontiguousarray(frame_to_rgb(f, "ITU601", 1)[:h, :w]) for f in decoded]
    if with_qp:
        from selftransfer_trainer.source import frame_qp

        return rgb, [frame_qp(f) for f in decoded]
    return rgb


def _check_scale(scale) -> None:
    if type(scale) is not int or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
