"""TensorRT backend (``trt``, CUDA only, optional: ``pip install 'selftransfer[tensorrt]'``).

A TensorRT engine is tied to what it was built for: the input shape range, the precision, the TensorRT version
and the GPU (compute capability). This backend uses the bundle's own engine (``model.trt.ts``, built at export on a
GPU machine) when it fits all of those; otherwise it builds a static engine for exactly this window from the
bundle's weights and caches it in ``~/.cache/selftransfer/engines/<key>.ts``, where ``key`` hashes everything that
shapes an engine (model hash, shape, precision, torch/torch-tensorrt/TensorRT versions, GPU name and compute
capability), so a later run with the same key loads it in a second instead of building it in minutes.
Engines carry code (TorchScript): the bundle's engine is only opened because the user chose ``backend="trt"``.
Built engines are checked against the weights before use and before caching.

Engine building lives here too (``tensorrt_bytes``): ``selftransfer export`` uses it for the bundle's engine.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from vs_selftransfer.backend_base import check_args, check_input, parse_device

DEVICES = ("cuda",)
PRECISIONS = ("fp16", "fp32")
# The bundle's engine profile (LR input, NCHW): from small tiles to a whole 1080p frame, tuned for whole 1080p frames.
TRT_SHAPES = {"min": (1, 3, 16, 16), "opt": (1, 3, 1080, 1920), "max": (1, 3, 1088, 1920)}
# An fp16 engine cannot meet the fp32 check bound: fp16 has an 11-bit mantissa (about 5e-4 relative on values near
# 1) and the error accumulates over CARN-M's ~40 convolutions. 2e-2 is about 5 levels of 8-bit output: it catches a
# broken engine (wrong weights, wrong layout, garbage) while accepting honest half-precision rounding. fp32 engines
# convolve in TF32 on Ampere and later (10-bit mantissa, like fp16): the same bound applies to them.
TRT_FP16_TOLERANCE = 2e-2


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


@contextlib.contextmanager
def _quiet():
    """Silence torch-tensorrt's build chatter and TorchScript's deprecation FutureWarning (TorchScript is what
    torch-tensorrt serializes engines to)."""
    logger = logging.getLogger("torch_tensorrt")
    level = logger.level
    try:
        logger.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        logger.setLevel(level)


def tensorrt_bytes(model, shapes: dict, precision: str = "fp16", device=None) -> tuple[bytes, dict]:
    """A TensorRT engine of ``model`` (a CARN) for the input range ``shapes`` (min/opt/max NCHW; all equal for a
    static engine), wrapped in TorchScript, and the facts that tie it to this machine (the manifest's ``tensorrt``
    block: GPU, TensorRT version, shapes, precision).

    For fp16 the model is cast to half before compiling, so the engine is fp16 by construction whatever TensorRT's
    typing mode (strong typing is the default from TensorRT 10); its input and output are then float16.
    """
    import tempfile

    import torch
    import torch_tensorrt

    if precision not in PRECISIONS:
        raise ValueError(f"TensorRT engines are built in fp16 or fp32, not {precision!r}")
    dtype = torch.half if precision == "fp16" else torch.float32
    device = device or torch.device("cuda", torch.cuda.current_device())
    net = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    spec = torch_tensorrt.Input(min_shape=shapes["min"], opt_shape=shapes["opt"], max_shape=shapes["max"],
                                dtype=dtype)
    with torch.no_grad(), torch.cuda.device(device):
        compiled = torch_tensorrt.compile(net, ir="dynamo", inputs=[spec], enabled_precisions={dtype},
                                          min_block_size=1, use_python_runtime=False)
        example = torch.rand(shapes["opt"], device=device, dtype=dtype)
        with tempfile.TemporaryDirectory() as tmp, _quiet():
            file = os.path.join(tmp, "model.trt.ts")
            torch_tensorrt.save(compiled, file, output_format="torchscript", arg_inputs=[example])
            data = Path(file).read_bytes()
    facts = machine_facts(device)
    info = {
        "precision": precision,
        "input_dtype": "float16" if precision == "fp16" else "float32",
        "min_shape": list(shapes["min"]),
        "opt_shape": list(shapes["opt"]),
        "max_shape": list(shapes["max"]),
        **{k: facts[k] for k in ("torch_tensorrt", "tensorrt", "cuda", "gpu", "compute_capability")},
    }
    return data, info


def load_engine(data: bytes, device=None):
    """A serialized engine (``model.trt.ts``) loaded on ``device`` (default: the current CUDA device), eval mode."""
    import torch
    import torch_tensorrt  # noqa: F401 - registers the TensorRT engine class the TorchScript refers to

    device = device or torch.device("cuda", torch.cuda.current_device())
    with _quiet():
        return torch.jit.load(io.BytesIO(data), map_location=device).eval()


def engine_runner(data: bytes, precision: str = "fp16", device=None):
    """The tiling function's ``run`` for a serialized engine: float32 numpy in and out, whatever the engine's type."""
    import torch

    from vs_selftransfer.model import torch_runner

    device = device or torch.device("cuda", torch.cuda.current_device())
    dtype = torch.half if precision == "fp16" else torch.float32
    return torch_runner(load_engine(data, device), device, channels_last=False, dtype=dtype)


def trt_check_shapes(shapes: dict) -> list[tuple[int, ...]]:
    """Check shapes inside an engine's profile: its smallest shape and an odd one near 37x53 (clamped to the range)."""
    lo, hi = shapes["min"], shapes["max"]
    odd = tuple(min(hi[i], max(lo[i], v)) for i, v in enumerate((1, 3, 37, 53)))
    return [tuple(lo)] if odd == tuple(lo) else [tuple(lo), odd]


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

        from vs_selftransfer.model import torch_runner

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
        self._run = torch_runner(self.module, self.torch_device, channels_last=False, dtype=self.dtype)
        self.scale = bundle.scale
        self.precision = precision
        self.device = device
        self.description = f"trt {facts['gpu']} {precision}, engine {self.source}"

    def _load(self, data: bytes, what: str):
        try:
            return load_engine(data, self.torch_device)
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
        from vs_selftransfer.files import atomic_write
        from vs_selftransfer.graph_check import check_graph
        from vs_selftransfer.model import torch_runner

        model = bundle.torch_model().eval()
        shapes = {"min": shape, "opt": shape, "max": shape}
        data, _ = tensorrt_bytes(model, shapes, precision, self.torch_device)
        module = self._load(data, f"engine built for {bundle.path}")
        run = torch_runner(module, self.torch_device, channels_last=False, dtype=self.dtype)
        # A failing check raises GraphCheckError: a wrong engine is never used nor cached.
        check_graph(f"the TensorRT engine built for {bundle.path}", lambda: run,
                    torch_runner(model, "cpu", channels_last=False), TRT_FP16_TOLERANCE,
                    shapes=trt_check_shapes(shapes))
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(path, data)
        except OSError as e:
            warnings.warn(f"could not cache the TensorRT engine in {path}: {e}", stacklevel=3)
        return module

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.name, x, self.window)
        try:
            return self._run(x)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"trt backend: inference failed on input {x.shape}: {e}") from None
