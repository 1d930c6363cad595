"""ONNX Runtime backend (``ort``): the CPU default. Opens only ``model.onnx`` (or ``model.int8.onnx``), which are
data: a bundle from a stranger runs no code of its own here. CUDA execution provider when device is cuda and the
onnxruntime-gpu build is installed.
"""
from __future__ import annotations

import os

import numpy as np

from vs_selftransfer.backend_base import check_args, check_input, onnx_member, parse_device

DEVICES = ("cpu", "cuda")
# The graph's input and output names (trainer/export.py writes them; the int8 graph keeps them).
INPUT, OUTPUT = "lr", "sr"


def make_session(graph: bytes | str | os.PathLike, *, threads: int = 0, device: str = "cpu"):
    """The one ONNX Runtime session builder: this backend, validation during training, the export check and the
    int8 measurement all run the graph with these options, so what the trainer measures is what the filter runs.

    ``graph``: the serialized model or a file path. ``threads``: intra-op threads (0: ONNX Runtime's default, one
    per physical core). ``device``: "cpu", or "cuda[:N]" (CUDA execution provider, CPU fallback for what it lacks).
    """
    import onnxruntime as ort

    kind, index = parse_device(device)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    # One frame at a time, each node in turn: the parallelism is inside the convolutions (intra-op threads).
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
    source = graph if isinstance(graph, bytes) else os.fspath(graph)
    return ort.InferenceSession(source, opts, providers=providers)


def session_runner(session):
    """The ``run`` callable the tiling function wants, for a session of one of our graphs: (N, 3, h, w) float32
    -> (N, 3, sh, sw) float32, an array the caller owns."""
    return lambda x: session.run([OUTPUT], {INPUT: x})[0]


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
        _, _, self.window = check_args(self.name, bundle, device, precision, threads, window, devices=DEVICES)
        if precision in ("fp16", "bf16"):
            raise ValueError(f"the ort backend runs fp32 (and int8 when the bundle has one), not {precision}: "
                             f"for bf16 use the ov backend on a CPU with native bf16, for fp16 the trt or torch "
                             f"backend on CUDA")
        if (reason := available(device)) is not None:
            raise RuntimeError(f"the ort backend cannot run on {device!r}: {reason}")
        member = onnx_member(bundle, precision)
        try:
            self.session = make_session(bundle.member(member), threads=threads, device=device)
        except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
            raise RuntimeError(f"{bundle.path}: ONNX Runtime cannot load {member}: {e}") from None
        self._run = session_runner(self.session)
        self.scale = bundle.scale
        self.precision = precision
        self.device = device
        self.description = (f"ort {self.session.get_providers()[0]} {precision}, "
                            f"{threads or os.cpu_count()} threads")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.name, x, self.window)
        try:
            # run() hands back an array that owns its memory: no copy after the engine's own output write.
            return self._run(x)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"ort backend: inference failed on input {x.shape}: {e}") from None
