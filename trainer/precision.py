"""Per-video bf16 gating: measure what computing the fp32 graph in bf16 costs on *this video's* held-out frames,
with the engine the runtime will use (OpenVINO on the CPU), and record it in the manifest's ``precision.bf16``.

The runtime's ``precision="auto"`` uses bf16 only where this record says ``accepted`` (loss within ``BUDGET_DB``,
the int8 gate's budget) and the CPU computes bf16 natively (AVX512-BF16 or AMX): see
vs_selftransfer.runtime.precision_choice. bf16 keeps 8 bits of mantissa; OpenVINO accumulates in fp32, so the
loss is usually a few thousandths of a dB, but it depends on the content and the weights, hence the measurement.

Where this CPU has no native bf16, OpenVINO cannot compute it (it refuses, and an emulation would not give the
engine's numbers): the record then says it was not measured, and auto never picks bf16 for the bundle.
"""
from __future__ import annotations

import time

import numpy as np

from selftransfer_trainer.quantize import BUDGET_DB

ENGINE = "ov"


def run_frames(onnx: bytes, precision: str, frames: list[np.ndarray], scale: int, threads: int = 0, *,
               engine: str = ENGINE, float_layers: str = "fp32") -> tuple[list[np.ndarray], float]:
    """SR outputs (C, sH, sW) float32 of ``frames`` ((C, H, W) float32, one size) and the mean seconds per frame,
    computed the way the runtime's backend ``engine`` ("ov" or "ort") computes them: whole frames, the same engine
    and options (OpenVINO compiled for the frame's static shape, as the runtime compiles for its window)."""
    h, w = frames[0].shape[1:]
    x = np.zeros((1, 3, h, w), np.float32)
    if engine == "ort":
        from vs_selftransfer.backend_ort import make_session, session_runner

        compute, close = session_runner(make_session(onnx, threads=threads)), (lambda: None)
    else:
        from vs_selftransfer.backend_ov import open_engine

        member = "model.int8.onnx" if precision == "int8" else "model.onnx"
        opened = open_engine(onnx, what=f"{member} ({precision})", precision=precision, threads=threads,
                             window=(h, w), float_layers=float_layers)
        out = np.empty((1, 3, h * scale, w * scale), np.float32)

        def compute(x):
            opened.infer_into(x, out)
            return out
        close = opened.close
    try:
        compute(x)  # the first call allocates the engine's memory: not timed
        outs, elapsed = [], 0.0
        for img in frames:
            x[0] = img
            t = time.perf_counter()
            sr = compute(x)
            elapsed += time.perf_counter() - t
            outs.append(np.array(sr[0], np.float32))  # a copy: the ov engine reuses its output array
        return outs, elapsed / len(frames)
    finally:
        close()


def held_out(val_pairs: list[tuple[np.ndarray, np.ndarray]], what: str) -> tuple[list, list]:
    """(LR inputs (C, H, W) float32, HR references (C, sH, sW) float64) of held-out (LR, HR) RGB uint8 HWC pairs,
    which must be of one size (the engines are compiled for it)."""
    lrs = [np.ascontiguousarray(lr.transpose(2, 0, 1), np.float32) / 255.0 for lr, _ in val_pairs]
    hrs = [hr.transpose(2, 0, 1).astype(np.float64) / 255.0 for _, hr in val_pairs]
    if len({x.shape for x in lrs}) != 1:
        raise ValueError(f"{what} needs validation frames of one size")
    return lrs, hrs


def score_graph(onnx: bytes, precision: str, frames: tuple[list, list], scale: int, threads: int = 0, *,
                engine: str = ENGINE, float_layers: str = "fp32") -> tuple[list[float], float]:
    """Y-PSNR of each held-out frame (``held_out``'s pair of lists) computed by ``run_frames``, and its seconds per
    frame."""
    from selftransfer_trainer.metrics import psnr_y, quantize

    lrs, hrs = frames
    outs, seconds = run_frames(onnx, precision, lrs, scale, threads, engine=engine, float_layers=float_layers)
    return [psnr_y(quantize(sr), hr, scale) for sr, hr in zip(outs, hrs)], seconds


def measure_bf16(onnx_fp32: bytes, val_pairs: list[tuple[np.ndarray, np.ndarray]], scale: int, *,
                 budget_db: float | None = None, threads: int = 0, flags=None) -> dict:
    """The manifest record ``precision.bf16`` for a graph: ``val_pairs`` are (LR, HR) RGB uint8 HWC held-out frames.

    Same fields as the int8 record (trainer/quantize.py): accepted, engine, budget_db, val_psnr_y_fp32,
    val_psnr_y_bf16, loss_db, worst_frame_loss_db, s_per_val_frame, plus the CPU feature that made bf16 native."""
    from vs_selftransfer.backend_base import NATIVE_FLAGS, native_support

    budget_db = BUDGET_DB if budget_db is None else budget_db
    if not val_pairs:
        raise ValueError("bf16 gating needs held-out validation frames")
    native = native_support("bf16", flags)
    record = {"engine": ENGINE, "budget_db": budget_db}
    if native is None:
        return dict(record, accepted=False, measured=False,
                    reason=f"not measured: the CPU fit ran on has no native bf16 ({'/'.join(NATIVE_FLAGS['bf16'])})")
    frames = held_out(val_pairs, "bf16 gating")
    scores, seconds = {}, {}
    for precision in ("fp32", "bf16"):
        scores[precision], seconds[precision] = score_graph(onnx_fp32, precision, frames, scale, threads)
    loss = float(np.mean(scores["fp32"]) - np.mean(scores["bf16"]))
    return dict(record, accepted=bool(loss <= budget_db), measured=True, native=native,
                val_psnr_y_fp32=float(np.mean(scores["fp32"])), val_psnr_y_bf16=float(np.mean(scores["bf16"])),
                loss_db=loss, worst_frame_loss_db=float(max(f - b for f, b in zip(scores["fp32"], scores["bf16"]))),
                frames=len(val_pairs), s_per_val_frame=seconds)
