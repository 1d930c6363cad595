"""What did the source go through? Estimate the degradation of a video the user holds, so that ``fit`` can
synthesize low-resolution training inputs the same way (the model then learns to undo what this source has).

- **Codec and quantiser, from the bitstream.** The decoder exports each frame's quantiser table (FFmpeg's
  ``AV_FRAME_DATA_VIDEO_ENC_PARAMS``, read through PyAV) for H.264 (and the other codecs FFmpeg exports it for);
  the source's quantiser is the mean QP over the macroblocks of the sampled frames. Intra-only lossless codecs
  (FFV1, Ut Video, PNG, raw...) and an H.264 stream at QP 0 are lossless.
- **Matching the synthetic degradation to it, by trial encodes.** The source case's x264 degradation codes each LR
  frame as part of a video of its neighbours (``trainer.pairs.video_coded_lr``: I-, P- and B-frames, like the
  source); for each candidate CRF, a run of the source's consecutive frames, downscaled as training inputs are, is
  encoded as a video and its mean QP read back the same way; the CRF whose QP is nearest the source's is the
  estimate. Matching the quantiser (the step size of the coefficient rounding, i.e. how much
  detail was thrown away) rather than the CRF number makes the estimate independent of the encoder's rate
  control and frame types.
- Only H.264 quantisers are on x264's QP scale. A lossy stream of another codec (whose quantiser scale differs:
  MPEG-2 qscale, VP9 q index...), or whose decoder exports no quantiser table, is matched at the project's
  default CRF (23), and the estimate says so.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

LOSSLESS_CODECS = frozenset({"ffv1", "ffvhuff", "huffyuv", "utvideo", "magicyuv", "png", "apng", "rawvideo",
                             "v210", "v410", "r210", "qtrle", "zlib", "lagarith", "flashsv", "tiff", "bmp"})
QP_LIKE_X264 = frozenset({"h264"})  # decoders whose exported QP is on x264's scale (0..51)
SAMPLE_FRAMES = 24  # frames whose quantiser tables are read (spread over the video)
TRIAL_FRAMES = 32  # consecutive frames, from the middle of the video, encoded as one video per candidate CRF
TRIAL_CRFS = tuple(range(14, 43))
DEFAULT_CRF = 23


@dataclass
class SourceEstimate:
    codec: str
    lossless: bool
    mean_qp: float | None  # over the sampled frames' macroblocks; None when the decoder exports no QP
    qp_by_frame_type: dict = field(default_factory=dict)  # {"I"/"P"/"B": mean QP}
    frames_measured: int = 0
    degradation: dict = field(default_factory=dict)  # what fit should synthesize: {"method", "scale"[, "crf"]}
    trial_qp: dict = field(default_factory=dict)  # {crf: mean QP of the trial encodes} that matched it
    how: str = ""  # one sentence: what was measured and what was concluded

    def to_dict(self) -> dict:
        return {"codec": self.codec, "lossless": self.lossless, "mean_qp": self.mean_qp,
                "qp_by_frame_type": dict(self.qp_by_frame_type), "frames_measured": self.frames_measured,
                "degradation": dict(self.degradation), "trial_qp": {str(k): v for k, v in self.trial_qp.items()},
                "how": self.how}


def frame_qp(frame) -> float | None:
    """Mean QP over a decoded frame's blocks (the decoder must have been opened with export_side_data
    venc_params), None when the frame carries no quantiser table."""
    import av

    params = frame.side_data.get(av.sidedata.sidedata.Type.VIDEO_ENC_PARAMS)
    if params is None or not params.nb_blocks:
        return None
    return float(np.mean(params.qp_map()))


_PICT = {1: "I", 2: "P", 3: "B"}


def stream_qp(path: str | os.PathLike, count: int = SAMPLE_FRAMES) -> tuple[str, dict[str, list[float]], int]:
    """(codec name, {frame type: [mean QP per frame]}, frames measured) over ``count`` frames spread over the
    video (every n-th decoded frame: QP needs decoding from a keyframe anyway, and short clips decode in seconds)."""
    from vs_selftransfer.probe import open_video, probe, video_stream

    info = probe(path)
    step = max(1, info.frames // count)
    by_type: dict[str, list[float]] = {}
    measured = 0
    with open_video(info.path) as container:
        stream = video_stream(info.path, container)
        # One decoding thread: with frame threading the exported tables of B-frames came out wrong (different on
        # every run); reading them costs little next to decoding.
        stream.codec_context.thread_count = 1
        stream.codec_context.thread_type = "NONE"
        stream.codec_context.options = {"export_side_data": "venc_params"}
        codec = stream.codec_context.name
        for n, frame in enumerate(container.decode(stream)):
            if n % step:
                continue
            qp = frame_qp(frame)
            if qp is None:
                continue
            by_type.setdefault(_PICT.get(int(frame.pict_type), "other"), []).append(qp)
            measured += 1
    return codec, by_type, measured


def x264_trial_qp(frames: list[np.ndarray], crf: int) -> float:
    """Mean QP x264 uses on ``frames`` (consecutive LR RGB uint8 frames) encoded as one video at ``crf``, as the
    x264 degradation with ``"coding": "video"`` does."""
    from selftransfer_trainer.degrade import x264_video_roundtrip

    return float(np.mean(x264_video_roundtrip(frames, crf, with_qp=True)[1]))


def match_crf(frames: list[np.ndarray], target_qp: float) -> tuple[int, dict[int, float]]:
    """The CRF whose trial encodes of ``frames`` have the mean QP nearest ``target_qp`` (QP grows with CRF, so a
    bisection over TRIAL_CRFS needs about five trials)."""
    lo, hi = 0, len(TRIAL_CRFS) - 1
    tried: dict[int, float] = {}

    def qp(i):
        c = TRIAL_CRFS[i]
        if c not in tried:
            tried[c] = x264_trial_qp(frames, c)
        return tried[c]

    while hi - lo > 1:
        mid = (lo + hi) // 2
        if qp(mid) < target_qp:
            lo = mid
        else:
            hi = mid
    best = min((lo, hi), key=lambda i: abs(qp(i) - target_qp))
    return TRIAL_CRFS[best], tried


def estimate_source(path: str | os.PathLike, scale: int) -> SourceEstimate:
    """Estimate the degradation of the video at ``path`` and the matching synthetic one for training at
    ``scale`` (see the module docstring)."""
    from selftransfer_trainer.degrade import crop_to_scale, imresize
    from selftransfer_trainer.video import read_frames
    from vs_selftransfer.probe import probe

    codec, by_type, measured = stream_qp(path)
    all_qp = [q for qs in by_type.values() for q in qs]
    mean_qp = float(np.mean(all_qp)) if all_qp else None
    per_type = {t: float(np.mean(q)) for t, q in sorted(by_type.items())}
    est = SourceEstimate(codec=codec, lossless=False, mean_qp=mean_qp, qp_by_frame_type=per_type,
                         frames_measured=measured)
    if codec in LOSSLESS_CODECS or (mean_qp is not None and mean_qp == 0.0):
        est.lossless = True
        est.degradation = {"method": "bicubic", "scale": scale}
        est.how = (f"{codec} stream" + (" at QP 0" if codec not in LOSSLESS_CODECS else "") +
                   " is lossless: training inputs are the frames downscaled (MATLAB bicubic), nothing more")
        return est
    if mean_qp is None or codec not in QP_LIKE_X264:
        est.degradation = {"method": "x264", "scale": scale, "crf": DEFAULT_CRF, "coding": "video"}
        why = ("exports no quantiser table" if mean_qp is None else
               f"has a quantiser (mean {mean_qp:.1f}) on another scale than x264's")
        est.how = (f"the {codec} stream {why}, so the source's compression cannot be matched; training inputs "
                   f"are downscaled and x264-encoded as a video at the default CRF {DEFAULT_CRF}")
        return est
    info = probe(path)
    start = max(0, (info.frames - TRIAL_FRAMES) // 2)
    run = range(start, min(info.frames, start + TRIAL_FRAMES))
    lr = [imresize(crop_to_scale(rgb, scale), 1.0 / scale) for _, _, rgb in read_frames(path, run)]
    crf, tried = match_crf(lr, mean_qp)
    est.degradation = {"method": "x264", "scale": scale, "crf": crf, "coding": "video"}
    est.trial_qp = dict(sorted(tried.items()))
    est.how = (f"{codec} stream, mean QP {mean_qp:.1f} over {measured} frames "
               f"({', '.join(f'{t} {q:.1f}' for t, q in per_type.items())}); x264 at CRF {crf} gives QP "
               f"{tried[crf]:.1f} on {len(lr)} downscaled frames coded as a video: training inputs are downscaled "
               f"and x264-encoded as a video at CRF {crf}")
    return est
