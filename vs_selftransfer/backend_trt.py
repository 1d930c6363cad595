"""TensorRT backend (``trt``, CUDA only, optional: ``pip install 'selftransfer[tensorrt]'``).

A TensorRT engine is tied to what it was built for: the input shape range, the precision, the TensorRT version
and the GPU (compute capability). This backend uses the bundle's own engine (``model.trt.ts``, built at export on a
GPU machine) when it fits all of those; otherwise it builds a static engine for exactly this window from the
bundle's weights and caches it in ``~/.cache/selftransfer/engines/<key>.ts``, where ``key`` hashes everything that
shapes an engine (model hash, shape, precision, torch/torch-tensorrt/TensorRT versions, GPU name and compute
capability), so a later run with the same key loads it in a second instead of building it in minutes.
Engines carry code (TorchScript): the bundle's engine is only opened because the user chose ``backend="trt"``.
Built engines are checked against the weights before use and before caching.
"""
from __future__ import annotations

import hashlib
import io
import os
import json
import warnings
from pathlib import Path

import numpy as np

from vs_selftransfer.backend_base import check_args, check_input, parse_device

DEVICES = ("cuda",)
PRECISIONS = ("fp16", "fp32")


def available(device: str = "cuda") -> str | None:
    """None when this backend can run on ``device``, else the reason and what to install."""
    try:
        kind, index = parse_device(device)
    except ValueError as e:
        return str(e)
    if kind != "cuda":
        return f"TensorRT runs only on NVIDIA GPUs: use device 'cuda' (not {device!r}) or another backend on the CPU"
    try:
        import torch
    except ImportError:
        return "PyTorch is not installed (pip install torch 'selftransfer[tensorrt]')"
    if not torch.cuda.is_available():
        return "no CUDA device is available (torch.cuda.is_available() is False); the trt backend needs an NVIDIA GPU"
    if index >= torch.cuda.device_count():
        return f"there is no CUDA device {index} (PyTorch sees {torch.cuda.device_count()})"
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "torch-tensorrt is not installed (pip install 'selftransfer[tensorrt]')"
    except Exception as e:  # noqa: BLE001 - a CUDA/TensorRT mismatch fails at import in many ways
        return f"torch-tensorrt does not import ({e}); reinstall 'selftransfer[tensorrt]' matching your torch/CUDA"
    return None


def engine_dir() -> Path:
    base = os.environ.get("SELFTRANSFER_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "selftransfer")
    return Path(base) / "engines"


def machine_facts(device) -> dict:
    """What a TensorRT engine depends on besides the model, shape and precision."""
    import torch
    from importlib import metadata

    def version(dist):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    major, minor = torch.cuda.get_device_capability(device)
    return {
        "gpu": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
        "tensorrt": version("tensorrt"),
        "torch_tensorrt": version("torch-tensorrt"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }


def engine_key(model_sha256: str, shape: tuple[int, ...], precision: str, facts: dict) -> str:
    """The cache key: a hash of everything that shapes a built engine."""
    spec = {"model": model_sha256, "shape": list(shape), "precision": precision, **facts}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:32]


def bundle_engine_fits(info, precision: str, window, facts: dict) -> str | None:
    """None when the bundle's engine (manifest "tensorrt" block) serves this call, else why it does not."""
    if not isinstance(info, dict):
        return "the bundle has no TensorRT engine (export it on a GPU machine to include one)"
    if info.get("precision") != precision:
        return f"the bundle's engine is {info.get('precision')}, not {precision}"
    for key in ("compute_capability", "tensorrt"):
        if info.get(key) != facts[key]:
            return f"the bundle's engine was built for {key} {info.get(key)}, this machine has {facts[key]}"
    if window is not None:
        lo, hi = info.get("min_shape"), info.get("max_shape")
        try:
            fits = all(lo[i] <= v <= hi[i] for i, v in ((0, 1), (1, 3), (2, window[0]), (3, window[1])))
        except (TypeError, IndexError, KeyError):
            return "the bundle's engine does not record its shape range"
        if not fits:
            return f"the window {window} is outside the bundle engine's range {lo}..{hi}"
    return None


class Backend:
    name = "trt"

    def __init__(self, bundle, *, device: str = "cuda", precision: str = "fp16", threads: int = 0,
                 window: tuple[int, int] | None = None):
        kind, index, self.window = check_args(self.name, bundle, device, precision, threads, window, devices=DEVICES)
        if precision not in PRECISIONS:
            raise ValueError(f"the trt backend builds fp16 or fp32 engines, not {precision}")
        if (reason := available(device)) is not None:
            raise RuntimeError(f"the trt backend cannot run on {device!r}: {reason}")
        import torch
        import torch_tensorrt  # noqa: F401 - registers the TensorRT engine class the TorchScript refers to

        self._torch = torch
        self.torch_device = torch.device("cuda", index)
        self.dtype = torch.float16 if precision == "fp16" else torch.float32
        facts = machine_facts(self.torch_device)
        why_not = bundle_engine_fits(bundle.manifest.get("tensorrt"), precision, self.window, facts) \
            if bundle.has("model.trt.ts") else "the bundle has no TensorRT engine"
        if why_not is None:
            self.module = self._load(bundle.member("model.trt.ts"), f"{bundle.path}: model.trt.ts")
            self.source = "model.trt.ts"
        else:
            if self.window is None:
                raise ValueError(f"{bundle.path}: {why_not}, and the trt backend needs a window (h, w) to build one")
            shape = (1, 3, *self.window)
            key = engine_key(bundle.sha256, shape, precision, facts)
            path = engine_dir() / f"{key}.ts"
            self.module = self._cached(path) or self._build(bundle, shape, precision, path)
            self.source = str(path)
        self.scale = bundle.scale
        self.precision = precision
        self.device = device
        self.description = f"trt {facts['gpu']} {precision}, engine {self.source}"

    def _load(self, data: bytes, what: str):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                return self._torch.jit.load(io.BytesIO(data), map_location=self.torch_device).eval()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"{what}: cannot load the TensorRT engine: {e}") from None

    def _cached(self, path: Path):
        if not path.is_file():
            return None
        try:
            return self._load(path.read_bytes(), str(path))
        except (RuntimeError, OSError):
            return None  # stale or damaged cache entry: rebuild it (and overwrite it atomically)

    def _build(self, bundle, shape, precision, path: Path):
        from selftransfer_trainer.export import TRT_FP16_TOLERANCE, _check_graph, tensorrt_bytes, trt_check_shapes
        from vs_selftransfer.files import atomic_write

        model = bundle.torch_model()
        shapes = {"min": shape, "opt": shape, "max": shape}
        data, _ = tensorrt_bytes(model, shapes, precision, self.torch_device)
        module = self._load(data, f"engine built for {bundle.path}")
        # fp32 engines convolve in TF32 on Ampere and later (10-bit mantissa, like fp16): the same bound applies.
        tolerance = TRT_FP16_TOLERANCE

        def run(x):
            with self._torch.inference_mode():
                return module(self._torch.from_numpy(x).to(self.torch_device, self.dtype)).float().cpu().numpy()
        # A failing check raises ExportCheckError: a wrong engine is never used nor cached.
        _check_graph(f"TensorRT engine for {bundle.path}", lambda: run, model.eval(), tolerance,
                     shapes=trt_check_shapes(shapes))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError as e:
            warnings.warn(f"could not cache the TensorRT engine in {path}: {e}", stacklevel=3)
        return module

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.name, x, self.window)
        torch = self._torch
        try:
            with torch.inference_mode():
                y = self.module(torch.from_numpy(x).to(self.torch_device, self.dtype, non_blocking=False))
            return y.to("cpu", torch.float32).numpy()
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"trt backend: inference failed on input {x.shape}: {e}") from None
