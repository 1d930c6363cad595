"""Video input: ``probe`` a file and ``read_frames`` as upright 8-bit RGB, with one clear error per bad input.

Every input problem a user can fix raises ``trainer.cli.UserError`` naming the file, the problem and the fix
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

YUV -> RGB uses the stream's matrix when it is tagged, else BT.709 for HD (height >= 720 or width >= 1280) and
BT.601 for SD, which is what players assume; chroma is upsampled bicubically with accurate rounding, which matches
VapourSynth's ``core.resize.Bicubic(clip, format=vs.RGB24, matrix_in_s="709")`` (zimg) to 0.04 mean absolute
difference on the shared clip, so training frames look like what the filter will be fed.
"""
from __future__ import annotations

import bisect
import hashlib
import os
import tempfile
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from trainer.cli import UserError

# A stream whose frame durations differ by more than this fraction of the median (and by more than two time-base
# ticks, so millisecond rounding of 29.97 fps in Matroska does not count) is variable frame rate.
VFR_TOLERANCE = 0.02
# Seek to a later keyframe instead of decoding through, when that skips at least this many frames.
SEEK_MIN_SKIP = 48


@dataclass(frozen=True)
class VideoInfo:
    path: str
    width: int  # displayed width (after rotation)
    height: int  # displayed height (after rotation)
    fps: float  # average frame rate
    frames: int  # number of frames (counted from the packets, not trusted from the header)
    duration: float  # seconds
    pix_fmt: str  # decoder output format, e.g. yuv420p, yuv420p10le, gray
    bit_depth: int
    has_audio: bool
    rotation: int  # degrees counter-clockwise applied to make frames upright: 0, 90, 180 or 270
    vfr: bool  # variable frame rate
    _sha256: list = field(default_factory=list, repr=False, compare=False)  # lazily filled cache

    @property
    def sha256(self) -> str:
        """sha256 of the file's bytes (computed on first use: it reads the whole file)."""
        if not self._sha256:
            self._sha256.append(sha256_file(self.path))
        return self._sha256[0]

    def to_dict(self, with_sha256: bool = True) -> dict:
        d = {k: getattr(self, k) for k in ("path", "width", "height", "fps", "frames", "duration", "pix_fmt",
                                           "bit_depth", "has_audio", "rotation", "vfr")}
        if with_sha256:
            d["sha256"] = self.sha256
        return d


@dataclass(frozen=True)
class FrameTable:
    """What the container says about every frame, read without decoding: presentation timestamps (stream
    time base, sorted: index i is the i-th frame the decoder outputs) and which frames are keyframes."""
    pts: tuple[int, ...] | None  # None when the container has no timestamps (raw streams)
    keyframes: tuple[int, ...]  # frame indices of keyframes (sync samples), sorted
    time_base: Fraction
    frames: int

    def index_of_pts(self, pts: int | None) -> int | None:
        if self.pts is None or pts is None:
            return None
        i = bisect.bisect_left(self.pts, pts)
        return i if i < len(self.pts) and self.pts[i] == pts else None

    def keyframe_at_or_before(self, index: int) -> int:
        i = bisect.bisect_right(self.keyframes, index) - 1
        return self.keyframes[i] if i >= 0 else 0


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    # The one file hash (weights, videos, bundles): lives here so that reading videos does not import torch.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- probing

def probe(path: str | os.PathLike) -> VideoInfo:
    """Describe a video file; raise UserError naming the problem for anything that is not a usable video."""
    return _probe(path)[0]


def frame_table(path: str | os.PathLike) -> FrameTable:
    """The per-frame timestamps and keyframe flags (from the container, no decoding)."""
    return _probe(path)[1]


def _probe(path) -> tuple[VideoInfo, FrameTable]:
    p = check_input_path(path)
    st = p.stat()
    # Cached per file version: select_frames, read_frames and probe all need it, and it reads the whole file.
    return _probe_cached(str(p), st.st_size, st.st_mtime_ns)


def check_input_path(path: str | os.PathLike) -> Path:
    """The path of a readable, non-empty regular file, or a UserError saying what it is instead."""
    p = Path(path)
    if not p.exists():
        hint = "" if p.parent.is_dir() else f"; its folder {p.parent} does not exist either"
        raise UserError(f"{p}: no such file (check the path{hint})")
    if p.is_dir():
        raise UserError(f"{p}: is a directory, not a video file; give the path of a video file inside it")
    if not p.is_file():
        raise UserError(f"{p}: is not a regular file (a device or pipe?); give the path of a video file")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: the file is empty (0 bytes); the copy or recording that made it failed — "
                        "copy the video again")
    if not os.access(p, os.R_OK):
        raise UserError(f"{p}: permission denied; make the file readable (chmod +r) or run as its owner")
    return p.resolve()


@lru_cache(maxsize=16)
def _probe_cached(path: str, size: int, mtime_ns: int) -> tuple[VideoInfo, FrameTable]:
    import av

    container = _open(path)
    with container:
        stream = video_stream(path, container)
        has_audio = len(container.streams.audio) > 0
        header_frames = int(stream.frames or 0)
        avg_rate = stream.average_rate or stream.guessed_rate
        table = _read_table(path, container, stream)
    if header_frames and table.frames < header_frames:
        raise UserError(f"{path}: the file is truncated: its header promises {header_frames} frames but only "
                        f"{table.frames} are in the file; copy or download it again completely")
    if table.frames == 0:
        raise UserError(f"{path}: the video stream has no frames")

    # Decode the first frame: proves the stream decodes, and gives the real pixel format and rotation.
    container = _open(path)
    with container:
        stream = video_stream(path, container)
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise UserError(f"{path}: cannot decode the video ({_reason(e)}); the file is damaged") from None
        if first is None:
            raise UserError(f"{path}: no frame of the video can be decoded; the file is damaged or truncated")
        rotation = _rotation(path, first, stream)
        pix_fmt = first.format.name
        bit_depth = max(c.bits for c in first.format.components)
        width, height = (first.height, first.width) if rotation in (90, 270) else (first.width, first.height)

    durations = _frame_durations(table, stream_fps=float(avg_rate) if avg_rate else None)
    vfr = _is_vfr(durations)
    if durations is not None and len(durations):
        duration = float(sum(durations) * table.time_base)
    else:
        duration = table.frames / float(avg_rate) if avg_rate else 0.0
    if vfr or not avg_rate:
        fps = table.frames / duration if duration > 0 else 0.0
    else:
        fps = float(avg_rate)
    info = VideoInfo(path=path, width=width, height=height, fps=fps, frames=table.frames, duration=duration,
                     pix_fmt=pix_fmt, bit_depth=bit_depth, has_audio=has_audio, rotation=rotation, vfr=vfr)
    return info, table


def _open(path: str):
    import av

    try:
        return av.open(path, "r")
    except av.FFmpegError as e:
        raise UserError(_unreadable_message(path, e)) from None


def _unreadable_message(path: str, error) -> str:
    """Why FFmpeg cannot open the file, in words a user can act on."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head[4:8] == b"ftyp" or b"moov" in head or b"mdat" in head:
        return (f"{path}: the MP4/MOV file is truncated or damaged: FFmpeg cannot find its index ('moov' atom, "
                f"written last, so a copy or recording that was cut short lacks it). Copy the file again, or repair "
                f"it (e.g. untrunc) — FFmpeg says: {_reason(error)}")
    if _looks_like_text(head):
        return (f"{path}: is a text file, not a video (renamed or saved with the wrong extension?); "
                f"give the actual video file")
    return (f"{path}: is not a video file FFmpeg can read (unknown or damaged format: {_reason(error)}); "
            f"give a video file such as .mp4/.mkv/.mov")


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4  # a multi-byte character cut at the end of the sample
    return True


def _reason(error) -> str:
    return getattr(error, "strerror", None) or str(error)


def video_stream(path: str, container):
    import av

    # Cover art in audio files is a "video" stream holding one picture: not a video.
    attached = av.stream.Disposition.attached_pic
    streams = [s for s in container.streams.video if not (s.disposition & attached)]
    if not streams:
        what = "only audio" if container.streams.audio else "no audio or video"
        if container.streams.video:
            what += " and a cover picture"
        raise UserError(f"{path}: has no video stream (it contains {what}); give a video file")
    stream = streams[0]
    stream.thread_type = "AUTO"
    return stream


def _read_table(path: str, container, stream) -> FrameTable:
    """Demux (no decoding) the video stream's packets: timestamps and keyframe flags of every frame."""
    import av

    pts: list[int] = []
    keys: list[int] = []  # timestamps of keyframes
    key_positions: list[int] = []  # their positions in decode order
    have_pts = True
    try:
        for packet in container.demux(stream):
            if packet.size == 0:  # the flush packet demux yields at the end
                continue
            ts = packet.pts if packet.pts is not None else packet.dts
            if ts is None:
                have_pts = False
                ts = len(pts)
            pts.append(ts)
            if packet.is_keyframe:
                keys.append(ts)
                key_positions.append(len(pts) - 1)
    except av.FFmpegError as e:
        raise UserError(f"{path}: the file is damaged or truncated after {len(pts)} frames "
                        f"({_reason(e)}); copy or download it again") from None
    time_base = stream.time_base or Fraction(1, 1)
    order = sorted(set(pts))
    if not have_pts or len(order) != len(pts):
        # Missing or repeated timestamps: frames cannot be told apart by time. They are numbered by counting
        # decoded frames instead, and keyframes by their decode position (exact without frame reordering).
        return FrameTable(None, tuple(key_positions), time_base, len(pts))
    key_index = sorted(bisect.bisect_left(order, t) for t in keys)
    return FrameTable(tuple(order), tuple(key_index), time_base, len(pts))


def _frame_durations(table: FrameTable, stream_fps: float | None) -> list[int] | None:
    """Duration of each frame in time-base ticks (the last one repeats the median), or None without timestamps."""
    if table.pts is None or table.frames < 2:
        if table.pts is not None and stream_fps:
            return [round(1 / (stream_fps * table.time_base))]
        return None
    d = np.diff(np.asarray(table.pts, np.int64))
    return [*d.tolist(), int(np.median(d))]


def _is_vfr(durations: list[int] | None) -> bool:
    if not durations or len(durations) < 3:
        return False
    d = np.asarray(durations[:-1], np.float64)
    med = float(np.median(d))
    spread = float(d.max() - d.min())
    return spread > max(VFR_TOLERANCE * med, 2.0)


def _rotation(path: str, frame, stream) -> int:
    """Counter-clockwise degrees to rotate decoded frames so they display upright (what ffmpeg's autorotate does)."""
    angle = getattr(frame, "rotation", 0) or 0
    if not angle:
        # Older muxers/demuxers expose a clockwise 'rotate' tag instead of a display matrix.
        tag = stream.metadata.get("rotate")
        if tag:
            try:
                angle = -float(tag)
            except ValueError:
                angle = 0
    snapped = round(angle / 90.0) * 90
    if abs(angle - snapped) > 0.5:
        raise UserError(f"{path}: the video is rotated by {angle:g} degrees, not a multiple of 90; re-encode it "
                        f"upright first (e.g. ffmpeg -i IN -c:a copy OUT.mp4 applies the rotation)")
    return int(snapped) % 360


# ----------------------------------------------------------------------------------------------- decoding

def read_frames(path: str | os.PathLike, indices: Iterable[int] | None = None
                ) -> Iterator[tuple[int, float, np.ndarray]]:
    """Yield ``(index, pts_seconds, rgb)`` for every frame (``indices`` None) or the given frame indices, in
    increasing index order. ``rgb`` is upright uint8 (H, W, 3). Frames are decoded sequentially; when the next
    wanted frame lies beyond a later keyframe, the reader seeks to that keyframe instead of decoding through
    (frames are identified by their timestamps, so the numbering stays exact)."""
    info, table = _probe(path)
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
    container = _open(info.path)
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
            raise UserError(f"{info.path}: decoding failed after frame {last} ({_reason(e)}); the file is "
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
    container = _open(info.path)
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
            raise UserError(f"{info.path}: decoding failed after frame {index} ({_reason(e)}); the file is "
                            f"damaged or truncated") from None
    if pending:
        raise UserError(f"{info.path}: frames {list(pending)[:5]} could not be decoded (the file ends early or "
                        f"is damaged)")


def _frame_time(frame, index: int, info: VideoInfo) -> float:
    t = frame.time
    if t is None:
        return index / info.fps if info.fps else 0.0
    return float(t)


def _rgb_converter(info: VideoInfo):
    """frame -> upright RGB uint8 (H, W, 3): matrix from the stream's tag (else by resolution), 8 bits, rotation."""
    from av.video.reformatter import ColorRange, Colorspace, Interpolation

    turns = info.rotation // 90
    coded_h = info.width if turns % 2 else info.height
    coded_w = info.height if turns % 2 else info.width
    default_matrix = Colorspace.ITU709 if coded_h >= 720 or coded_w >= 1280 else Colorspace.ITU601
    # Accurate rounding and full chroma interpolation (swscale's default bilinear, inexact path differs from zimg
    # by ~1.4 levels on average, up to 80 at colour edges): the RGB frames are the ground truth the model learns.
    flags = Interpolation.BICUBIC | Interpolation.ACCURATE_RND | Interpolation.FULL_CHR_H_INT
    tagged = {1: Colorspace.ITU709, 4: Colorspace.FCC, 5: Colorspace.ITU601, 6: Colorspace.ITU601,
              7: Colorspace.SMPTE240M, 9: Colorspace.BT2020, 10: Colorspace.BT2020}

    def convert(frame) -> np.ndarray:
        matrix = tagged.get(int(frame.colorspace), default_matrix)
        rng = int(frame.color_range)
        rgb = frame.reformat(format="rgb24", src_colorspace=matrix, interpolation=flags,
                             src_color_range=ColorRange(rng) if rng in (1, 2) else None,
                             dst_color_range=ColorRange.JPEG).to_ndarray()
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


# ----------------------------------------------------------------------------------------------- outputs

def check_output_path(path: str | os.PathLike, force: bool = False) -> Path:
    """Validate an output file path before any work is done: refuse an existing file without ``force``, a
    directory, a missing or non-writable parent directory. Returns the path."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{p}: is a directory; give an output file path (e.g. {p / 'out'}{p.suffix})")
    if p.exists() and not force:
        raise UserError(f"{p}: already exists; pass --force to overwrite it, or choose another output path")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.exists():
        raise UserError(f"{p}: the output folder {parent} does not exist; create it first")
    if not parent.is_dir():
        raise UserError(f"{p}: {parent} is not a folder")
    # Try it: permission bits do not tell the whole story (root, read-only mounts, ACLs).
    try:
        fd, probe_file = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
    except OSError as e:
        raise UserError(f"{p}: cannot write in the output folder {parent} ({e.strerror or e}); "
                        f"choose a writable location") from None
    os.close(fd)
    os.unlink(probe_file)
    return p
