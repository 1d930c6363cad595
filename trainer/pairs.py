"""HR/LR training pairs in one HDF5 file (like the seed's ``div2h5``), and the random patch sampler that feeds training.

File layout::

    /HR/train/<index>   uint8 (H, W, 3) RGB frame, cropped to a multiple of the scale (or, with a teacher, the
                        teacher's output on the frame's clean downscale: attribute ``target``)
    /LR/train/<index>   uint8 (H/scale, W/scale, 3) its degraded low-resolution version
    /HR/val/<index>, /LR/val/<index>   the same for the held-out validation frames
    attributes (root): format, version, scale, degradation (JSON), source_name, source_sha256, source_frames,
        source_width, source_height, source_fps, train_indices, val_indices, train_times, val_times,
        train_kinds, val_kinds (JSON), selection (JSON: the frame-selection parameters), target (JSON: what the HR
        side is, {"kind": "frames"} or {"kind": "teacher", ...})

``<index>`` is the frame's index in the video. The file is written to a temporary name, fsynced and renamed
(``vs_selftransfer.files.atomic_path``), so a pairs file that exists is complete.

CLI: ``selftransfer pairs VIDEO -o pairs.h5 [--scale 2] [--degradation bicubic] [--frames frames.json]``.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np

from vs_selftransfer.errors import UserError
from vs_selftransfer.files import atomic_path
from selftransfer_trainer.degrade import CRF_RANGE, DEGRADATIONS, crop_to_scale, degrade, imresize

FORMAT = "selftransfer-pairs"
VERSION = 1
SCALES = (2, 3, 4)
CODINGS = ("frame", "video")
# Frames encoded around each frame for coding "video": x264's lookahead at preset medium is 40 frames, and with half
# the window before it a frame is coded as P or B, as most of a video's frames are (an I-frame at a scene cut, as in
# the source).
VIDEO_WINDOW = 32


def video_coded_lr(path: str | os.PathLike, indices: list[int], scale: int, crf: int,
                   window: int = VIDEO_WINDOW) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{index: (clean LR, coded LR)} for frames of the video at ``path``: the ``window`` frames around each (cropped
    to the scale, MATLAB-bicubic downscaled) encoded as one x264 video at ``crf`` and decoded; clean LR is that
    frame before the encode. The degradation ``{"method": "x264", "coding": "video"}``.

    One decoding pass: windows of neighbouring frames overlap, so each frame is decoded and downscaled once and
    kept only while a later window still needs it."""
    from selftransfer_trainer.degrade import x264_video_roundtrip
    from selftransfer_trainer.video import read_frames
    from vs_selftransfer.probe import probe

    n = probe(path).frames
    windows = {}
    for i in sorted(set(indices)):
        start = max(0, min(i - window // 2, n - window))
        windows[i] = range(start, min(n, start + window))  # starts never decrease with i
    decoded = read_frames(path, sorted({j for w in windows.values() for j in w}))
    clean: dict[int, np.ndarray] = {}
    out = {}
    for i, w in windows.items():
        for j in [j for j in clean if j < w.start]:
            del clean[j]
        while w[-1] not in clean:
            j, _, rgb = next(decoded)
            clean[j] = imresize(crop_to_scale(rgb, scale), 1.0 / scale)
        run = [clean[j] for j in w]
        out[i] = (run[i - w.start], x264_video_roundtrip(run, crf)[i - w.start])
    return out


def write_pairs(h5_path: str | os.PathLike, selection, scale: int, degradation: str = "bicubic",
                crf: int = 23, coding: str = "frame", teacher=None) -> Path:
    """Degrade every selected frame (``trainer.keyframes.FrameSelection``) and store HR/LR pairs atomically.

    ``coding="video"`` (x264 only): each LR frame is coded as part of a video of its neighbours
    (``video_coded_lr``) rather than alone. ``teacher``: a callable mapping a clean LR frame (uint8 HWC) to an HR
    target of ``scale`` times its size; when given, the HR of each pair is the teacher's output on the frame's
    clean downscale instead of the frame itself (attribute ``target``)."""
    import h5py

    if type(scale) is not int or scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    if degradation not in DEGRADATIONS:
        raise ValueError(f"degradation must be one of {DEGRADATIONS}, got {degradation!r}")
    if type(crf) is not int or not CRF_RANGE[0] <= crf <= CRF_RANGE[1]:
        raise ValueError(f"crf must be an integer in {CRF_RANGE[0]}..{CRF_RANGE[1]}, got {crf!r}")
    if coding not in CODINGS or (coding == "video" and degradation != "x264"):
        raise ValueError(f"coding must be one of {CODINGS} ('video' only with x264), got {coding!r}")
    if not selection.train:
        raise ValueError("the selection has no training frames")
    for f in selection.train + selection.val:
        if f.image is None:
            raise ValueError(f"frame {f.index} has no image (decode the selection first)")
    info = selection.info
    lr_h, lr_w = info.height // scale, info.width // scale
    if lr_h < 1 or lr_w < 1:
        raise UserError(f"{info.path}: frames of {info.width}x{info.height} are smaller than the scale x{scale}")
    described = {"method": degradation, "scale": scale}
    if degradation == "x264":
        described["crf"] = crf
    coded = {}
    if coding == "video":
        described.update(coding="video", window=VIDEO_WINDOW)
        coded = video_coded_lr(info.path, [f.index for f in selection.train + selection.val], scale, crf)
    path = Path(h5_path)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as h5:
        for split, frames in (("train", selection.train), ("val", selection.val)):
            hr_group = h5.require_group(f"HR/{split}")
            lr_group = h5.require_group(f"LR/{split}")
            for f in frames:
                hr = crop_to_scale(f.image, scale)
                if coding == "video":
                    clean, lr = coded[f.index]
                else:
                    lr = degrade(hr, scale, degradation, crf)
                    clean = imresize(hr, 1.0 / scale) if teacher is not None else None
                if teacher is not None:
                    hr = teacher(clean)
                    if hr.shape != (lr.shape[0] * scale, lr.shape[1] * scale, 3) or hr.dtype != np.uint8:
                        raise ValueError(f"the teacher returned {hr.dtype} {hr.shape} for a {lr.shape} LR frame")
                hr_group.create_dataset(str(f.index), data=hr)
                lr_group.create_dataset(str(f.index), data=lr)
        a = h5.attrs
        a["format"], a["version"], a["scale"] = FORMAT, VERSION, scale
        a["degradation"] = json.dumps(described)
        a["target"] = json.dumps({"kind": "frames"} if teacher is None else
                                 {"kind": "teacher", **getattr(teacher, "description", {})})
        a["source_name"] = Path(info.path).name
        a["source_sha256"] = info.sha256
        a["source_frames"], a["source_fps"] = info.frames, info.fps
        a["source_width"], a["source_height"] = info.width, info.height
        for split, frames in (("train", selection.train), ("val", selection.val)):
            a[f"{split}_indices"] = np.asarray([f.index for f in frames], np.int64)
            a[f"{split}_times"] = np.asarray([f.time for f in frames], np.float64)
            a[f"{split}_kinds"] = json.dumps([f.kind for f in frames])
        a["selection"] = json.dumps(dict(selection.params))
    return path


class Pairs:
    """Read a pairs file. ``train_pair(i)`` / ``val_pair(i)`` take a position (0 .. len(train_indices) - 1), not a
    frame index, and return ``(lr, hr)`` RGB uint8 (H, W, 3) arrays. Use as a context manager or call ``close``."""

    def __init__(self, h5_path: str | os.PathLike):
        import h5py

        self.path = Path(h5_path)
        if not self.path.is_file():
            raise UserError(f"{self.path}: no such pairs file")
        if not h5py.is_hdf5(self.path):
            raise UserError(f"{self.path}: not a pairs file (not HDF5); make one with 'selftransfer pairs'")
        self._h5 = h5py.File(self.path, "r")
        a = self._h5.attrs
        if a.get("format") != FORMAT:
            self.close()
            raise UserError(f"{self.path}: not a pairs file written by 'selftransfer pairs'")
        if int(a.get("version", -1)) != VERSION:
            self.close()
            raise UserError(f"{self.path}: pairs file version {a.get('version')} is not supported (expected "
                            f"{VERSION}); run 'selftransfer pairs' again")
        self.scale = int(a["scale"])
        self.degradation = json.loads(a["degradation"])
        self.target = json.loads(a.get("target", '{"kind": "frames"}'))
        self.train_indices = [int(i) for i in a["train_indices"]]
        self.val_indices = [int(i) for i in a["val_indices"]]
        self.train_times = [float(t) for t in a["train_times"]]
        self.val_times = [float(t) for t in a["val_times"]]
        self.train_kinds = json.loads(a["train_kinds"])
        self.val_kinds = json.loads(a["val_kinds"])
        self.selection = json.loads(a.get("selection", "{}"))
        self.source = {"name": str(a["source_name"]), "sha256": str(a["source_sha256"]),
                       "frames": int(a["source_frames"]), "fps": float(a["source_fps"]),
                       "width": int(a["source_width"]), "height": int(a["source_height"])}

    def train_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._pair("train", self.train_indices, i)

    def val_pair(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._pair("val", self.val_indices, i)

    def _pair(self, split: str, indices: list[int], i: int):
        if not 0 <= i < len(indices):
            raise IndexError(f"{split} pair {i} out of range 0..{len(indices) - 1}")
        name = str(indices[i])
        return self._h5[f"LR/{split}/{name}"][()], self._h5[f"HR/{split}/{name}"][()]

    def close(self) -> None:
        self._h5.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class PatchSampler:
    """Endless iterator of training batches ``(lr, hr)``: torch float32 NCHW tensors in [0, 1], LR
    (batch, 3, patch, patch) and the aligned HR (batch, 3, patch*scale, patch*scale).

    Each sample: a uniformly random training frame, a uniformly random LR patch position (the HR patch starts at
    scale times it), and one of the 8 flips/90° rotations applied to both. All training frames are held in memory
    as uint8, so a batch costs a few microseconds of slicing. Deterministic for a seed; ``state_dict`` /
    ``load_state_dict`` let a resumed run continue the same sequence.
    """

    def __init__(self, pairs: Pairs, patch: int = 48, batch: int = 16, seed: int = 0):
        for name, value, low in (("patch", patch, 1), ("batch", batch, 1), ("seed", seed, 0)):
            if type(value) is not int or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        self.scale, self.patch, self.batch = pairs.scale, patch, batch
        self.lr, self.hr = [], []
        for i in range(len(pairs.train_indices)):
            lr, hr = pairs.train_pair(i)
            if lr.shape[0] < patch or lr.shape[1] < patch:
                raise UserError(f"{pairs.path}: training frames are {lr.shape[1]}x{lr.shape[0]} at low resolution, "
                                f"smaller than the {patch}-pixel patch; use a smaller --patch")
            if hr.shape[:2] != (lr.shape[0] * self.scale, lr.shape[1] * self.scale):
                raise UserError(f"{pairs.path}: frame {pairs.train_indices[i]} HR {hr.shape} and LR {lr.shape} do not "
                                f"match the scale x{self.scale}; damaged pairs file")
            self.lr.append(lr)
            self.hr.append(hr)
        if not self.lr:
            raise UserError(f"{pairs.path}: has no training frames")
        self._heights = np.asarray([a.shape[0] for a in self.lr])
        self._widths = np.asarray([a.shape[1] for a in self.lr])
        self.rng = np.random.default_rng(seed)

    def __iter__(self):
        return self

    def __next__(self):
        return self.sample()

    def sample(self):
        import torch

        b, p, s = self.batch, self.patch, self.scale
        frame = self.rng.integers(len(self.lr), size=b)
        ys = self.rng.integers(self._heights[frame] - p + 1)
        xs = self.rng.integers(self._widths[frame] - p + 1)
        transform = self.rng.integers(8, size=b)
        lr_batch = np.empty((b, p, p, 3), np.uint8)
        hr_batch = np.empty((b, p * s, p * s, 3), np.uint8)
        for k in range(b):
            f, y, x, t = int(frame[k]), int(ys[k]), int(xs[k]), int(transform[k])
            lr_batch[k] = _dihedral(self.lr[f][y:y + p, x:x + p], t)
            hr_batch[k] = _dihedral(self.hr[f][y * s:(y + p) * s, x * s:(x + p) * s], t)
        return _to_tensor(lr_batch, torch), _to_tensor(hr_batch, torch)

    def state_dict(self) -> dict:
        return {"rng": self.rng.bit_generator.state}

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state["rng"]


def _dihedral(img: np.ndarray, t: int) -> np.ndarray:
    """One of the 8 symmetries of the square: bit 0 horizontal flip, bit 1 vertical flip, bit 2 transpose
    (transpose plus a flip is a 90° rotation)."""
    if t & 1:
        img = img[:, ::-1]
    if t & 2:
        img = img[::-1]
    if t & 4:
        img = img.transpose(1, 0, 2)
    return img


def _to_tensor(batch: np.ndarray, torch):
    return torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float().div_(255.0)


# ----------------------------------------------------------------------------------------------- CLI

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("video", help="input video file")
    parser.add_argument("-o", "--output", required=True, help="pairs file to write (HDF5)")
    parser.add_argument("--scale", type=int, default=2, choices=SCALES, help="upscaling factor (default 2)")
    parser.add_argument("--degradation", default="bicubic", choices=DEGRADATIONS,
                        help="how LR frames are made: bicubic (MATLAB imresize, default), cv2_cubic, x264")
    parser.add_argument("--crf", type=int, default=23, help="x264 CRF for --degradation x264 (0..51, default 23)")
    parser.add_argument("--frames", help="frames file from 'selftransfer frames' (default: select frames now)")
    parser.add_argument("--target", type=int, default=24, help="training frames to select (default 24)")
    parser.add_argument("--val", type=int, default=4, help="held-out validation frames (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the frame selection (default 0)")
    parser.add_argument("--patch", type=int, default=48, help="LR training patch size to check against (default 48)")
    parser.add_argument("--force", action="store_true", help="overwrite an existing output file")


def run(args: argparse.Namespace) -> int:
    from selftransfer_trainer.keyframes import load_selection, select_frames, summary
    from vs_selftransfer.files import check_output_path
    from selftransfer_trainer.video import check_trainable
    from vs_selftransfer.probe import probe

    if not CRF_RANGE[0] <= args.crf <= CRF_RANGE[1]:
        raise UserError(f"--crf must be in {CRF_RANGE[0]}..{CRF_RANGE[1]}, got {args.crf}")
    if args.target < 1 or args.val < 0 or args.seed < 0 or args.patch < 1:
        raise UserError("--target and --patch must be at least 1, --val and --seed at least 0")
    output = check_output_path(args.output, args.force, inputs=[args.video, args.frames])
    info = probe(args.video)
    check_trainable(info, args.scale, args.patch)
    if args.frames:
        selection = load_selection(args.frames, args.video)
    else:
        selection = select_frames(args.video, target=args.target, val=args.val, seed=args.seed)
    print(summary(selection))
    write_pairs(output, selection, args.scale, args.degradation, args.crf)
    print(f"wrote {output}: {len(selection.train)} training and {len(selection.val)} validation pairs at "
          f"x{args.scale}, {args.degradation} degradation")
    return 0
