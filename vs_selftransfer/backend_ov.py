"""OpenVINO backend (``ov``, optional: ``pip install openvino``). Reads ``model.onnx`` (or ``model.int8.onnx``) from
memory, as data, and compiles it for the static window shape (OpenVINO is faster on static shapes). Precision bf16
only where the CPU computes it natively (AVX512_BF16 / AMX): elsewhere OpenVINO would silently fall back to fp32,
so we refuse instead of pretending.
"""
from __future__ import annotations

import sys
import threading

import numpy as np

from vs_selftransfer.backend_base import check_args, check_input, parse_device

DEVICES = ("cpu", "gpu")
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: QDQ layers run int8, the rest f32
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}


def available(device: str = "cpu") -> str | None:
    """None when this backend can run on ``device``, else the reason and what to install."""
    try:
        kind, index = parse_device(device)
    except ValueError as e:
        return str(e)
    try:
        ov = import_openvino()
    except ImportError as e:
        return _import_failure(e)
    if kind == "cpu":
        return None
    if kind == "cuda":
        return "OpenVINO does not run on NVIDIA GPUs (its GPU plugin is for Intel GPUs): use the trt or torch backend"
    target = _ov_device(kind, index)
    try:
        devices = ov.Core().available_devices
    except Exception as e:  # noqa: BLE001
        return f"OpenVINO cannot list its devices: {e}"
    return None if target in devices else f"OpenVINO sees no {target} device (it has {devices})"


def import_openvino():
    """``import openvino``, without its usage telemetry.

    Importing openvino imports its model converter, which (unless the user opted out) sends a usage event to
    Google Analytics from a forked child process. In a multi-threaded VapourSynth host a fork can deadlock, and a
    video filter has no business phoning home: with its telemetry package hidden, OpenVINO uses its own no-op stub.
    """
    if "openvino" not in sys.modules:
        sys.modules.setdefault("openvino_telemetry", None)
    import openvino
    return openvino


def _import_failure(error: ImportError) -> str:
    import importlib.util

    try:
        installed = importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return "OpenVINO is not installed (pip install openvino, or pip install 'selftransfer[openvino]')"
    first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if "mismatches with OpenVINO Runtime library version" in str(error):
        return ("OpenVINO is installed but cannot load in this process: another OpenVINO runtime library was loaded "
                "first, typically by vs-mlrt's core.ov plugin (vapoursynth-mlrt-ov), which VapourSynth autoloads "
                "when the core is created. Import openvino before creating the VapourSynth core, or use the ort "
                f"backend. ({first})")
    return f"OpenVINO is installed but does not import: {first}"


def _ov_device(kind: str, index: int) -> str:
    return "CPU" if kind == "cpu" else ("GPU" if index == 0 else f"GPU.{index}")


class Backend:
    name = "ov"

    def __init__(self, bundle, *, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 window: tuple[int, int] | None = None):
        kind, index, self.window = check_args(self.name, bundle, device, precision, threads, window, devices=DEVICES)
        if (reason := available(device)) is not None:
            raise RuntimeError(f"the ov backend cannot run on {device!r}: {reason}")
        member = "model.int8.onnx" if precision == "int8" else "model.onnx"
        if not bundle.has(member):
            raise ValueError(f"{bundle.path}: precision int8 needs a calibrated model.int8.onnx, which this bundle "
                             f"does not have; use precision fp32")
        ov = import_openvino()
        core = ov.Core()
        target = _ov_device(kind, index)
        if precision in _CAPABILITY:
            caps = core.get_property(target, "OPTIMIZATION_CAPABILITIES")
            if _CAPABILITY[precision] not in caps:
                raise ValueError(f"precision {precision} needs a {target} that computes it natively "
                                 f"({'AVX512_BF16 or AMX' if precision == 'bf16' else 'FP16 units'}); this one "
                                 f"offers {list(caps)}: use fp32")
        try:
            model = core.read_model(model=bundle.member(member))  # bytes: parsed as ONNX data, nothing executed
            if self.window is not None:
                model.reshape({model.input(0): ov.PartialShape([1, 3, *self.window])})
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise RuntimeError(f"{bundle.path}: OpenVINO cannot read {member}: {e}") from None
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": _HINTS[precision],
        }
        if threads and kind == "cpu":
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(model, target, config)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"{bundle.path}: OpenVINO cannot compile {member} for {target}: {e}") from None
        actual = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if actual != _HINTS[precision]:  # OpenVINO falls back silently; a bf16 run must really be bf16
            raise ValueError(f"OpenVINO compiled precision {precision} as {actual} on this {target}: use fp32")
        self.request = self.compiled.create_infer_request()
        self._ov = ov
        self._lock = threading.Lock()  # an infer request is not reentrant; a backend per stream avoids waiting here
        self.scale = bundle.scale
        self.precision = precision
        self.device = device
        self.description = f"ov {target} {precision} ({actual}), {threads or 'all'} threads, window {self.window}"

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.name, x, self.window)
        n, c, h, w = x.shape
        out = np.empty((n, c, h * self.scale, w * self.scale), np.float32)
        ov = self._ov
        try:
            with self._lock:
                # Both tensors wrap our arrays: OpenVINO reads x in place and writes straight into ``out``.
                self.request.set_input_tensor(ov.Tensor(x, shared_memory=True))
                self.request.set_output_tensor(ov.Tensor(out, shared_memory=True))
                self.request.infer()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"ov backend: inference failed on input {x.shape}: {e}") from None
        return out
