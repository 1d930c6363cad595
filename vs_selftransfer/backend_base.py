"""What the runtime backends (``backend_ort``, ``backend_ov``, ``backend_torch``, ``backend_trt``) share: the
argument checks and the call contract, so that every backend refuses the same bad arguments with the same words.

The contract (one ``Backend`` per stream; none is meant to be called from two threads at once):
``Backend(bundle, *, device="cpu", precision="fp32", threads=0, window=(h, w))`` opens the bundle's graph;
``backend(x)`` takes a C-contiguous float32 array (1, 3, h, w) in [0, 1] RGB and returns a new float32 array
(1, 3, s*h, s*w) that the caller owns. ``window`` fixes the input shape (engines are built for it, OpenVINO compiles
it statically); ``window=None`` accepts any (N, 3, H, W), at some cost for the static-shape backends.
``threads=0`` means every core.
"""
from __future__ import annotations

import numpy as np

from vs_selftransfer.bundle import Bundle

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
# /proc/cpuinfo flags that make a precision native on x86 CPUs: bf16 dot products (AVX512-BF16, AMX-BF16) and int8
# dot products without the AVX2 u8*s8 pair-add saturation (AVX512-VNNI, AVX-VNNI, AMX-INT8).
NATIVE_FLAGS = {"bf16": ("amx_bf16", "avx512_bf16"), "int8": ("amx_int8", "avx512_vnni", "avx_vnni")}


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags as Linux reports them (first processor of /proc/cpuinfo); empty where unreadable."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.partition(":")[2].split())
    except OSError:
        pass
    return frozenset()


def native_support(precision: str, flags=None) -> str | None:
    """The flag that makes ``precision`` native on this CPU (the fastest one, AMX first), or None."""
    flags = cpu_flags() if flags is None else flags
    return next((f for f in NATIVE_FLAGS.get(precision, ()) if f in flags), None)


def parse_device(device: str) -> tuple[str, int]:
    """"cpu" -> ("cpu", 0); "cuda" / "cuda:N" -> ("cuda", N); "gpu" / "gpu:N" (OpenVINO's Intel GPUs) -> ("gpu", N)."""
    if not isinstance(device, str):
        raise ValueError(f"device must be a string such as 'cpu' or 'cuda:0', not {device!r}")
    kind, sep, index = device.strip().lower().partition(":")
    if kind in ("cpu", "cuda", "gpu") and (not sep or index.isdigit()):
        if kind == "cpu" and sep:
            raise ValueError(f"device 'cpu' takes no index, not {device!r}")
        return kind, int(index) if sep else 0
    raise ValueError(f"device must be 'cpu', 'cuda', 'cuda:N', 'gpu' or 'gpu:N', not {device!r}")


def check_args(backend: str, bundle, device: str, precision: str, threads: int, window,
               *, devices: tuple[str, ...]) -> tuple[str, int, tuple[int, int] | None]:
    """Validate the constructor arguments every backend takes; returns (device kind, device index, window)."""
    if not isinstance(bundle, Bundle):
        raise ValueError(f"the {backend} backend needs an open vs_selftransfer.bundle.Bundle, "
                         f"not {type(bundle).__name__}")
    kind, index = parse_device(device)
    if kind not in devices:
        raise ValueError(f"the {backend} backend runs on {' or '.join(devices)}, not on device {device!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {list(PRECISIONS)}, not {precision!r}")
    if type(threads) is not int or threads < 0:
        raise ValueError(f"threads must be an integer >= 0 (0 = every core), not {threads!r}")
    if window is not None:
        try:
            h, w = window
            ok = type(h) is int and type(w) is int and h > 0 and w > 0
        except (TypeError, ValueError):
            ok = False
        if not ok:
            raise ValueError(f"window must be None or (height, width) positive integers, not {window!r}")
        window = (int(h), int(w))
    return kind, index, window


def onnx_member(bundle, precision: str) -> str:
    """The graph the ONNX-reading backends (ort, ov) open for ``precision``: the calibrated ``model.int8.onnx`` for
    int8 (ValueError when the bundle has none), else ``model.onnx``."""
    member = "model.int8.onnx" if precision == "int8" else "model.onnx"
    if not bundle.has(member):
        raise ValueError(f"{bundle.path}: precision int8 needs a calibrated model.int8.onnx, which this bundle "
                         f"does not have; use precision fp32")
    return member


def check_input(backend: str, x, window: tuple[int, int] | None) -> np.ndarray:
    """The array a backend may feed its engine: float32, C-contiguous, (1, 3, h, w) of the window (or any N/H/W)."""
    if not isinstance(x, np.ndarray):
        raise ValueError(f"{backend} backend: input must be a numpy array, not {type(x).__name__}")
    if x.dtype != np.float32:
        raise ValueError(f"{backend} backend: input must be float32, not {x.dtype}")
    if x.ndim != 4 or x.shape[1] != 3 or min(x.shape) < 1:
        raise ValueError(f"{backend} backend: input must have shape (N, 3, H, W), not {x.shape}")
    if window is not None and x.shape != (1, 3, *window):
        raise ValueError(f"{backend} backend: input shape {x.shape} is not the window this backend was opened "
                         f"for, {(1, 3, *window)}")
    return np.ascontiguousarray(x)
