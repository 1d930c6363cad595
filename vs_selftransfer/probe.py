"""Probe a video file without decoding it: size, rate, frame count, timestamps and keyframes, with one clear
error per bad input (missing path, a directory, an empty file, a truncated or damaged MP4, a file that is not a
video, audio only). Used by both phases: the trainer before it decodes, ``selftransfer upscale`` before it runs.

- Variable frame rate: frames are numbered in presentation order (the order the decoder outputs them, 0-based)
  and each keeps its real timestamp; ``VideoInfo.vfr`` says so and ``fps`` is the average rate.
- Display-matrix rotation (phone videos): ``VideoInfo.width``/``height`` are the displayed (rotated) size and
  ``rotation`` the counter-clockwise angle that makes frames upright. Other angles than multiples of 90 are refused.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from fractions import Fraction
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from vs_selftransfer.errors import UserError
from vs_selftransfer.files import sha256_file


# A stream whose frame durations differ by more than this fraction of the median (and by more than two time-base
# ticks, so millisecond rounding of 29.97 fps in Matroska does not count) is variable frame rate.
VFR_TOLERANCE = 0.02


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


# ----------------------------------------------------------------------------------------------- probing

def probe(path: str | os.PathLike) -> VideoInfo:
    """Describe a video file; raise UserError naming the problem for anything that is not a usable video."""
    return probe_with_table(path)[0]


def frame_table(path: str | os.PathLike) -> FrameTable:
    """The per-frame timestamps and keyframe flags (from the container, no decoding)."""
    return probe_with_table(path)[1]


def probe_with_table(path) -> tuple[VideoInfo, FrameTable]:
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

    container = open_video(path)
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
    container = open_video(path)
    with container:
        stream = video_stream(path, container)
        try:
            first = next(container.decode(stream), None)
        except av.FFmpegError as e:
            raise UserError(f"{path}: cannot decode the video ({ffmpeg_reason(e)}); the file is damaged") from None
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


def open_video(path: str):
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
                f"it (e.g. untrunc) — FFmpeg says: {ffmpeg_reason(error)}")
    if _looks_like_text(head):
        return (f"{path}: is a text file, not a video (renamed or saved with the wrong extension?); "
                f"give the actual video file")
    return (f"{path}: is not a video file FFmpeg can read (unknown or damaged format: {ffmpeg_reason(error)}); "
            f"give a video file such as .mp4/.mkv/.mov")


def _looks_like_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as e:
        return e.start >= len(head) - 4  # a multi-byte character cut at the end of the sample
    return True


def ffmpeg_reason(error) -> str:
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
                        f"({ffmpeg_reason(e)}); copy or download it again") from None
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
