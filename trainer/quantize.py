"""Per-video int8 post-training quantization, shipped only inside a measured quality budget.

CARN-M is ~180 GFLOP per 640x360 frame; fp32 kernels on a laptop-class CPU cannot go much faster, int8 ones can.
Generic int8 calibration loses too much on some videos, so we calibrate on *this video's* training frames and
measure on *its* held-out validation frames, with the engine that will run it, and ship ``model.int8.onnx`` only
when the Y-PSNR loss against the fp32 graph is within ``BUDGET_DB``. The decision and the numbers go in the
manifest (``precision.int8``), so the runtime can pick int8 by default where it was accepted.

Recipe: static QDQ, per-channel symmetric int8 weights, uint8 activations, MinMax calibration on LR crops,
``reduce_range`` (7-bit: without it AVX2's u8*s8 pair-add saturates and costs 10+ dB; on a VNNI CPU it still
measured closer to fp32 than 8 bits, -0.021 vs -0.096 dB), and the layers that set the output's precision kept in
float: the mean shifts, the entry conv, the three top-level fusion convs, the upsampler and the exit conv
(quantizing them too ran 1.6x faster again but lost 0.31 dB).

The float layers run at the engine's precision. On a CPU with native bf16, OpenVINO can compute them in bf16:
measured on the sample clip (Zen 5, 640x360, 2 threads) the int8 graph took 0.29 s/frame with fp32 float layers
and 0.21 s with bf16 ones, against 0.36 s for the whole fp32 graph in bf16. Both variants are measured here and the
faster one within the budget is recorded (``float_layers``); the ov backend runs that variant
(vs_selftransfer.backend_ov.int8_float_layers), or fp32 float layers on a CPU without native bf16.
"""
from __future__ import annotations

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


def calibration_crops(calib_lr: list[np.ndarray], seed: int = 0) -> list[np.ndarray]:
    """The calibration set of the int8 graph (PTQ here, QAT in trainer/qat.py): CALIB_CROPS_PER_FRAME random
    CALIB_CROP-pixel crops of each LR frame (RGB uint8 HWC), as (1, 3, c, c) float32 in [0, 1]."""
    rng = np.random.default_rng(seed)
    crops = []
    for lr in calib_lr:
        h, w = lr.shape[:2]
        c = min(CALIB_CROP, h, w)
        for _ in range(CALIB_CROPS_PER_FRAME):
            y, x = int(rng.integers(0, h - c + 1)), int(rng.integers(0, w - c + 1))
            crops.append(np.ascontiguousarray(lr[y:y + c, x:x + c].transpose(2, 0, 1)[None], np.float32) / 255.0)
    return crops


def default_engine() -> str:
    from vs_selftransfer import backend_ov
    return "ov" if backend_ov.available("cpu") is None else "ort"


def ptq_graph(onnx_fp32: bytes, calib_lr: list[np.ndarray], seed: int = 0) -> tuple[bytes, dict]:
    """Post-training quantization (the module docstring's recipe) of the fp32 graph, calibrated on ``calib_lr``
    (RGB uint8 HWC LR frames). Returns the QDQ graph and the manifest's ``calibration`` record."""
    import onnx
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)
    from onnxruntime.quantization.shape_inference import quant_pre_process

    crops = calibration_crops(calib_lr, seed)

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
        data = Path(int8).read_bytes()
    return data, {"frames": len(calib_lr), "crops": len(crops), "crop": CALIB_CROP, "method": "MinMax",
                  "format": "QDQ per-channel s8 weights / u8 activations, reduce_range",
                  "float_layers": list(FLOAT_LAYERS), "seconds": time.perf_counter() - t0}


def quantize_for_video(onnx_fp32: bytes, calib_lr: list[np.ndarray], val_pairs: list[tuple[np.ndarray, np.ndarray]],
                       scale: int, *, budget_db: float | None = None, engine: str | None = None, threads: int = 0,
                       seed: int = 0, model=None, pairs_path: str | os.PathLike | None = None,
                       qat=None) -> tuple[bytes | None, dict]:
    """Make an int8 graph calibrated on ``calib_lr`` (RGB uint8 HWC LR frames) and measure it on ``val_pairs``
    ((lr, hr) RGB uint8 HWC). Returns (int8 graph bytes or None when rejected, report for the manifest).

    The int8 graph: with ``pairs_path`` (the video's training pairs file; ``model`` is then the CARN that
    ``onnx_fp32`` was exported from), quantization-aware fine-tuning (selftransfer_trainer.qat, settings ``qat``, a
    QATConfig; default: QATConfig with this seed and thread count); without, post-training quantization
    (``ptq_graph``)."""
    from selftransfer_trainer.precision import held_out, score_graph
    from vs_selftransfer.backend_base import native_support

    if not calib_lr or not val_pairs:
        raise ValueError("int8 calibration needs training frames and validation frames")
    if pairs_path is not None and model is None:
        raise ValueError("quantization-aware int8 needs both the model and the training pairs file")
    budget_db = BUDGET_DB if budget_db is None else budget_db
    engine = engine or default_engine()
    if pairs_path is not None:
        from selftransfer_trainer.qat import QATConfig, qat_graph

        data, calibration = qat_graph(model, pairs_path, calib_lr, qat or QATConfig(seed=seed, threads=threads))
    else:
        data, calibration = ptq_graph(onnx_fp32, calib_lr, seed)
    frames = held_out(val_pairs, "int8 gating")

    def measure(graph: bytes, precision: str, float_layers: str = "fp32") -> tuple[list[float], float]:
        return score_graph(graph, precision, frames, scale, threads, engine=engine, float_layers=float_layers)

    fp32_scores, fp32_s = measure(onnx_fp32, "fp32")
    # The int8 graph's float layers: fp32 everywhere, and bf16 too where this CPU computes it natively (OpenVINO
    # only); the fastest variant within the budget is the one recorded as what auto runs.
    layer_options = ["fp32"] + (["bf16"] if engine == "ov" and native_support("bf16") is not None else [])
    variants = {}
    for float_layers in layer_options:
        scores, seconds = measure(data, "int8", float_layers)
        loss = float(np.mean(fp32_scores) - np.mean(scores))
        variants[float_layers] = {
            "val_psnr_y_int8": float(np.mean(scores)), "loss_db": loss,
            "worst_frame_loss_db": float(max(f - q for f, q in zip(fp32_scores, scores))),
            "accepted": bool(loss <= budget_db), "s_per_val_frame": seconds}
    within = [k for k in layer_options if variants[k]["accepted"]]
    chosen = min(within, key=lambda k: variants[k]["s_per_val_frame"]) if within else "fp32"
    best = variants[chosen]
    accepted = best["accepted"]
    report = {
        "accepted": accepted,
        "engine": engine,
        "budget_db": budget_db,
        "float_layers": chosen,
        "val_psnr_y_fp32": float(np.mean(fp32_scores)),
        "val_psnr_y_int8": best["val_psnr_y_int8"],
        "loss_db": best["loss_db"],
        "worst_frame_loss_db": best["worst_frame_loss_db"],
        "frames": len(val_pairs),
        "s_per_val_frame": {"fp32": fp32_s, "int8": best["s_per_val_frame"]},
        "float_layer_variants": variants,
        "calibration": calibration,
    }
    return (data if accepted else None), report
