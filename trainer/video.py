"""Video input: ``probe`` a file and ``read_frames`` as upright 8-bit RGB, with one clear error per bad input.

Every input problem a user can fix raises ``vs_selftransfer.errors.UserError`` naming the file, the problem and the fix
(missing path, a directory, an empty file, a truncated or damaged MP4, a file that is not a video, audio only).

Unusual but valid inputs are accepted; what happens to them:

- Odd width/height: frames are returned as they are. The pairs step crops each HR frame at the bottom/right to a
  multiple of the scale (``trainer.degrade.crop_to_scale``), losing at most scale-1 rows/columns.
- 10-bit (and other high-bit-depth) input: converted to 8-bit RGB by swscale with accurate rounding.
- Grayscale input (gray pix_fmt, or any format without chroma): converted to RGB with R = G = B, so the RGB model
  trains and runs on it unchanged.
- Variable frame rate: frames are numbered in presentation order (the order the decoder outputs them, 0-based)
  and each keeps its real timestamp; ``VideoInfo.vfr`` says so and ``fps`` is the average rate.
- Display-matrix rotation (phone videos): applied (multiples of 90°) as players do, so frames are upright;
  ``VideoInfo.width``/``height`` are the displayed (rotated) size and ``rotation`` the counter-clockwise angle
  applied. Other angles are refused.

YUV -> RGB uses the stream's matrix when it is tagged, else ``vs_selftransfer.colour.default_matrix`` (BT.601 up to
1024x576, BT.709 above: what players assume, and what the plugin uses); chroma is upsampled bicubically with accurate rounding, which matches
VapourSynth's ``core.resize.Bicubic(clip, format=vs.RGB24, matrix_in_s="709")`` (zimg) to 0.04 mean absolute
difference on the shared clip, so training frames look like what the filter will be fed.
"""
from __future__ import annotations

import os
from collections import deque
from typing import Iterable, Iterator

import numpy as np

from vs_selftransfer.colour import MATRIX_BT709, MATRIX_ST170M, default_matrix
from vs_selftransfer.errors import UserError
from vs_selftransfer.probe import FrameTable, VideoInfo, ffmpeg_reason, open_video, probe_with_table, video_stream

# Seek to a later keyframe instead of decoding through, when that skips at least this many frames.
SEEK_MIN_SKIP = 48


# ----------------------------------------------------------------------------------------------- decoding

def read_frames(path: str | os.PathLike, indices: Iterable[int] | None = None
                ) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(index, pts_seconds, rgb)`` for every frame (``indices`` None) or the given frame indices, in
    increasing index order. ``rgb`` is upright uint8 (H, W, 3). Frames are decoded sequentially; when the next
    wanted frame lies beyond a later keyframe, the reader seeks to that keyframe instead of decoding through
    (frames are identified by their timestamps, so the numbering stays exact)."""
    info, table = probe_with_table(path)
    if indices is None:
        wanted = None
    else:
        wanted = sorted({int(i) for i in indices})
        bad = [i for i in wanted if not 0 <= i < info.frames]
        if bad:
            raise ValueError(f"frame indices {bad[:5]} out of range 0..{info.frames - 1} for {info.path}")
        if not wanted:
            return
    yield from _decode(info, table, wanted)


def _decode(info: VideoInfo, table: FrameTable, wanted: list[int] | None):
    import av

    if table.pts is None:
        yield from _decode_counting(info, wanted, after=-1)
        return
    to_rgb = _rgb_converter(info)
    pending = deque(wanted) if wanted is not None else None
    last = -1  # index of the last frame decoded
    sought = -1  # keyframe of the last seek (never seek to the same one twice: a seek may land earlier)
    lost_track = False
    container = open_video(info.path)
    with container:
        stream = video_stream(info.path, container)
        frames = container.decode(stream)
        try:
            while pending is None or pending:
                if pending is not None:
                    key = table.keyframe_at_or_before(pending[0])
                    if key > last + SEEK_MIN_SKIP and key > sought:
                        sought = key
                        container.seek(table.pts[key], stream=stream, backward=True, any_frame=False)
                        frames = container.decode(stream)
                frame = next(frames, None)
                if frame is None:
                    break
                index = table.index_of_pts(frame.pts)
                if index is None or (pending is not None and index > pending[0]):
                    # The decoder's timestamps do not match the packets', or a wanted frame was passed (a seek
                    # overshot): number frames by counting from the start instead.
                    lost_track = True
                    break
                if index <= last:
                    continue  # a seek went back before frames already decoded
                last = index
                if pending is not None:
                    if index < pending[0]:
                        continue
                    pending.popleft()
                yield index, _frame_time(frame, index, info), to_rgb(frame)
        except av.FFmpegError as e:
            raise UserError(f"{info.path}: decoding failed after frame {last} ({ffmpeg_reason(e)}); the file is "
                            f"damaged or truncated") from None
    if lost_track:
        yield from _decode_counting(info, list(pending) if pending is not None else None, after=last)
    elif pending:
        raise UserError(f"{info.path}: frames {list(pending)[:5]} could not be decoded (the file ends early or "
                        f"is damaged)")


def _decode_counting(info: VideoInfo, wanted: list[int] | None, after: int):
    """Decode from the start, numbering frames by counting; output frames after index ``after``."""
    import av

    to_rgb = _rgb_converter(info)
    pending = deque(wanted) if wanted is not None else None
    container = open_video(info.path)
    index = -1
    with container:
        stream = video_stream(info.path, container)
        try:
            for index, frame in enumerate(container.decode(stream)):
                if pending is not None:
                    if not pending:
                        return
                    if pending[0] != index:
                        continue
                    pending.popleft()
                elif index <= after:
                    continue
                yield index, _frame_time(frame, index, info), to_rgb(frame)
        except av.FFmpegError as e:
            raise UserError(f"{info.path}: decoding failed after frame {index} ({ffmpeg_reason(e)}); the file is "
                            f"damaged or truncated") from None
    if pending:
        raise UserError(f"{info.path}: frames {list(pending)[:5]} could not be decoded (the file ends early or "
                        f"is damaged)")


def _frame_time(frame, index: int, info: VideoInfo) -> float:
    t = frame.time
    if t is None:
        return index / info.fps if info.fps else 0.0
    return float(t)


# Accurate rounding and full chroma interpolation (swscale's default bilinear, inexact path differs from zimg by ~1.4
# levels on average, up to 80 at colour edges): the RGB frames are the ground truth the model learns, and the x264
# degradation converts its frames both ways with the same flags, so training inputs are not a level darker than
# what the source's own frames decode to.
def sws_flags():
    from av.video.reformatter import Interpolation

    return Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT


def frame_to_rgb(frame, matrix, color_range: int | None) -> np.ndarray:
    """A decoded YUV (or RGB) frame -> RGB uint8 (H, W, 3) with ``matrix`` (a PyAV Colorspace) and the frame's
    range (1 limited, 2 full, else the format's default), converted as every frame the project reads is."""
    from av.video.reformatter import ColorRange

    return frame.reformat(format="rgb24", src_colorspace=matrix, interpolation=sws_flags(),
                          src_color_range=ColorRange(color_range) if color_range in (1, 2) else None,
                          dst_color_range=ColorRange.JPEG).to_ndarray()


def _rgb_converter(info: VideoInfo):
    """frame -> upright RGB uint8 (H, W, 3): matrix from the stream's tag (else by resolution), 8 bits, rotation."""
    from av.video.reformatter import Colorspace

    turns = info.rotation // 90
    untagged = {MATRIX_BT709: Colorspace.ITU709, MATRIX_ST170M: Colorspace.ITU601}[
        default_matrix(info.width, info.height)]
    tagged = {1: Colorspace.ITU709, 4: Colorspace.FCC, 5: Colorspace.ITU601, 6: Colorspace.ITU601,
              7: Colorspace.SMPTE240M, 9: Colorspace.BT2020, 10: Colorspace.BT2020}

    def convert(frame) -> np.ndarray:
        rgb = frame_to_rgb(frame, tagged.get(int(frame.colorspace), untagged), int(frame.color_range))
        if turns:
            rgb = np.rot90(rgb, turns)
        return np.ascontiguousarray(rgb)

    return convert


# ----------------------------------------------------------------------------------------------- trainability

def check_trainable(info: VideoInfo, scale: int, patch: int) -> None:
    """Refuse a video whose frames are too small to cut a ``patch``-pixel low-resolution training patch at
    ``scale`` (the LR frame is the frame cropped to a multiple of the scale, divided by the scale)."""
    lr_w, lr_h = info.width // scale, info.height // scale
    if lr_w < patch or lr_h < patch:
        need = patch * scale
        raise UserError(f"{info.path}: the video is {info.width}x{info.height}, too small to train at x{scale} with "
                        f"{patch}-pixel patches (its low-resolution frames would be {lr_w}x{lr_h}; frames of at "
                        f"least {need}x{need} are needed); use a larger video, or a smaller --patch or --scale")
