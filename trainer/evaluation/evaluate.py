"""``selftransfer eval``: does self-transfer beat the generic model on the video's own unseen frames?

Protocol (also written into every report):

* HR = the video's frames (RGB 8-bit, cropped to a multiple of the scale); LR = the bundle's degradation of each
  HR frame (``trainer.degrade.degrade`` with the manifest's ``degradation``, or ``--degradation``/``--crf``).
* Test frames = frames the bundle never learned from: not a training frame (manifest ``frames.train``) and, unless
  ``--include-val``, not a validation frame either (``frames.val`` chose the checkpoint that was shipped, so it is
  not an unbiased test). A bundle that records no training frames is refused unless ``--assume-unseen``
  (otherwise its training frames would be scored as unseen). Each test frame belongs to one subset: *near* (within ``--near-seconds``, default 1 s, of a
  training frame) or *far* (further away: transfer from non-adjacent content, the seed's claim).
* Sampling keeps a long video to minutes on 2 cores: by default up to 24 test frames, taken as pairs of consecutive
  frames (t, t+1) so that temporal flicker can be measured, spread evenly over the video (stratified, ``--seed``
  picks inside each stratum) and with at least a third of the pairs far when far frames exist.
  ``--every K`` takes pairs starting at every K-th frame; ``--all`` takes every test frame.
* Methods, all on exactly the same LR input: bicubic (MATLAB ``imresize`` bicubic upsampling, a = -0.5, as in
  the SR literature's bicubic baseline), the generic CARN-M (official weights, ``--generic``), the self-transfer
  bundle in PyTorch, and the bundle through the deployed path (``core.selftransfer.Upscale`` in VapourSynth on an
  RGB24 clip of the LR frames), which must agree with the PyTorch run. Every network run goes through
  ``vs_selftransfer.tiling.upscale_image`` with an overlap of 24 LR px (> the receptive radius, so tiles are exact).
* Metrics: see ``trainer/metrics.py``. Y-PSNR and Y-SSIM (BT.601 studio range as MATLAB ``rgb2ycbcr``, border of
  ``scale`` px shaved, outputs clipped and rounded to 8 bits first), RGB PSNR (same shave), temporal flicker on
  consecutive test frames. VMAF (Netflix's vmaf_v0.6.1 through the ``vmaf-torch`` package, ``trainer/vmaf.py``)
  per frame on the same Y, rounded to 8 bits, whole frame, with the motion feature taken from the true neighbouring
  ground-truth frames of each test frame (decoded for it); ``--no-vmaf`` skips it. The verdict stays Y-PSNR.
  The report's schema is documented in ``trainer/evaluation/report.py``.

Two settings (``protocol.kind`` in the report):

* ``self`` (the default; the *delivery* setting): HR = the video's own frames, LR = their degradation, as above.
* ``reference`` (``--reference REF``; the *source* setting): VIDEO is the low-resolution source the user holds and
  will upscale, REF the same video at ``scale`` x its size (a Blu-ray beside a DVD rip, or the master a source
  was made from). LR = the source's own frames, untouched; HR = REF's frames. Frames are paired by index, and
  their timestamps (from each file's start) must agree to half a frame; a size, frame count or frame rate that
  does not match is an error naming ``--reference``. Every source frame is a fair test frame: the bundle never
  saw REF. Subsets still say how far each frame is from the source frames the bundle learned from.

The report directory is built in a temporary directory next to it and renamed into place only when complete.
"""
from __future__ import annotations

import argparse
import bisect
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vs_selftransfer.errors import UserError
from vs_selftransfer.files import check_not_an_input, current_umask, fsync_dir
from vs_selftransfer.tiling import AUTO_TILE, AUTO_TILE_MAX_PIXELS, OVERLAP, auto_tile
from selftransfer_trainer.metrics import flicker, psnr_rgb, psnr_y, quantize, rgb_to_y, shave, ssim_y
from selftransfer_trainer.vmaf import luma as vmaf_luma

DEFAULT_FRAMES = 24
NEAR_SECONDS = 1.0
CROP = 192  # HR px of the side-by-side crops
DEPLOYED_TOLERANCE_DB = 0.01
METHODS = ("bicubic", "generic", "selftransfer")
DEPLOYED = "deployed"
FAR = "far"
NEAR = "near"


# -- which frames ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class UnseenFrame:
    index: int
    subset: str  # NEAR or FAR
    distance: float  # seconds to the nearest training frame (inf when no training frame is known)
    is_val: bool = False


def frame_indices(entries, what: str, n_frames: int) -> list[int]:
    """The manifest's frame list as sorted ints; entries may be ints or objects with an ``index``."""
    if entries is None:
        return []
    if not isinstance(entries, list):
        raise UserError(f"bundle manifest frames.{what} must be a list of frame indices")
    out = []
    for e in entries:
        i = e.get("index") if isinstance(e, dict) else e
        if type(i) is not int or i < 0:
            raise UserError(f"bundle manifest frames.{what} holds {e!r}, which is not a frame index")
        if i >= n_frames:
            raise UserError(f"bundle manifest frames.{what} names frame {i} but the video has {n_frames} frames: "
                            "the bundle was not trained on this video")
        out.append(i)
    return sorted(set(out))


def split_frames(n_frames: int, fps: float, train: list[int], val: list[int], *,
                 near_seconds: float = NEAR_SECONDS, include_val: bool = False,
                 times: list[float] | None = None, keep_train: bool = False) -> list[UnseenFrame]:
    """Every frame that may be tested, in index order, with its near/far subset. Distances are in seconds:
    from the frames' timestamps ``times`` when given (exact for variable frame rate), else index / fps.
    ``keep_train`` keeps the training frames too (distance 0): with a reference their HR was never seen."""
    if n_frames <= 0:
        raise ValueError(f"n_frames must be positive, not {n_frames}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, not {fps}")
    if times is None:
        times = [i / fps for i in range(n_frames)]
    elif len(times) != n_frames:
        raise ValueError(f"times has {len(times)} entries for {n_frames} frames")
    train_sorted = sorted(set(train))
    train_set, val_set = set(train_sorted), set(val)
    out = []
    for i in range(n_frames):
        if (i in train_set and not keep_train) or (i in val_set and not include_val):
            continue
        if train_sorted:
            k = bisect.bisect_left(train_sorted, i)
            distance = min(abs(times[i] - times[train_sorted[j]]) for j in (k - 1, k) if 0 <= j < len(train_sorted))
        else:
            distance = math.inf
        out.append(UnseenFrame(i, NEAR if distance <= near_seconds else FAR, distance, i in val_set))
    return out


def _stratified(items: list, k: int, rng: np.random.Generator) -> list:
    """k items spread over the list: one picked at random inside each of k equal strata."""
    if k <= 0:
        return []
    if k >= len(items):
        return list(items)
    edges = np.linspace(0, len(items), k + 1)
    picks = []
    for a, b in zip(edges[:-1], edges[1:]):
        lo, hi = int(math.floor(a)), max(int(math.floor(b)), int(math.floor(a)) + 1)
        picks.append(items[int(rng.integers(lo, hi))])
    return picks


def sample_frames(candidates: list[UnseenFrame], *, count: int | None = DEFAULT_FRAMES, every: int | None = None,
                  all_frames: bool = False, seed: int = 0) -> list[UnseenFrame]:
    """Choose the test frames among ``candidates`` (see the module docstring); returns them in index order."""
    by_index = {c.index: c for c in candidates}
    if all_frames:
        return list(candidates)
    if every is not None:
        if every < 1:
            raise ValueError(f"every must be >= 1, not {every}")
        chosen = {i for c in candidates if c.index % every == 0 for i in (c.index, c.index + 1) if i in by_index}
        return [by_index[i] for i in sorted(chosen)]
    if count is None or count < 1:
        raise ValueError(f"count must be >= 1, not {count}")
    if count >= len(candidates):
        return list(candidates)
    rng = np.random.default_rng(seed)
    # Disjoint pairs (t, t+1) inside runs of consecutive candidates, grouped by the subset of their first frame.
    pairs: dict[str, list[int]] = {NEAR: [], FAR: []}
    taken: set[int] = set()
    for c in candidates:
        if c.index not in taken and c.index + 1 in by_index:
            pairs[c.subset].append(c.index)
            taken.update((c.index, c.index + 1))
    n_pairs = min(count // 2, len(pairs[NEAR]) + len(pairs[FAR]))
    n_far = 0
    if pairs[FAR]:
        share = len(pairs[FAR]) / (len(pairs[NEAR]) + len(pairs[FAR]))
        n_far = min(len(pairs[FAR]), max(math.ceil(n_pairs / 3), round(n_pairs * share)) if n_pairs else 0)
    n_near = min(len(pairs[NEAR]), n_pairs - n_far)
    n_far = min(len(pairs[FAR]), n_pairs - n_near)
    chosen: set[int] = set()
    for start in _stratified(pairs[NEAR], n_near, rng) + _stratified(pairs[FAR], n_far, rng):
        chosen.update((start, start + 1))
    # Odd counts, or too few consecutive pairs: single frames spread over the rest.
    rest = [c.index for c in candidates if c.index not in chosen]
    chosen.update(_stratified(rest, count - len(chosen), rng))
    return [by_index[i] for i in sorted(chosen)]


# -- upscalers ------------------------------------------------------------------------------------------------
def bicubic_upscale(lr: np.ndarray, scale: int) -> np.ndarray:
    """LR uint8 HWC -> (3, sH, sW) float in [0, 1] on the 8-bit grid: MATLAB ``imresize(lr, scale)`` bicubic
    on the uint8 image (rounded after each axis, as MATLAB does), the bicubic baseline of SR papers."""
    from selftransfer_trainer.degrade import imresize

    up = imresize(np.asarray(lr, np.uint8), scale)
    return np.moveaxis(up, -1, 0).astype(np.float64) / 255.0


def network_runner(model, device: str):
    """``model`` on ``device`` in eval mode, as the tiling function's ``run`` (vs_selftransfer.model.torch_runner).
    Channels-last weights and inputs on the CPU: the faster layout for these convolutions (~7% for the weights)."""
    import torch

    from vs_selftransfer.model import torch_runner

    layout = torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format
    return torch_runner(model.to(device, memory_format=layout).eval(), device)


class DeployedPath:
    """The bundle through ``core.selftransfer.Upscale`` (via ``vs_selftransfer.upscale``, fp32) on an RGB24 clip of
    the LR frames. Clip frame 0 is a black placeholder (the filter reads a frame when it is created, to learn the
    clip's properties); the LR frame of test frame ``n`` is clip frame ``n + 1``, filled when it is requested."""

    PRECISION = "fp32"

    def __init__(self, model_path: str, n_frames: int, lr_width: int, lr_height: int, tile: int):
        import vapoursynth as vs

        import vs_selftransfer

        core = vs.core
        self._frames: dict[int, np.ndarray] = {}
        src = core.std.BlankClip(format=vs.RGB24, width=lr_width, height=lr_height, length=n_frames + 1,
                                 fpsnum=1, fpsden=1)
        src = core.std.ModifyFrame(src, src, self._fill)
        # fp32: the check is that the filter computes what PyTorch computes (colour, tiling, plumbing); the reduced
        # precisions precision="auto" may pick are measured, per video, by fit's gates (``selftransfer info``).
        self.clip = vs_selftransfer.upscale(src, model_path, overlap=OVERLAP, tilesize=tile,
                                            precision=self.PRECISION)

    def _fill(self, n, f):
        if n == 0:
            return f
        lr = self._frames[n]
        out = f.copy()
        for p in range(3):
            np.copyto(np.asarray(out[p]), lr[..., p])
        return out

    def __call__(self, n: int, lr: np.ndarray) -> np.ndarray:
        """Output for test frame ``n`` from LR uint8 HWC: (3, sH, sW) float on the 8-bit grid."""
        self._frames[n + 1] = lr
        try:
            with self.clip.get_frame(n + 1) as frame:
                planes = [np.array(frame[p], copy=True) for p in range(3)]
        finally:
            del self._frames[n + 1]
        return np.stack(planes).astype(np.float64) / 255.0


def deployed_unavailable() -> str | None:
    """None when ``core.selftransfer`` can be used here, else why not (loading the dev build when not installed)."""
    try:
        import vapoursynth as vs
    except ImportError as e:
        return f"VapourSynth is not importable ({e})"
    core = vs.core
    if hasattr(core, "selftransfer"):
        return None
    dev = Path(__file__).resolve().parents[2] / "build" / "vsplugin" / "libselftransfer.so"
    if dev.is_file():
        try:
            core.std.LoadPlugin(str(dev))
        except vs.Error as e:
            return f"the development build {dev} does not load: {e}"
        if hasattr(core, "selftransfer"):
            return None
    return ("the selftransfer VapourSynth plugin is not installed (pip install . , or build it in place with "
            "`python setup.py build_ext --inplace` and set VAPOURSYNTH_EXTRA_PLUGIN_PATH=build/vsplugin)")


# -- the run --------------------------------------------------------------------------------------------------
@dataclass
class Options:
    video: str
    model: str
    output: str
    scale: int | None = None
    degradation: str | None = None
    crf: int | None = None
    frames: int | None = DEFAULT_FRAMES
    every: int | None = None
    all_frames: bool = False
    include_val: bool = False
    assume_unseen: bool = False
    near_seconds: float = NEAR_SECONDS
    generic: str = "official"
    deployed: bool = True
    force: bool = False
    tile: int | None = None
    seed: int = 0
    threads: int = 0
    device: str = "cpu"
    progress: bool = True
    reference: str | None = None
    vmaf: bool = True


def _check_options(o: Options) -> None:
    if o.reference is not None:
        for flag, given in (("--degradation", o.degradation is not None), ("--crf", o.crf is not None),
                            ("--include-val", o.include_val), ("--assume-unseen", o.assume_unseen)):
            if given:
                raise UserError(f"{flag} does not apply with --reference: the source's own frames are the input "
                                "and every source frame is tested")
        if not os.path.exists(o.reference):
            raise UserError(f"--reference {o.reference}: no such file")
        if os.path.isdir(o.reference):
            raise UserError(f"--reference {o.reference}: is a directory, not a video")
    if o.scale is not None and o.scale not in (2, 3, 4):
        raise UserError(f"--scale must be 2, 3 or 4, not {o.scale}")
    from selftransfer_trainer.degrade import DEGRADATIONS

    if o.degradation is not None and o.degradation not in DEGRADATIONS:
        raise UserError(f"--degradation must be one of {list(DEGRADATIONS)}, not {o.degradation!r}")
    if o.crf is not None and not 0 <= o.crf <= 51:
        raise UserError(f"--crf must be between 0 and 51, not {o.crf}")
    if o.every is not None and o.every < 1:
        raise UserError(f"--every must be at least 1, not {o.every}")
    if o.frames is not None and o.frames < 1:
        raise UserError(f"--frames must be at least 1, not {o.frames}")
    if not o.near_seconds > 0:
        raise UserError(f"--near-seconds must be positive, not {o.near_seconds}")
    if o.tile is not None and o.tile != 0 and o.tile < 16:
        raise UserError(f"--tile must be 0 (whole frame) or at least 16 LR pixels, not {o.tile}")
    if o.seed < 0:
        raise UserError(f"--seed must be >= 0, not {o.seed}")
    if o.threads < 0:
        raise UserError(f"--threads must be >= 0, not {o.threads}")
    if o.device not in ("cpu", "cuda"):
        raise UserError(f"--device must be cpu or cuda, not {o.device!r}")
    if o.device == "cuda":
        import torch
        if not torch.cuda.is_available():
            raise UserError("--device cuda: PyTorch sees no CUDA device here; use --device cpu")
    if o.vmaf:
        from selftransfer_trainer.vmaf import check_available

        check_available()
    if o.generic != "official" and not os.path.isfile(o.generic):
        raise UserError(f"--generic {o.generic}: no such file (pass 'official' or a .pth/.safetensors/.stm path)")
    out = Path(o.output)
    check_not_an_input(out, [o.video, o.model, o.reference, o.generic], flag="-o")
    if out.exists():
        if not out.is_dir():
            raise UserError(f"-o {out}: exists and is not a directory")
        if not o.force:
            raise UserError(f"-o {out}: already exists (pass --force to replace it)")
        if any(out.iterdir()) and not (out / "report.json").is_file():
            raise UserError(f"-o {out}: exists and does not look like an eval report (no report.json); "
                            "refusing to replace it even with --force")


def _degradation(manifest: dict, o: Options, warnings: list[str]) -> dict:
    from selftransfer_trainer.degrade import DEGRADATIONS

    trained = manifest.get("degradation")
    if not isinstance(trained, dict) or trained.get("method") not in DEGRADATIONS:
        trained = None
        if o.degradation is None:
            warnings.append("the bundle does not record its degradation; using bicubic (pass --degradation)")
    method = o.degradation or (trained or {}).get("method", "bicubic")
    if method not in DEGRADATIONS:
        raise UserError(f"--degradation must be one of {list(DEGRADATIONS)}, not {method!r}")
    deg = {"method": method}
    if method == "x264":
        crf = o.crf if o.crf is not None else (trained or {}).get("crf", 23)
        if type(crf) is not int or not 0 <= crf <= 51:
            raise UserError(f"bundle manifest degradation.crf {crf!r} is not an integer in 0..51; pass --crf")
        deg["crf"] = crf
    elif o.crf is not None:
        raise UserError(f"--crf only applies to --degradation x264, not {method}")
    if method == "x264" and o.degradation is None and (trained or {}).get("coding") == "video":
        deg.update(coding="video", window=trained.get("window"))  # each test frame coded in a video of its neighbours
    if trained is not None and (deg["method"] != trained["method"]
                                or ("crf" in deg and deg["crf"] != trained.get("crf", 23))):
        warnings.append(f"evaluating with degradation {deg}, but the bundle was trained on {trained}")
    return deg


def _generic_model(spec: str, scale: int):
    from vs_selftransfer.model import ModelConfig
    from selftransfer_trainer.weights import initial_model, official_checkpoint
    from vs_selftransfer.files import sha256_file

    try:
        if spec == "official":
            path = official_checkpoint("carn_m")
            label = "official CARN-M (nmhkahn/CARN-pytorch)"
        else:
            path = Path(spec)
            label = str(path)
        if str(path).endswith(".stm"):
            from vs_selftransfer.bundle import Bundle
            b = Bundle.open(path)
            if b.scale != scale:
                raise UserError(f"--generic {path} is a x{b.scale} bundle, the model under test is x{scale}")
            model = b.torch_model()
        else:
            model = initial_model(ModelConfig(arch="carn_m", scale=scale), str(path))
    except (RuntimeError, ValueError) as e:
        if isinstance(e, UserError):
            raise
        raise UserError(f"--generic {spec}: {e}") from None
    return model, {"spec": spec, "label": label, "path": str(path), "sha256": sha256_file(path)}


def _resolve_tile(tile: int | None, lr_w: int, lr_h: int) -> int:
    if tile is not None:
        return tile
    return auto_tile(lr_w, lr_h)


def _crop_box(diff: np.ndarray, size: int, scale: int, largest: bool) -> tuple[int, int]:
    """Top-left (y, x) of the size x size HR window with the largest (or smallest) mean of ``diff``, on the
    LR grid (multiples of ``scale``) so the LR crop lines up with it."""
    import cv2

    h, w = diff.shape
    mean = cv2.boxFilter(diff.astype(np.float32), -1, (size, size), normalize=True, borderType=cv2.BORDER_REFLECT)
    r0, r1 = size // 2, size // 2 + 1
    valid = mean[r0:h - size + r1, r0:w - size + r1] if h >= size and w >= size else mean[:1, :1]
    flat = int(np.argmax(valid) if largest else np.argmin(valid))
    cy, cx = divmod(flat, valid.shape[1])
    y = max(0, min(h - size, cy)) // scale * scale
    x = max(0, min(w - size, cx)) // scale * scale
    return y, x


def _crops(frame: dict, lr: np.ndarray, outputs: dict, hr: np.ndarray, scale: int, largest: bool) -> dict:
    """The side-by-side panels of one frame, at the place where self-transfer helps most (or least)."""
    h, w = hr.shape[1:]
    # Inside the shaved border the metrics ignore, when the frame is large enough.
    border = scale if min(h, w) >= CROP + 2 * scale else 0
    size = max(scale, min(CROP, h - 2 * border, w - 2 * border) // scale * scale)
    y_hr = shave(rgb_to_y(hr), border)
    err_generic = (shave(rgb_to_y(outputs["generic"]), border) - y_hr) ** 2
    gain_map = err_generic - (shave(rgb_to_y(outputs["selftransfer"]), border) - y_hr) ** 2
    if np.ptp(gain_map) == 0:  # identical outputs: show where the generic model errs most instead
        gain_map = err_generic if largest else -err_generic
    y, x = _crop_box(gain_map, size, scale, largest)
    y, x = y + border, x + border
    ly, lx, ls = y // scale, x // scale, size // scale
    lr_crop = np.repeat(np.repeat(lr[ly:ly + ls, lx:lx + ls], scale, 0), scale, 1)
    to_u8 = lambda a: np.round(np.moveaxis(a[:, y:y + size, x:x + size], 0, -1) * 255).astype(np.uint8)  # noqa: E731
    panels = [("LR (nearest x%d)" % scale, lr_crop, None)]
    for name in METHODS:
        crop_psnr = psnr_y(outputs[name][:, y:y + size, x:x + size], hr[:, y:y + size, x:x + size], 0)
        panels.append((name, to_u8(outputs[name]),
                       (frame["metrics"][name]["psnr_y"], crop_psnr, frame["metrics"][name].get("vmaf"))))
    panels.append(("HR", to_u8(hr), None))
    return {"index": frame["index"], "time": frame["time"], "subset": frame["subset"],
            "gain": frame["gain_psnr_y"], "box": [int(x), int(y), int(size), int(size)], "panels": panels}


@dataclass
class Setup:
    """Everything decided before the first frame is decoded."""
    bundle: object
    info: object
    scale: int
    degradation: dict
    video_sha: str
    same_video: bool
    train: list[int]
    val: list[int]
    candidates: list[UnseenFrame]
    tests: list[UnseenFrame]
    tile: int
    hr_size: tuple[int, int]  # (width, height)
    warnings: list[str]
    reference: object = None  # VideoInfo of --reference (the HR frames), None in the self setting


TIME_TOLERANCE_FRAMES = 0.5  # source and reference frames must be this close in time (in frame durations)


def _frame_times(path: str, n_frames: int) -> list[float] | None:
    """Presentation times in seconds, from the file's first frame; None when the container gives no timestamps."""
    from vs_selftransfer.probe import frame_table

    table = frame_table(path)
    if table.pts is None or len(table.pts) != n_frames:
        return None
    return [float(pts * table.time_base) for pts in table.pts]


def _check_reference(o: Options, info, scale: int):
    """Probe --reference and check it is the source at ``scale`` x the size, frame for frame."""
    from vs_selftransfer.probe import probe

    try:
        ref = probe(o.reference)
    except UserError as e:
        raise UserError(f"--reference: {e}") from None
    want = (info.width * scale, info.height * scale)
    if (ref.width, ref.height) != want:
        raise UserError(f"--reference {o.reference}: {ref.width}x{ref.height}, but the x{scale} bundle turns the "
                        f"{info.width}x{info.height} source into {want[0]}x{want[1]}; the reference must be the same "
                        f"video at {scale}x the source's size")
    if ref.frames != info.frames:
        raise UserError(f"--reference {o.reference}: {ref.frames} frames, the source {o.video} has {info.frames}; "
                        "frames are paired by index, so both must hold the same frames")
    if abs(ref.fps - info.fps) > 1e-3 * info.fps:
        raise UserError(f"--reference {o.reference}: {ref.fps:.3f} fps, the source {o.video} {info.fps:.3f} fps; "
                        "both must have the same frame rate")
    src_t, ref_t = _frame_times(o.video, info.frames), _frame_times(o.reference, ref.frames)
    if src_t is not None and ref_t is not None:
        tolerance = TIME_TOLERANCE_FRAMES / info.fps
        for i, (a, b) in enumerate(zip(src_t, ref_t)):
            if abs((a - src_t[0]) - (b - ref_t[0])) > tolerance:
                raise UserError(f"--reference {o.reference}: frame {i} is at {b - ref_t[0]:.3f} s, the source's at "
                                f"{a - src_t[0]:.3f} s (from each file's first frame); the two are not the same "
                                "frames")
    return ref


def prepare(o: Options) -> Setup:
    """Validate the inputs and choose the test frames (cheap: nothing is decoded and no network is run)."""
    from vs_selftransfer.probe import frame_table, probe
    from vs_selftransfer.bundle import Bundle

    _check_options(o)
    warnings: list[str] = []
    bundle = Bundle.open(o.model)
    scale = bundle.scale
    if o.scale is not None and o.scale != scale:
        raise UserError(f"--scale {o.scale} does not match the bundle, which upscales x{scale}")
    info = probe(o.video)
    reference = _check_reference(o, info, scale) if o.reference is not None else None
    if reference is not None:
        hr_w, hr_h = reference.width, reference.height
    else:
        hr_w, hr_h = info.width // scale * scale, info.height // scale * scale
    if min(hr_w, hr_h) < 11 + 2 * scale:
        raise UserError(f"{o.video}: {info.width}x{info.height} is too small to evaluate at x{scale} "
                        f"(at least {11 + 2 * scale} px a side are needed for SSIM after shaving the border)")
    manifest = bundle.manifest
    if reference is None:
        degradation = _degradation(manifest, o, warnings)
    else:
        degradation = {"method": "none", "input": "the source's own frames"}

    # Which frames the bundle learned from, and whether they are frames of this video at all.
    frames_meta = manifest.get("frames") if isinstance(manifest.get("frames"), dict) else None
    source = manifest.get("source") if isinstance(manifest.get("source"), dict) else {}
    same_video = source.get("sha256") in (None, info.sha256)
    train: list[int] = []
    val: list[int] = []
    if frames_meta is None:
        # Without the list, training frames would be scored as unseen: an inflated result. Only the user can say
        # that no frame of this video was learned from (a generic bundle, or one fitted on another video).
        if not o.assume_unseen and reference is None:
            raise UserError(f"{o.model}: the bundle records no training frames, so its unseen frames cannot be told "
                            "apart (bundles made by `selftransfer fit` record them); pass --assume-unseen if it "
                            "learned nothing from this video")
        if reference is None:
            warnings.append("the bundle records no training frames (--assume-unseen): every frame counts as "
                            "unseen and far")
    elif not same_video:
        warnings.append(f"the bundle was trained on another video (source sha256 {source.get('sha256')}, this "
                        f"video {info.sha256}): every frame counts as unseen and far")
    else:
        train = frame_indices(frames_meta.get("train"), "train", info.frames)
        val = frame_indices(frames_meta.get("val"), "val", info.frames)
    table = frame_table(o.video)
    times = ([float(pts * table.time_base) for pts in table.pts]
             if table.pts is not None and len(table.pts) == info.frames else None)
    # With a reference every source frame is a fair test frame (the bundle never saw REF's frames).
    candidates = split_frames(info.frames, info.fps, train, val, near_seconds=o.near_seconds,
                              include_val=o.include_val or reference is not None, times=times,
                              keep_train=reference is not None)
    if not candidates:
        raise UserError(f"{o.video}: every frame is a training{'' if o.include_val else ' or validation'} frame; "
                        "nothing is left to test")
    tests = sample_frames(candidates, count=None if (o.every or o.all_frames) else o.frames, every=o.every,
                          all_frames=o.all_frames, seed=o.seed)
    if not tests:
        raise UserError(f"--every {o.every} selects no test frame of this {info.frames}-frame video")
    return Setup(bundle, info, scale, degradation, info.sha256, same_video, train, val, candidates, tests,
                 _resolve_tile(o.tile, hr_w // scale, hr_h // scale), (hr_w, hr_h), warnings, reference)


def evaluate(o: Options) -> dict:
    """Run the whole evaluation and write the report directory; returns the report (as written to report.json)."""
    import shutil
    import tempfile

    from selftransfer_trainer.evaluation.report import write_report_dir

    started = time.time()
    out = Path(o.output)
    setup = prepare(o)
    if not out.parent.is_dir():
        raise UserError(f"-o {out}: the folder {out.parent} does not exist; create it first")
    try:  # created now, so an unwritable folder fails before minutes of work
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    except OSError as e:
        raise UserError(f"-o {out}: cannot write in {out.parent} ({e.strerror or e})") from None
    os.chmod(tmp_dir, 0o777 & ~current_umask())  # mkdtemp's 0700 would otherwise stick to the report directory
    try:
        result = run_frames(o, setup)
        report = build_report(o, setup, result, time.time() - started)
        report = write_report_dir(report, tmp_dir, result["crops"])
        _install(tmp_dir, out, o.force)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return report


def run_frames(o: Options, setup: Setup) -> dict:
    """Decode the test frames, run every method on the same LR input, and measure."""
    import torch
    from tqdm import tqdm

    from vs_selftransfer.tiling import upscale_image

    scale, tile, tests = setup.scale, setup.tile, setup.tests
    hr_w, hr_h = setup.hr_size
    torch.set_num_threads(o.threads or os.cpu_count() or 1)
    generic_model, generic_info = _generic_model(o.generic, scale)
    run_generic = network_runner(generic_model, o.device)
    run_self = network_runner(setup.bundle.torch_model(), o.device)
    methods = list(METHODS)
    deployed = None
    deployed_info: dict = {"status": "skipped", "reason": "--no-deployed"}
    if o.deployed:
        reason = deployed_unavailable()
        if reason:
            deployed_info = {"status": "skipped", "reason": reason}
            setup.warnings.append(f"deployed path not checked: {reason}")
            print(f"selftransfer eval: warning: deployed path not checked: {reason}", file=sys.stderr)
        else:
            import vapoursynth as vs
            try:
                deployed = DeployedPath(str(Path(o.model).resolve()), len(tests), hr_w // scale, hr_h // scale,
                                        tile)
            except vs.Error as e:
                reason = str(e).strip().splitlines()[0]
                deployed_info = {"status": "error", "reason": reason}
                setup.warnings.append(f"the deployed path could not be set up: {reason}")
                print(f"selftransfer eval: warning: the deployed path could not be set up: {reason}",
                      file=sys.stderr)
            else:
                methods.append(DEPLOYED)
                deployed_info = {"status": "ok"}

    frames, pairs, timing = [], [], {m: 0.0 for m in methods}
    best = worst = None
    previous = None  # (index, outputs, hr) of the last frame, for flicker
    by_index = {t.index: t for t in tests}
    position = {t.index: n for n, t in enumerate(tests)}
    scorer = motion = None
    vmaf_info: dict = {"status": "skipped", "reason": "--no-vmaf"}
    vmaf_seconds = motion_seconds = 0.0
    with contextlib.ExitStack() as stack:
        if o.vmaf:
            from selftransfer_trainer.vmaf import VmafScorer

            scorer = stack.enter_context(VmafScorer(o.device, workers=o.threads or os.cpu_count() or 1))
            t0 = time.perf_counter()
            motion = _reference_motion2(o, setup, scorer, list(by_index))
            motion_seconds = time.perf_counter() - t0
        bar = stack.enter_context(tqdm(total=len(tests), unit="frame", desc="eval", disable=not o.progress,
                                       dynamic_ncols=True, file=sys.stderr))
        for index, pts, lr, hr_u8 in _test_inputs(o, setup, list(by_index)):
            hr = np.moveaxis(hr_u8, -1, 0).astype(np.float64) / 255.0
            lr_chw = np.ascontiguousarray(np.moveaxis(lr, -1, 0), np.float32) / 255.0
            runs = {"bicubic": lambda: bicubic_upscale(lr, scale),
                    "generic": lambda: quantize(upscale_image(run_generic, lr_chw, scale, tile, OVERLAP)),
                    "selftransfer": lambda: quantize(upscale_image(run_self, lr_chw, scale, tile, OVERLAP)),
                    DEPLOYED: lambda: _run_deployed(deployed, position[index], lr, index)}
            outputs = {}
            for m in methods:
                t0 = time.perf_counter()
                outputs[m] = runs[m]()
                timing[m] += time.perf_counter() - t0
            t = by_index[index]
            metrics = {m: {"psnr_y": psnr_y(outputs[m], hr, scale), "ssim_y": ssim_y(outputs[m], hr, scale),
                           "psnr_rgb": psnr_rgb(outputs[m], hr, scale)} for m in methods}
            frame = {"index": index, "time": float(pts), "subset": t.subset, "distance_s": t.distance,
                     "is_val": t.is_val, "metrics": metrics,
                     "gain_psnr_y": metrics["selftransfer"]["psnr_y"] - metrics["generic"]["psnr_y"]}
            if scorer is not None:
                t0 = time.perf_counter()
                scores = scorer.scores(vmaf_luma(hr), [vmaf_luma(outputs[m]) for m in methods], motion[index])
                vmaf_seconds += time.perf_counter() - t0
                for m, score in zip(methods, scores):
                    metrics[m]["vmaf"] = score
                frame["vmaf_motion2"] = motion[index]
                frame["gain_vmaf"] = metrics["selftransfer"]["vmaf"] - metrics["generic"]["vmaf"]
            if deployed is not None:
                diff = np.abs(np.round(outputs[DEPLOYED] * 255) - np.round(outputs["selftransfer"] * 255))
                frame["deployed_vs_torch"] = {"max_abs_diff_levels": int(diff.max()),
                                              "pixels_differing": float(np.mean(diff.max(axis=0) > 0))}
            frames.append(frame)
            if previous is not None and previous[0] == index - 1:
                _, prev_out, prev_hr = previous
                pairs.append({"index": index, "subset": t.subset,
                              "flicker": {m: flicker(prev_out[m], outputs[m], prev_hr, hr, scale) for m in methods}})
            previous = (index, outputs, hr)
            g = frame["gain_psnr_y"]
            if math.isfinite(g):  # an exact frame (infinite PSNR) has no meaningful gain to show
                if best is None or g > best["gain"]:
                    best = _crops(frame, lr, outputs, hr, scale, largest=True)
                if worst is None or g < worst["gain"]:
                    worst = _crops(frame, lr, outputs, hr, scale, largest=False)
            bar.update(1)
            gains = [f["gain_psnr_y"] for f in frames if math.isfinite(f["gain_psnr_y"])]
            if gains:
                bar.set_postfix_str(f"gain over generic {np.mean(gains):+.3f} dB")

    if scorer is not None:
        hr_w, hr_h = setup.hr_size
        vmaf_info = {"status": "ok", **scorer.info.to_json(), "workers": scorer.workers, "timing": {
            "s_per_frame_per_method": vmaf_seconds / (len(frames) * len(methods)),
            "motion2_s_per_frame": motion_seconds / len(frames), "frame_size": [hr_w, hr_h],
            "load_average_1min": os.getloadavg()[0]}}
    if deployed is not None:
        deployed_info.update(_deployed_summary(frames))
        if not deployed_info["agree"]:
            msg = (f"the deployed path disagrees with PyTorch by up to {deployed_info['max_abs_psnr_y_diff']:.4f} "
                   f"dB Y-PSNR (tolerance {DEPLOYED_TOLERANCE_DB} dB)")
            setup.warnings.append(msg)
            print(f"selftransfer eval: warning: {msg}", file=sys.stderr)
    return {"frames": frames, "pairs": pairs, "methods": methods, "generic": generic_info,
            "deployed": deployed_info, "vmaf": vmaf_info, "timing": {m: timing[m] / len(frames) for m in methods},
            "crops": {"largest_gain": best, "smallest_gain": worst}}


def _ground_truth_frames(o: Options, setup: Setup, indices: list[int]):
    """Yield (index, pts, HR uint8 HWC) of the ground truth alone: the video's frames (cropped to a multiple of the
    scale) in the self setting, the reference's in the reference setting."""
    from selftransfer_trainer.degrade import crop_to_scale
    from selftransfer_trainer.video import read_frames

    path, flag = (o.video, "") if setup.reference is None else (o.reference, "--reference ")
    hr_w, hr_h = setup.hr_size
    # The stream's own size: the video's before cropping in the self setting; the reference is scale x the source.
    stream = (setup.info.width, setup.info.height) if setup.reference is None else (hr_w, hr_h)
    for index, pts, rgb in read_frames(path, indices):
        hr_u8 = crop_to_scale(rgb, setup.scale)
        if hr_u8.shape[:2] != (hr_h, hr_w):
            raise UserError(f"{flag}{path}: frame {index} is {rgb.shape[1]}x{rgb.shape[0]}, not the "
                            f"{stream[0]}x{stream[1]} of the stream (variable frame size)")
        yield index, pts, hr_u8


def _reference_motion2(o: Options, setup: Setup, scorer, indices: list[int]) -> dict[int, float]:
    """VMAF's motion2 of each test frame's ground truth, from its true neighbouring ground-truth frames (i-1 and
    i+1, whether tested or not), decoded in one pass that holds at most a few frames' Y planes."""
    from collections import deque

    from selftransfer_trainer.vmaf import luma_u8

    n = setup.info.frames
    pending = deque(sorted(set(indices)))
    needed = sorted({j for i in pending for j in (i - 1, i, i + 1) if 0 <= j < n})
    window: dict[int, np.ndarray] = {}
    out: dict[int, float] = {}
    for index, _, hr_u8 in _ground_truth_frames(o, setup, needed):
        window[index] = luma_u8(hr_u8)
        while pending and all(j in window for j in (pending[0] - 1, pending[0], pending[0] + 1) if 0 <= j < n):
            i = pending.popleft()
            out[i] = scorer.motion2(window.get(i - 1), window[i], window.get(i + 1))
        keep_from = pending[0] - 1 if pending else n
        for j in [j for j in window if j < keep_from]:
            del window[j]
    if pending:
        path = o.video if setup.reference is None else o.reference
        raise UserError(f"{path}: frame {pending[0]} or its neighbours could not be decoded (VMAF's motion feature "
                        "needs frames i-1 and i+1 of each test frame); pass --no-vmaf to evaluate without VMAF")
    return out


def _test_inputs(o: Options, setup: Setup, indices: list[int]):
    """Yield (index, pts, LR uint8 HWC, HR uint8 HWC) for the test frames: the video's frames and their degradation
    in the self setting; the source's frames and the reference's in the reference setting."""
    from selftransfer_trainer.degrade import degrade
    from selftransfer_trainer.video import read_frames

    scale, deg = setup.scale, setup.degradation
    truth = _ground_truth_frames(o, setup, indices)
    if setup.reference is None:
        coded = {}
        if deg.get("coding") == "video":
            from selftransfer_trainer.pairs import video_coded_lr

            coded = video_coded_lr(o.video, indices, scale, deg["crf"], deg["window"])
        for index, pts, hr_u8 in truth:
            lr = coded[index][1] if coded else degrade(hr_u8, scale, deg["method"], crf=deg.get("crf", 23))
            yield index, pts, lr, hr_u8
        return
    lr_w, lr_h = setup.info.width, setup.info.height
    for (index, pts, lr), (ref_index, _, hr_u8) in zip(read_frames(o.video, indices), truth):
        if index != ref_index:  # both readers yield exactly the requested indices, in order
            raise RuntimeError(f"source frame {index} paired with reference frame {ref_index}")
        if lr.shape[:2] != (lr_h, lr_w):
            raise UserError(f"{o.video}: frame {index} is {lr.shape[1]}x{lr.shape[0]}, not the {lr_w}x{lr_h} of "
                            "the stream (variable frame size)")
        yield index, pts, lr, hr_u8


def _run_deployed(deployed: DeployedPath, n: int, lr: np.ndarray, index: int) -> np.ndarray:
    import vapoursynth as vs

    try:
        return deployed(n, lr)
    except vs.Error as e:
        raise UserError(f"the deployed path (core.selftransfer.Upscale) failed on frame {index}: "
                        f"{str(e).strip()}; rerun with --no-deployed to evaluate without it") from None


def build_report(o: Options, setup: Setup, result: dict, elapsed: float) -> dict:
    from vs_selftransfer import __version__

    info, bundle, manifest = setup.info, setup.bundle, setup.bundle.manifest
    frames, pairs, methods = result["frames"], result["pairs"], result["methods"]
    hr_w, hr_h = setup.hr_size
    summary = summarize(frames, pairs, methods)
    return {
        "schema": "selftransfer-eval", "schema_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "selftransfer_version": __version__,
        "elapsed_s": elapsed,
        "video": {"path": str(o.video), "sha256": setup.video_sha, "width": info.width, "height": info.height,
                  "fps": info.fps, "frames": info.frames, "duration": info.duration},
        "model": {"path": str(o.model), "bundle_sha256": bundle.sha256, "arch": bundle.arch, "scale": setup.scale,
                  "degradation": manifest.get("degradation"), "validation": manifest.get("validation"),
                  "train_config": manifest.get("train_config"), "source": manifest.get("source")},
        "generic": result["generic"],
        "protocol": {
            "kind": "self" if setup.reference is None else "reference",
            "reference": None if setup.reference is None else {
                "path": str(o.reference), "name": Path(o.reference).name, "sha256": setup.reference.sha256,
                "width": setup.reference.width, "height": setup.reference.height, "fps": setup.reference.fps,
                "frames": setup.reference.frames},
            "setting": _bundle_setting(manifest),
            "scale": setup.scale, "degradation": setup.degradation, "hr_size": [hr_w, hr_h],
            "lr_size": [hr_w // setup.scale, hr_h // setup.scale], "near_seconds": o.near_seconds,
            "include_val": o.include_val, "assume_unseen": o.assume_unseen, "same_video": setup.same_video,
            "sampling": {"mode": "all" if o.all_frames else "every" if o.every else "frames",
                         "frames": o.frames, "every": o.every, "seed": o.seed},
            "train_frames": setup.train, "val_frames": setup.val,
            "candidates": {"all": len(setup.candidates), NEAR: sum(c.subset == NEAR for c in setup.candidates),
                           FAR: sum(c.subset == FAR for c in setup.candidates)},
            "test_frames": [f["index"] for f in frames], "tile": setup.tile, "overlap": OVERLAP,
            "device": o.device, "methods": methods,
        },
        "frames": frames,
        "flicker_pairs": pairs,
        "summary": summary,
        "deployed": result["deployed"],
        "vmaf": result["vmaf"],
        "timing_s_per_frame": result["timing"],
        "warnings": setup.warnings,
        "verdict": verdict(summary),
    }


def _bundle_setting(manifest: dict) -> dict | None:
    """What the bundle was fitted for (the manifest's ``setting`` block from ``selftransfer fit``), if recorded."""
    setting = manifest.get("setting")
    return setting if isinstance(setting, dict) else None


def _install(tmp_dir: Path, out: Path, force: bool) -> None:
    """Rename the finished report into place; with --force the old one is moved aside first, then deleted."""
    import shutil

    old = None
    if out.exists():
        if not force:
            raise UserError(f"-o {out}: appeared while evaluating; not replacing it (pass --force)")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp_dir, out)
    fsync_dir(out.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _deployed_summary(frames: list[dict]) -> dict:
    dpsnr = [f["metrics"][DEPLOYED]["psnr_y"] - f["metrics"]["selftransfer"]["psnr_y"] for f in frames]
    dpsnr = [d for d in dpsnr if math.isfinite(d)]
    worst = max((abs(d) for d in dpsnr), default=0.0)
    return {
        "max_abs_diff_levels": max(f["deployed_vs_torch"]["max_abs_diff_levels"] for f in frames),
        "pixels_differing": float(np.mean([f["deployed_vs_torch"]["pixels_differing"] for f in frames])),
        "max_abs_psnr_y_diff": worst,
        "mean_psnr_y_diff": float(np.mean(dpsnr)) if dpsnr else 0.0,
        "tolerance_db": DEPLOYED_TOLERANCE_DB,
        "agree": worst <= DEPLOYED_TOLERANCE_DB,
    }


# -- statistics -----------------------------------------------------------------------------------------------
def _stats(values: list[tuple[int, float]], higher_is_better: bool) -> dict:
    """mean/median over finite values; worst = the lowest (or highest) with its frame."""
    finite = [(i, v) for i, v in values if math.isfinite(v)]
    if not values:
        return {"n": 0, "mean": None, "median": None, "worst": None, "worst_frame": None, "n_infinite": 0}
    pick = min if higher_is_better else max
    wi, wv = pick(values, key=lambda iv: iv[1])
    vals = [v for _, v in finite]
    return {"n": len(values), "mean": float(np.mean(vals)) if vals else None,
            "median": float(np.median(vals)) if vals else None, "worst": wv, "worst_frame": wi,
            "n_infinite": len(values) - len(finite)}


def summarize(frames: list[dict], pairs: list[dict], methods: list[str]) -> dict:
    # VMAF is in every frame's metrics or in none (--no-vmaf).
    with_vmaf = any("vmaf" in f["metrics"][methods[0]] for f in frames)
    keys = ("psnr_y", "ssim_y", "psnr_rgb") + (("vmaf",) if with_vmaf else ())
    out = {}
    for subset in ("all", NEAR, FAR):
        fs = [f for f in frames if subset == "all" or f["subset"] == subset]
        ps = [p for p in pairs if subset == "all" or p["subset"] == subset]
        entry: dict = {"frames": len(fs), "pairs": len(ps), "methods": {}, "gain_over_generic": {}}
        for m in methods:
            entry["methods"][m] = {key: _stats([(f["index"], f["metrics"][m][key]) for f in fs], True)
                                   for key in keys}
            entry["methods"][m]["flicker"] = _stats([(p["index"], p["flicker"][m]) for p in ps], False)
        for m in methods:
            if m == "generic":
                continue
            gains = {key: [f["metrics"][m][key] - f["metrics"]["generic"][key] for f in fs]
                     for key in ("psnr_y", "ssim_y", "psnr_rgb")}
            g_y = [g for g in gains["psnr_y"] if math.isfinite(g)]
            fl = [p["flicker"][m] - p["flicker"]["generic"] for p in ps]
            entry["gain_over_generic"][m] = {
                "psnr_y_mean": float(np.mean(g_y)) if g_y else None,
                "psnr_y_median": float(np.median(g_y)) if g_y else None,
                "psnr_y_min": float(min(g_y)) if g_y else None,
                "psnr_y_max": float(max(g_y)) if g_y else None,
                "ssim_y_mean": float(np.mean(gains["ssim_y"])) if fs else None,
                "psnr_rgb_mean": _finite_mean(gains["psnr_rgb"]),
                "flicker_mean_change": float(np.mean(fl)) if fl else None,
                "frames_better": sum(g > 0 for g in g_y),
                "frames_worse": sum(g < 0 for g in g_y),
            }
            if with_vmaf:  # in VMAF points, per frame, like the Y-PSNR fields
                g_v = [f["metrics"][m]["vmaf"] - f["metrics"]["generic"]["vmaf"] for f in fs]
                entry["gain_over_generic"][m].update({
                    "vmaf_mean": float(np.mean(g_v)) if g_v else None,
                    "vmaf_median": float(np.median(g_v)) if g_v else None,
                    "vmaf_min": float(min(g_v)) if g_v else None,
                    "vmaf_max": float(max(g_v)) if g_v else None,
                    "vmaf_frames_better": sum(g > 0 for g in g_v),
                    "vmaf_frames_worse": sum(g < 0 for g in g_v),
                })
        out[subset] = entry
    return out


def _finite_mean(values):
    v = [x for x in values if math.isfinite(x)]
    return float(np.mean(v)) if v else None


def verdict(summary: dict) -> dict:
    def gain(subset):
        g = summary[subset]["gain_over_generic"].get("selftransfer", {})
        return g.get("psnr_y_mean") if summary[subset]["frames"] else None

    g_all, g_near, g_far = gain("all"), gain(NEAR), gain(FAR)
    parts = [f"self-transfer vs generic, mean Y-PSNR gain on {summary['all']['frames']} unseen frames: "
             f"{_db(g_all)}"]
    parts.append(f"near {_db(g_near)} ({summary[NEAR]['frames']} frames)")
    parts.append(f"far {_db(g_far)} ({summary[FAR]['frames']} frames)" if summary[FAR]["frames"]
                 else "far: no test frame is more than the near distance from a training frame")
    return {"selftransfer_beats_generic": bool(g_all is not None and g_all > 0), "gain_psnr_y_mean": g_all,
            "gain_psnr_y_mean_near": g_near, "gain_psnr_y_mean_far": g_far, "text": "; ".join(parts)}


def _db(x) -> str:
    return "n/a" if x is None else f"{x:+.3f} dB"


# -- CLI ------------------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.description = ("Compare bicubic, the generic CARN-M and a self-transfer bundle (also through the "
                          "deployed VapourSynth filter) on frames of VIDEO the bundle did not learn from, or, with "
                          "--reference, on the source VIDEO itself against REF, the same video at scale x the size.")
    parser.add_argument("video", help="the video the bundle was fitted on (with --reference: the low-resolution "
                                      "source that is upscaled)")
    parser.add_argument("--reference", metavar="REF",
                        help="score the upscaled source frames against REF, the same video at scale x the size "
                             "(frames paired by index and timestamp); without it, the video's own frames are the "
                             "ground truth and their degradation the input")
    parser.add_argument("--model", "-m", required=True, help="the model bundle (.stm) to evaluate")
    parser.add_argument("-o", "--output", required=True, help="report directory to create (must not exist)")
    parser.add_argument("--scale", type=int, help="check that the bundle upscales by this factor (2, 3, 4)")
    parser.add_argument("--degradation", help="LR degradation (default: the bundle's): bicubic, cv2_cubic, x264")
    parser.add_argument("--crf", type=int, help="x264 CRF of the x264 degradation (default: the bundle's, or 23)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--frames", type=int, default=DEFAULT_FRAMES,
                       help=f"number of test frames, sampled as consecutive pairs over the video "
                            f"(default {DEFAULT_FRAMES})")
    which.add_argument("--every", type=int, metavar="K", help="test frames K*n and K*n+1 (minus training frames)")
    which.add_argument("--all", dest="all_frames", action="store_true", help="test every unseen frame")
    parser.add_argument("--include-val", action="store_true",
                        help="also test the validation frames (they chose the shipped checkpoint: biased)")
    parser.add_argument("--assume-unseen", action="store_true",
                        help="evaluate a bundle that records no training frames, treating every frame as unseen "
                             "(only true if it learned nothing from this video)")
    parser.add_argument("--near-seconds", type=float, default=NEAR_SECONDS,
                        help=f"test frames within this many seconds of a training frame are 'near' "
                             f"(default {NEAR_SECONDS})")
    parser.add_argument("--generic", default="official",
                        help="generic model: 'official' (shipped in the package) or a .pth/.safetensors/.stm path")
    parser.add_argument("--no-deployed", dest="deployed", action="store_false",
                        help="skip the check through core.selftransfer.Upscale")
    parser.add_argument("--no-vmaf", dest="vmaf", action="store_false",
                        help="do not score VMAF (vmaf_v0.6.1 through the vmaf-torch package)")
    parser.add_argument("--force", action="store_true", help="replace REPORT_DIR if it holds an earlier report")
    parser.add_argument("--tile", type=int,
                        help=f"LR tile size for the networks (0 = whole frame; default whole frame up to "
                             f"{AUTO_TILE_MAX_PIXELS} LR pixels, else {AUTO_TILE}); overlap is {OVERLAP}")
    parser.add_argument("--seed", type=int, default=0, help="picks the frames inside each sampling stratum")
    parser.add_argument("--threads", type=int, default=0, help="PyTorch threads (0 = all cores)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda for the PyTorch runs")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    o = Options(video=args.video, model=args.model, output=args.output, scale=args.scale,
                degradation=args.degradation, crf=args.crf, frames=args.frames, every=args.every,
                all_frames=args.all_frames, include_val=args.include_val,
                assume_unseen=args.assume_unseen, near_seconds=args.near_seconds,
                generic=args.generic, deployed=args.deployed, force=args.force, tile=args.tile, seed=args.seed,
                threads=args.threads, device=args.device, progress=args.progress, reference=args.reference,
                vmaf=args.vmaf)
    report = evaluate(o)
    from selftransfer_trainer.evaluation.report import console_table
    print(console_table(report))
    print(f"report: {Path(o.output) / 'report.md'}")
    return 0
