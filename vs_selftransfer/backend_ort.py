"""ONNX Runtime backend (``ort``): the CPU default. Opens only ``model.onnx`` (or ``model.int8.onnx``), which are
data: a bundle from a stranger runs no code of its own here. CUDA execution provider when device is cuda and the
onnxruntime-gpu build is installed.
"""
from __future__ import annotations

import os

import numpy as np

from vs_selftransfer.backend_base import check_args, check_input, parse_device

DEVICES = ("cpu", "cuda")


def available(device: str = "cpu") -> str | None:
    """None when this backend can run on ``device``, else the reason and what to install."""
    try:
        kind, _ = parse_device(device)
    except ValueError as e:
        return str(e)
    try:
        import onnxruntime as ort
    except ImportError:
        return "ONNX Runtime is not installed (pip install onnxruntime)"
    if kind == "cpu":
        return None
    if kind == "cuda":
        if "CUDAExecutionProvider" in ort.get_available_providers():
            return None
        return ("this onnxruntime has no CUDA execution provider (pip install onnxruntime-gpu instead of "
                "onnxruntime), or use the trt/torch backend on CUDA")
    return f"the ort backend runs on cpu or cuda, not {device!r}"


class Backend:
    name = "ort"

    def __init__(self, bundle, *, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 window: tuple[int, int] | None = None):
        kind, index, self.window = check_args(self.name, bundle, device, precision, threads, window, devices=DEVICES)
        if precision in ("fp16", "bf16"):
            raise ValueError(f"the ort backend runs fp32 (and int8 when the bundle has one), not {precision}: "
                             f"for bf16 use the ov backend on a CPU with native bf16, for fp16 the trt or torch "
                             f"backend on CUDA")
        if (reason := available(device)) is not None:
            raise RuntimeError(f"the ort backend cannot run on {device!r}: {reason}")
        member = "model.int8.onnx" if precision == "int8" else "model.onnx"
        if not bundle.has(member):
            raise ValueError(f"{bundle.path}: precision int8 needs a calibrated model.int8.onnx, which this bundle "
                             f"does not have; use precision fp32")
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads  # 0: ONNX Runtime's default, one thread per physical core
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # No arena: it keeps the peak of every shape it saw (1.8 GB vs 0.9 GB peak RSS at 640x360).
        opts.enable_cpu_mem_arena = False
        opts.log_severity_level = 3  # errors only: its warnings are about the environment, not the call
        if kind == "cuda":
            providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(bundle.member(member), opts, providers=providers)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise RuntimeError(f"{bundle.path}: ONNX Runtime cannot load {member}: {e}") from None
        self.scale = bundle.scale
        self.precision = precision
        self.device = device
        self.description = (f"ort {self.session.get_providers()[0]} {precision}, "
                            f"{threads or os.cpu_count()} threads")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.name, x, self.window)
        try:
            # run() hands back an array that owns its memory: no copy after the engine's own output write.
            return self.session.run(["sr"], {"lr": x})[0]
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"ort backend: inference failed on input {x.shape}: {e}") from None
