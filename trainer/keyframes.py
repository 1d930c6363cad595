"""Pick the frames a video teaches itself with, and the held-out frames that judge the result.

Training frames, in order of preference:

1. ``key``: I-frames (the encoder's best-quality pictures), read without decoding the frames in between (the
   decoder skips non-key frames), so a long video costs one demux pass plus its keyframes. When there are more
   keyframes than wanted, the ones spread most evenly in time are kept.
2. ``scene``: when there are too few keyframes (the shared clip has one), the first frame of each shot. This needs
   one decoding pass, at 64x36 gray: a cut is a frame whose thumbnail differs from the previous one by a lot
   (mean absolute difference >= ``SCENE_MIN_SCORE``) and by much more than its neighbours do (motion is not a cut).
3. ``even``: then frames as evenly spread in time as possible (each next one is the frame farthest from every frame
   already chosen; ties broken by the seeded RNG) up to the target.

Near-duplicates (thumbnails closer than ``NEAR_DUPLICATE_MAD``; e.g. the repeated frames of a 24 -> 25 fps
conversion, or a static shot) are dropped: they teach nothing new.

Validation frames are placed before the ``even`` fill: one near the middle of each of ``val`` equal stretches of the
video, never a training frame nor a training frame's immediate neighbour (index +-1), so the validation score is
measured on pictures the model has not seen.

CLI: ``selftransfer frames VIDEO -o frames.json [--png-dir DIR]``.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from vs_selftransfer.errors import UserError
from vs_selftransfer.probe import VideoInfo, frame_table, probe
from vs_selftransfer.files import check_output_path
from selftransfer_trainer.video import check_trainable, read_frames, video_stream

KINDS = ("key", "scene", "even")
THUMB_SIZE = (64, 36)  # width, height of the gray thumbnails used to compare frames
NEAR_DUPLICATE_MAD = 1.0  # mean |difference| (0..255) of two thumbnails below which the frames are the same picture
SCENE_MIN_SCORE = 12.0  # a cut changes the thumbnail by at least this mean |difference| (0..255)...
SCENE_CONTRAST = 3.0  # ...and by this many times more than the frames around it change
SCENE_WINDOW = 8  # frames on each side that define "the frames around it"
MAX_THUMBNAILS = 20_000  # candidate frames kept for the even fill on very long videos (64x36 bytes each)
JSON_FORMAT = "selftransfer-frames"
JSON_VERSION = 1


@dataclass
class Frame:
    index: int  # 0-based, in presentation order
    time: float  # presentation timestamp, seconds
    kind: str  # "key" | "scene" | "even"
    image: np.ndarray | None = field(default=None, repr=False, compare=False)  # RGB uint8 (H, W, 3), upright

    def to_dict(self) -> dict:
        return {"index": self.index, "time": round(self.time, 6), "kind": self.kind}


@dataclass
class FrameSelection:
    info: VideoInfo
    train: list[Frame]
    val: list[Frame]
    keyframes: list[int]  # every keyframe (I-frame) index in the video
    scene_cuts: list[int]  # every detected cut (empty when the scene pass was not needed)
    params: dict

    def to_json(self) -> dict:
        """Everything but the images, as a JSON-ready dict."""
        return {"format": JSON_FORMAT, "version": JSON_VERSION, "video": self.info.to_dict(),
                "params": dict(self.params), "keyframes": list(self.keyframes), "scene_cuts": list(self.scene_cuts),
                "train": [f.to_dict() for f in self.train], "val": [f.to_dict() for f in self.val]}


# ----------------------------------------------------------------------------------------------- selection

def select_frames(path: str | os.PathLike, target: int = 24, val: int = 4, seed: int = 0) -> FrameSelection:
    """Choose up to ``target`` training frames and exactly ``val`` held-out validation frames (see module doc),
    and decode them. Deterministic for a given ``seed``."""
    for name, value, low in (("target", target, 1), ("val", val, 0), ("seed", seed, 0)):
        if type(value) is not int or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    info = probe(path)
    table = frame_table(path)
    n = info.frames
    rng = np.random.default_rng(seed)

    key_thumbs = _keyframe_thumbnails(info, table)
    keys = _drop_near_duplicates(sorted(key_thumbs), key_thumbs)
    thumbs = dict(key_thumbs)
    cuts: list[int] = []
    scores = None
    if len(keys) < target and len(keys) < n:
        scores, frame_thumbs = _scan(info)
        thumbs.update(frame_thumbs)
        cuts = _scene_cuts(scores)

    # Validation frames first, away from every keyframe and cut where possible (those are the best training
    # frames); in an all-intra video (every frame a keyframe) they simply take the frames nearest their spots.
    val_indices = _place_validation(n, val, set(keys) | set(cuts), path)
    blocked = {j for v in val_indices for j in (v - 1, v, v + 1)}
    if len(blocked & set(range(n))) >= n:
        raise UserError(f"{info.path}: the video has only {n} frames: too few to keep training frames apart from "
                        f"{val} validation frames; use a longer video or fewer validation frames (--val)")

    chosen: dict[int, str] = {}
    for i in _spread([k for k in keys if k not in blocked], [], target, rng):
        chosen[i] = "key"
    if scores is not None:
        for i in sorted(cuts, key=lambda c: (-scores[c], c)):
            if len(chosen) >= target:
                break
            if i not in chosen and i not in blocked and i in thumbs and not _is_duplicate(
                    thumbs[i], [thumbs[j] for j in chosen if j in thumbs]):
                chosen[i] = "scene"
    if len(chosen) < target:
        candidates = [i for i in sorted(thumbs) if i not in blocked and i not in chosen]
        for i in _spread(candidates, sorted(chosen), target - len(chosen), rng, thumbs):
            chosen[i] = "even"
    if not chosen:
        raise UserError(f"{info.path}: no training frame could be chosen among its {n} frames")

    images = {i: (t, img) for i, t, img in read_frames(info.path, sorted(set(chosen) | set(val_indices)))}
    train = [Frame(i, images[i][0], chosen[i], images[i][1]) for i in sorted(chosen)]
    key_set = set(table.keyframes)
    val_frames = [Frame(i, images[i][0], "key" if i in key_set else "even", images[i][1]) for i in val_indices]
    return FrameSelection(info=info, train=train, val=val_frames, keyframes=list(table.keyframes),
                          scene_cuts=cuts, params={"target": target, "val": val, "seed": seed})


def _thumbnail(frame) -> np.ndarray:
    w, h = THUMB_SIZE
    return frame.reformat(width=w, height=h, format="gray", interpolation="AREA").to_ndarray().astype(np.uint8)


def _keyframe_thumbnails(info: VideoInfo, table) -> dict[int, np.ndarray]:
    """Thumbnails of the keyframes, decoding nothing else (the decoder is told to skip non-key frames)."""
    import av

    out: dict[int, np.ndarray] = {}
    with av.open(info.path) as container:
        stream = video_stream(info.path, container)
        stream.codec_context.skip_frame = "NONKEY"
        position = 0
        try:
            for frame in container.decode(stream):
                index = table.index_of_pts(frame.pts)
                if index is None:  # no usable timestamps: keyframes come out in order
                    if position >= len(table.keyframes):
                        break
                    index = table.keyframes[position]
                position += 1
                out[index] = _thumbnail(frame)
        except av.FFmpegError as e:
            raise UserError(f"{info.path}: decoding a keyframe failed ({e}); the file is damaged") from None
    return out


def _scan(info: VideoInfo) -> tuple[np.ndarray, dict[int, np.ndarray]]:
    """One decoding pass over every frame: per-frame change score (mean |difference| from the previous thumbnail;
    0 for frame 0) and thumbnails of the candidate frames (all of them, or every k-th plus possible cuts on very
    long videos so memory stays bounded)."""
    import av

    stride = max(1, -(-info.frames // MAX_THUMBNAILS))
    scores = np.zeros(info.frames, np.float32)
    thumbs: dict[int, np.ndarray] = {}
    previous = None
    index = -1
    with av.open(info.path) as container:
        stream = video_stream(info.path, container)
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index >= info.frames:
                    break
                thumb = _thumbnail(frame)
                if previous is not None:
                    scores[index] = _mad(thumb, previous)
                if index % stride == 0 or scores[index] >= SCENE_MIN_SCORE:
                    thumbs[index] = thumb
                previous = thumb
        except av.FFmpegError as e:
            raise UserError(f"{info.path}: decoding failed after frame {index} ({e}); the file is damaged or "
                            f"truncated") from None
    return scores, thumbs


def _scene_cuts(scores: np.ndarray) -> list[int]:
    """Frames that start a new shot: a score spike well above the scores around it (non-maximum suppressed)."""
    peaks = []
    for i in np.flatnonzero(scores >= SCENE_MIN_SCORE):
        lo, hi = max(1, i - SCENE_WINDOW), min(len(scores), i + SCENE_WINDOW + 1)
        around = np.concatenate([scores[lo:i], scores[i + 1:hi]])
        background = float(np.median(around)) if around.size else 0.0
        if scores[i] >= SCENE_CONTRAST * max(background, 1.0):
            peaks.append(int(i))
    kept: list[int] = []
    for i in sorted(peaks, key=lambda p: (-scores[p], p)):
        if all(abs(i - k) > 2 for k in kept):  # one cut per transition (a 2-frame cut scores twice)
            kept.append(i)
    return sorted(kept)


def _place_validation(n: int, count: int, avoid: set[int], path) -> list[int]:
    """``count`` distinct frames spread over the video: in each of ``count`` equal stretches, the frame nearest its
    middle that is not in ``avoid`` nor next to one (keyframes and cuts, kept for training), else the frame nearest
    the middle."""
    if count == 0:
        return []
    if n < count + 1:
        raise UserError(f"{path}: the video has only {n} frames: too few to hold out {count} validation frames "
                        f"and still train; use a longer video or fewer validation frames (--val)")
    near = {j for i in avoid for j in (i - 1, i, i + 1)}
    chosen: list[int] = []
    for k in range(count):
        lo, hi = k * n // count, (k + 1) * n // count
        centre = (lo + hi - 1) / 2.0
        stretch = [i for i in range(lo, hi) if i not in chosen]
        pool = [i for i in stretch if i not in near] or stretch or [i for i in range(n) if i not in chosen]
        chosen.append(min(pool, key=lambda i: (abs(i - centre), i)))
    return sorted(chosen)


def _spread(candidates: list[int], chosen: list[int], count: int, rng: np.random.Generator,
            thumbs: dict[int, np.ndarray] | None = None) -> list[int]:
    """Greedy farthest-point sampling in time: repeatedly take the candidate farthest from every chosen frame
    (ties: the seeded RNG), skipping near-duplicates of chosen frames when ``thumbs`` is given."""
    if count <= 0 or not candidates:
        return []
    cand = np.asarray(candidates, np.int64)
    alive = np.ones(cand.size, bool)
    dist = np.full(cand.size, np.iinfo(np.int64).max, np.int64)
    for c in chosen:
        dist = np.minimum(dist, np.abs(cand - c))
    picked: list[int] = []
    picked_thumbs = [thumbs[c] for c in chosen if c in thumbs] if thumbs is not None else []
    while len(picked) < count and alive.any():
        if not chosen and not picked:
            j = 0  # nothing chosen yet: start with the first candidate
        else:
            best = dist[alive].max()
            ties = np.flatnonzero(alive & (dist == best))
            j = int(ties[rng.integers(ties.size)]) if ties.size > 1 else int(ties[0])
        alive[j] = False
        i = int(cand[j])
        if thumbs is not None and _is_duplicate(thumbs[i], picked_thumbs):
            continue
        picked.append(i)
        if thumbs is not None:
            picked_thumbs.append(thumbs[i])
        dist = np.minimum(dist, np.abs(cand - i))
    return sorted(picked)


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16))))


def _is_duplicate(thumb: np.ndarray, others: list[np.ndarray]) -> bool:
    return any(_mad(thumb, o) < NEAR_DUPLICATE_MAD for o in others)


def _drop_near_duplicates(indices: list[int], thumbs: dict[int, np.ndarray]) -> list[int]:
    kept: list[int] = []
    for i in indices:
        if not _is_duplicate(thumbs[i], [thumbs[k] for k in kept]):
            kept.append(i)
    return kept


# ----------------------------------------------------------------------------------------------- reading back

def load_selection(json_path: str | os.PathLike, video: str | os.PathLike | None = None) -> FrameSelection:
    """Read a ``frames.json`` written by ``selftransfer frames`` and decode its frames from ``video`` (default:
    the path recorded in it). Refuses a file that does not describe this video."""
    p = Path(json_path)
    if not p.is_file():
        raise UserError(f"{p}: no such frames file")
    try:
        data = json.loads(p.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{p}: not a frames file (invalid JSON: {e})") from None
    if not isinstance(data, dict) or data.get("format") != JSON_FORMAT:
        raise UserError(f"{p}: not a frames file written by 'selftransfer frames'")
    if data.get("version") != JSON_VERSION:
        raise UserError(f"{p}: frames file version {data.get('version')!r} is not supported (expected "
                        f"{JSON_VERSION}); run 'selftransfer frames' again")
    recorded = data.get("video") or {}
    info = probe(video if video is not None else recorded.get("path", ""))
    if recorded.get("frames") != info.frames or recorded.get("sha256") not in (None, info.sha256):
        raise UserError(f"{p}: was made for another video ({recorded.get('path')}, {recorded.get('frames')} "
                        f"frames) than {info.path}; run 'selftransfer frames' on this video")
    try:
        train = [(int(f["index"]), str(f["kind"])) for f in data["train"]]
        val = [(int(f["index"]), str(f["kind"])) for f in data["val"]]
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{p}: damaged frames file ({e!r})") from None
    if not train or any(k not in KINDS for _, k in train + val):
        raise UserError(f"{p}: damaged frames file (no training frames, or an unknown frame kind)")
    wanted = sorted({i for i, _ in train + val})
    if wanted[0] < 0 or wanted[-1] >= info.frames:
        raise UserError(f"{p}: frame indices outside 0..{info.frames - 1}; damaged frames file")
    if set(i for i, _ in train) & {j for i, _ in val for j in (i - 1, i, i + 1)}:
        raise UserError(f"{p}: a validation frame is a training frame or its neighbour; damaged frames file")
    images = {i: (t, img) for i, t, img in read_frames(info.path, wanted)}
    return FrameSelection(info=info, train=[Frame(i, images[i][0], k, images[i][1]) for i, k in train],
                          val=[Frame(i, images[i][0], k, images[i][1]) for i, k in val],
                          keyframes=list(data.get("keyframes", [])), scene_cuts=list(data.get("scene_cuts", [])),
                          params=dict(data.get("params", {})))


# ----------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="input video file")
    parser.add_argument("-o", "--output", required=True, help="frames file to write (JSON)")
    parser.add_argument("--target", type=int, default=24, help="training frames wanted (default 24)")
    parser.add_argument("--val", type=int, default=4, help="held-out validation frames (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed for tie-breaking (default 0)")
    parser.add_argument("--scale", type=int, default=2, choices=(2, 3, 4),
                        help="scale the frames will train (checks the video is large enough; default 2)")
    parser.add_argument("--patch", type=int, default=48, help="LR training patch size to check against (default 48)")
    parser.add_argument("--png-dir", help="also write the chosen frames as PNGs into this folder")
    parser.add_argument("--force", action="store_true", help="overwrite existing output files")


def run(args: argparse.Namespace) -> int:
    if args.target < 1:
        raise UserError(f"--target must be at least 1, got {args.target}")
    if args.val < 0:
        raise UserError(f"--val must be 0 or more, got {args.val}")
    if args.seed < 0:
        raise UserError(f"--seed must be 0 or more, got {args.seed}")
    if args.patch < 1:
        raise UserError(f"--patch must be at least 1, got {args.patch}")
    output = check_output_path(args.output, args.force, inputs=[args.video])
    png_dir = Path(args.png_dir) if args.png_dir else None
    if png_dir is not None and png_dir.exists() and not png_dir.is_dir():
        raise UserError(f"--png-dir {png_dir}: exists and is not a folder")
    info = probe(args.video)
    check_trainable(info, args.scale, args.patch)
    selection = select_frames(args.video, target=args.target, val=args.val, seed=args.seed)
    if png_dir is not None:
        write_pngs(selection, png_dir, args.force)
    from vs_selftransfer.files import atomic_write

    atomic_write(output, (json.dumps(selection.to_json(), indent=1) + "\n").encode())
    print(summary(selection))
    print(f"wrote {output}" + (f" and {len(selection.train) + len(selection.val)} PNGs in {png_dir}"
                               if png_dir is not None else ""))
    return 0


def summary(selection: FrameSelection) -> str:
    info = selection.info
    kinds = {k: sum(f.kind == k for f in selection.train) for k in KINDS}
    return (f"{Path(info.path).name}: {info.width}x{info.height}, {info.frames} frames, {info.fps:.3f} fps"
            f"{' (variable)' if info.vfr else ''}; {len(selection.keyframes)} keyframes, "
            f"{len(selection.scene_cuts)} scene cuts; training frames: {len(selection.train)} "
            f"({kinds['key']} key, {kinds['scene']} scene, {kinds['even']} even); "
            f"validation frames: {[f.index for f in selection.val]}")


def write_pngs(selection: FrameSelection, folder: Path, force: bool = False) -> list[Path]:
    """Write each chosen frame as ``train_<index>.png`` / ``val_<index>.png`` (atomically)."""
    import cv2

    from vs_selftransfer.files import atomic_write

    folder.mkdir(parents=True, exist_ok=True)
    jobs = [(folder / f"{split}_{f.index:06d}.png", f) for split, frames in
            (("train", selection.train), ("val", selection.val)) for f in frames]
    existing = [p for p, _ in jobs if p.exists()]
    if existing and not force:
        raise UserError(f"{existing[0]}: already exists; pass --force to overwrite, or choose another --png-dir")
    written = []
    for p, f in jobs:
        ok, data = cv2.imencode(".png", np.ascontiguousarray(f.image[..., ::-1]))
        if not ok:
            raise RuntimeError(f"PNG encoding failed for frame {f.index}")
        atomic_write(p, data.tobytes())
        written.append(p)
    return written
