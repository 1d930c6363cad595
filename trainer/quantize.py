"""Per-video int8 post-training quantization, shipped only inside a measured quality budget.

CARN-M is ~180 GFLOP per 640x360 frame; fp32 kernels on a laptop-class CPU cannot go much faster, int8 ones can.
Generic int8 calibration loses too much on some videos, so we calibrate on *this video's* training frames and
measure on *its* held-out validation frames, with the engine that will run it, and ship ``model.int8.onnx`` only
when the Y-PSNR loss against the fp32 graph is within ``BUDGET_DB``. The decision and the numbers go in the
manifest (``precision.int8``), so the runtime can pick int8 by default where it was accepted.

Recipe (measured on the sample clip, AMD EPYC Zen 3, AVX2, no VNNI): static QDQ, per-channel symmetric int8
weights, uint8 activations, MinMax calibration on LR crops, ``reduce_range`` (7-bit: without it AVX2's
u8*s8 pair-add saturates and costs 10+ dB), and the layers that set the output's precision kept in float:
the mean shifts, the entry conv, the three top-level fusion convs, the upsampler and the exit conv.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
import time
from pathlib import Path

import numpy as np

BUDGET_DB = 0.05
# Conv weights whose names start with these stay in float (see the module docstring).
FLOAT_LAYERS = ("sub_mean.", "add_mean.", "entry.", "c1.", "c2.", "c3.", "upsample.", "exit.")
CALIB_CROP = 128
CALIB_CROPS_PER_FRAME = 4


@contextlib.contextmanager
def _engine_runner(graph: bytes, engine: str, precision: str, threads: int, scale: int):
    """A callable (1,3,h,w) float32 -> (1,3,sh,sw) for a graph, opened as the runtime's backend for ``engine`` opens
    it (``backend_ov.open_engine``, ``backend_ort.make_session``); closed when the block ends."""
    if engine == "ov":
        from vs_selftransfer.backend_ov import open_engine

        compiled = open_engine(graph, what=f"the {precision} graph", precision=precision, threads=threads)

        def run(x):
            out = np.empty((x.shape[0], x.shape[1], x.shape[2] * scale, x.shape[3] * scale), np.float32)
            compiled.infer_into(np.ascontiguousarray(x), out)
            return out
        try:
            yield run
        finally:
            compiled.close()
        return
    from vs_selftransfer.backend_ort import make_session, session_runner

    yield session_runner(make_session(graph, threads=threads))


def default_engine() -> str:
    from vs_selftransfer import backend_ov
    return "ov" if backend_ov.available("cpu") is None else "ort"


def quantize_for_video(onnx_fp32: bytes, calib_lr: list[np.ndarray], val_pairs: list[tuple[np.ndarray, np.ndarray]],
                       scale: int, *, budget_db: float | None = None, engine: str | None = None, threads: int = 0,
                       seed: int = 0) -> tuple[bytes | None, dict]:
    """Calibrate an int8 graph on ``calib_lr`` (RGB uint8 HWC LR frames) and measure it on ``val_pairs``
    ((lr, hr) RGB uint8 HWC). Returns (int8 graph bytes or None when rejected, report for the manifest)."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from selftransfer_trainer.metrics import psnr_y, quantize
    from vs_selftransfer.tiling import upscale_image

    if not calib_lr or not val_pairs:
        raise ValueError("int8 calibration needs training frames and validation frames")
    budget_db = BUDGET_DB if budget_db is None else budget_db
    engine = engine or default_engine()
    rng = np.random.default_rng(seed)
    crops = []
    for lr in calib_lr:
        h, w = lr.shape[:2]
        c = min(CALIB_CROP, h, w)
        for _ in range(CALIB_CROPS_PER_FRAME):
            y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            crops.append(np.ascontiguousarray(lr[y:y + c, x:x + c].transpose(2, 0, 1)[None], np.float32) / 255.0)

    class Crops(CalibrationDataReader):
        def __init__(self):
            self.it = iter(crops)

        def get_next(self):
            x = next(self.it, None)
            return None if x is None else {"lr": x}

    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="selftransfer-int8-") as tmp:
        fp32, pre, int8 = (os.path.join(tmp, n) for n in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        Path(fp32).write_bytes(onnx_fp32)
        quant_pre_process(fp32, pre, skip_symbolic_shape=True)
        graph = onnx.load(pre)
        keep_float = [n.name for n in graph.graph.node
                      if n.op_type == "Conv" and len(n.input) > 1 and n.input[1].startswith(FLOAT_LAYERS)]
        quantize_static(pre, int8, Crops(), quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=keep_float,
                        extra_options={"WeightSymmetric": True, "ActivationSymmetric": False})
        calib_s = time.perf_counter() - t0
        scores = {}
        seconds = {}
        graphs = {"fp32": onnx_fp32, "int8": Path(int8).read_bytes()}
        for name, graph in graphs.items():
            with _engine_runner(graph, engine, name, threads, scale) as run:
                run(np.zeros((1, 3, 16, 16), np.float32))  # build/compile before timing
                t = time.perf_counter()
                vals = []
                for lr, hr in val_pairs:
                    img = lr.transpose(2, 0, 1).astype(np.float32) / 255.0
                    sr = upscale_image(run, img, scale)
                    vals.append(psnr_y(quantize(sr), hr.transpose(2, 0, 1).astype(np.float64) / 255.0, scale))
                seconds[name] = (time.perf_counter() - t) / len(val_pairs)
            scores[name] = vals
        data = graphs["int8"]
    loss = float(np.mean(scores["fp32"]) - np.mean(scores["int8"]))
    accepted = loss <= budget_db
    report = {
        "accepted": accepted,
        "engine": engine,
        "budget_db": budget_db,
        "val_psnr_y_fp32": float(np.mean(scores["fp32"])),
        "val_psnr_y_int8": float(np.mean(scores["int8"])),
        "loss_db": loss,
        "worst_frame_loss_db": float(max(f - q for f, q in zip(scores["fp32"], scores["int8"]))),
        "s_per_val_frame": {"fp32": seconds["fp32"], "int8": seconds["int8"]},
        "calibration": {"frames": len(calib_lr), "crops": len(crops), "crop": CALIB_CROP, "method": "MinMax",
                        "format": "QDQ per-channel s8 weights / u8 activations, reduce_range",
                        "float_layers": list(FLOAT_LAYERS), "seconds": calib_s},
    }
    return (data if accepted else None), report
