"""Bad and unusual input files made from the shared clip with ffmpeg, for the input-handling tests (issue 6).

``make_inputs(clip, folder)`` writes them all into ``folder`` (a few seconds: short clips, small sizes, fast
presets) and returns {name: path}. Names:

refused:  missing, directory, empty, truncated (moov at the end, cut in half), truncated_faststart (moov first,
          cut in half), text (a text file named .mp4), audio_only, tiny (64x36: too small for 48-pixel patches at
          x2), few_frames (3 frames: no room for held-out frames)
accepted: odd (321x181), tenbit (yuv420p10le, lossless) with eight (its 8-bit twin), gray (gray pix_fmt, FFV1),
          vfr (frame durations 40/80/120 ms), rotated (display matrix: 90 degrees), multi_key (keyframes every 50
          frames), scene_cut (a hard cut at frame 30 that is not a keyframe)
"""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SMALL = "scale=320:180"
X264_FAST = ["-c:v", "libx264", "-preset", "ultrafast"]


def _ffmpeg(*args: str) -> None:
    cmd = ["ffmpeg", "-hide_banner", "-loglevel", "error", "-nostdin", "-y", *args]
    subprocess.run(cmd, check=True, timeout=120)


def _cut_in_half(src: Path, dst: Path) -> None:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])


def make_inputs(clip: str | Path, folder: str | Path) -> dict[str, Path]:
    if shutil.which("ffmpeg") is None:
        raise RuntimeError("ffmpeg is needed to make the test inputs (apt-get install ffmpeg)")
    clip, folder = str(clip), Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    p: dict[str, Path] = {}

    p["missing"] = folder / "missing.mp4"
    p["directory"] = folder / "a_folder.mp4"
    p["directory"].mkdir(exist_ok=True)
    p["empty"] = folder / "empty.mp4"
    p["empty"].write_bytes(b"")
    p["text"] = folder / "notes.mp4"
    p["text"].write_text("These are my notes, not a video.\n" * 20)

    # One second of the real clip, stream-copied (no re-encode): moov at the end (ffmpeg's default), then at the
    # start (+faststart); each cut in half.
    whole, fast = folder / "one_second.mp4", folder / "one_second_faststart.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-c", "copy", str(whole))
    _ffmpeg("-i", clip, "-t", "1", "-an", "-c", "copy", "-movflags", "+faststart", str(fast))
    p["truncated"] = folder / "truncated.mp4"
    _cut_in_half(whole, p["truncated"])
    p["truncated_faststart"] = folder / "truncated_faststart.mp4"
    _cut_in_half(fast, p["truncated_faststart"])

    p["audio_only"] = folder / "audio_only.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-vn", "-c:a", "copy", str(p["audio_only"]))
    p["tiny"] = folder / "tiny.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-vf", "scale=64:36", *X264_FAST, str(p["tiny"]))
    p["few_frames"] = folder / "few_frames.mp4"
    _ffmpeg("-i", clip, "-frames:v", "3", "-an", "-vf", SMALL, *X264_FAST, str(p["few_frames"]))

    p["odd"] = folder / "odd.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-vf", "format=yuv444p,crop=321:181", *X264_FAST, str(p["odd"]))
    # Lossless twins: the 10-bit file holds exactly the 8-bit file's samples shifted left by two bits.
    p["eight"] = folder / "eight.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-vf", SMALL, *X264_FAST, "-qp", "0", str(p["eight"]))
    p["tenbit"] = folder / "tenbit.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-vf", f"{SMALL},format=yuv420p10le", *X264_FAST, "-qp", "0",
            str(p["tenbit"]))
    p["gray"] = folder / "gray.mkv"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-vf", f"{SMALL},format=gray", "-c:v", "ffv1", str(p["gray"]))
    p["vfr"] = folder / "vfr.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-vf", f"{SMALL},setpts='if(lt(N,12),N*0.04,0.48+(N-12)*0.1)/TB'",
            "-fps_mode", "vfr", *X264_FAST, str(p["vfr"]))
    p["rotated"] = folder / "rotated.mp4"
    _ffmpeg("-i", clip, "-t", "1", "-an", "-c", "copy", "-metadata:s:v", "rotate=90", str(p["rotated"]))
    p["multi_key"] = folder / "multi_key.mp4"
    _ffmpeg("-i", clip, "-an", "-vf", SMALL, *X264_FAST, "-g", "50", "-keyint_min", "50", "-sc_threshold", "0",
            str(p["multi_key"]))
    p["scene_cut"] = folder / "scene_cut.mp4"
    _ffmpeg("-i", clip, "-an", "-filter_complex",
            f"[0:v]{SMALL},split[x][y];[x]trim=end_frame=30,setpts=PTS-STARTPTS[a];"
            f"[y]trim=start_frame=60:end_frame=100,setpts=PTS-STARTPTS,vflip,hflip[b];[a][b]concat=n=2:v=1[out]",
            "-map", "[out]", *X264_FAST, "-x264-params", "scenecut=0:keyint=1000", str(p["scene_cut"]))
    return p


_MADE: dict[str, dict[str, Path]] = {}


def session_inputs(tmp_path_factory, clip: str | Path) -> dict[str, Path]:
    """make_inputs once per test session, however many test modules ask (module fixtures call this)."""
    key = str(tmp_path_factory.getbasetemp())
    if key not in _MADE:
        _MADE[key] = make_inputs(clip, tmp_path_factory.mktemp("badinputs"))
    return _MADE[key]
