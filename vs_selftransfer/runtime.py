"""The Python half of ``core.selftransfer.Upscale``: argument checks, backend choice, and the per-frame call.

The C plugin (vs_selftransfer/plugin/selftransfer.c) calls :func:`create` once per ``Upscale`` call, at script
evaluation, with every argument but the clip (absent ones as None) plus the clip's size. ``create`` validates them
all, opens and verifies the bundle, and opens ``num_streams`` backend sessions, so that every mistake is reported
before the first frame. The plugin then calls :meth:`Upscaler.process` for each frame with a free slot index:
at most ``num_streams`` frames run at once, one per slot, and a slot's session and window buffer are only ever used
by the frame holding it.

Frame planes arrive as zero-copy memoryviews of VapourSynth's frame memory (float32, 2-D, row-strided), valid only
during the call. The only copy on the way in is the one into the backend's input window (done by
:func:`vs_selftransfer.tiling.tiled_upscale`); the backend's output is written straight into the output frame.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import os

import numpy as np

from vs_selftransfer.backend_base import PRECISIONS, parse_device
from vs_selftransfer.bundle import Bundle, BundleError
from vs_selftransfer.tiling import tiled_upscale, window_shape

# name -> module; each module has `class Backend` and `available(device) -> str | None` (see the backend modules).
BACKENDS = {
    "ort": "vs_selftransfer.backend_ort",
    "ov": "vs_selftransfer.backend_ov",
    "torch": "vs_selftransfer.backend_torch",
    "trt": "vs_selftransfer.backend_trt",
}
# Context around each tile: at least the network's receptive radius (vs_selftransfer.model.RECEPTIVE_RADIUS = 22 LR px for
# CARN/CARN-M), so tiled output equals untiled output; rounded up to a multiple of 8 for aligned windows.
DEFAULT_OVERLAP = 24
# Frames up to this many input pixels (640x360 and 512x512 fit) run whole; larger ones in AUTO_TILE tiles, which
# bounds the memory of the network's activations (about 1.5 kB per input pixel for CARN-M in fp32).
AUTO_TILE_MAX_PIXELS = 512 * 512
AUTO_TILE = 384
MIN_TILE = 8
MAX_OVERLAP = 512
MAX_STREAMS = 64
MAX_THREADS = 1024


def cpu_count() -> int:
    """CPUs this process may run on (respects taskset/cgroup affinity, unlike os.cpu_count)."""
    return len(os.sched_getaffinity(0))


def _int_arg(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name}: must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ValueError(f"{name}: must be between {low} and {high}, not {value}")
    return value


def _text_arg(name: str, value, default: str) -> str:
    if value is None:
        return default
    if not isinstance(value, str):
        raise ValueError(f"{name}: must be a string, not {value!r}")
    return value


def parse_tilesize(tilesize, width: int, height: int) -> tuple[int, int]:
    """tilesize: None (automatic), W, [W] or [W, H] in input pixels, 0 = no tiling on that axis -> (tile_h, tile_w)."""
    if tilesize is None:
        if width * height <= AUTO_TILE_MAX_PIXELS:
            return 0, 0
        return AUTO_TILE, AUTO_TILE
    values = [tilesize] if isinstance(tilesize, int) and not isinstance(tilesize, bool) else tilesize
    if not isinstance(values, (list, tuple)) or len(values) not in (1, 2):
        raise ValueError(f"tilesize: give one size or [width, height], not {tilesize!r}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0 or 0 < v < MIN_TILE or v > 1 << 16:
            raise ValueError(f"tilesize: each size must be 0 (whole frame) or {MIN_TILE} to 65536 pixels, "
                             f"not {tilesize!r}")
    tile_w, tile_h = (values[0], values[0]) if len(values) == 1 else values
    return tile_h, tile_w


def default_parallelism(device_kind: str, num_streams: int | None, threads: int | None,
                        cores: int) -> tuple[int, int]:
    """(streams, threads per stream). On the CPU the defaults keep streams x threads <= cores: by default one
    stream using every core (the backends' intra-op threads scale well on a single frame and it needs one frame's
    memory); a given num_streams gets cores // num_streams threads each, given threads get cores // threads streams.
    Both given: taken as they are. On a GPU: one stream, one host thread."""
    threads = threads or None  # 0 = automatic
    if device_kind != "cpu":
        return num_streams or 1, threads or 1
    if num_streams is None:
        return (1, cores) if threads is None else (max(1, cores // threads), threads)
    return num_streams, threads or max(1, cores // num_streams)


def load_backend_module(name: str, device: str):
    """The backend's module, or ValueError saying why it cannot run on this device (and what to install)."""
    try:
        module = importlib.import_module(BACKENDS[name])
    except ImportError as e:
        raise ValueError(f"backend: {name!r} cannot be loaded: {e}") from None
    reason = module.available(device)
    if reason:
        raise ValueError(f"backend: {name!r} is not available on {device}: {reason}")
    return module


def _usable(name: str, device: str) -> bool:
    try:
        load_backend_module(name, device)
    except ValueError:
        return False
    return True


def choose_backend(device: str, bundle: Bundle) -> str:
    """"auto": the fastest backend that can run here. CPU: OpenVINO when installed, else ONNX Runtime (both read
    only data members). Intel GPU: OpenVINO. CUDA: PyTorch built from the safetensors weights (data only: the
    TorchScript and TensorRT members carry code and are opened only when the user names that backend)."""
    kind, _ = parse_device(device)
    if kind == "cpu":
        return "ov" if _usable("ov", device) else "ort"
    if kind == "gpu":
        return "ov"
    return "torch"


def choose_precision(bundle: Bundle, backend: str, device_kind: str) -> str:
    """"auto": the bundle's per-video int8 graph where the trainer measured it within its quality budget on this
    engine (manifest ``precision.int8``, see trainer/quantize.py), else fp32."""
    int8 = bundle.manifest.get("precision", {}).get("int8", {})
    if (device_kind == "cpu" and bundle.has("model.int8.onnx") and isinstance(int8, dict)
            and int8.get("accepted") is True and int8.get("engine") == backend):
        return "int8"
    return "fp32"


class _Slot:
    """One stream: a backend session and the window buffer its input is assembled in."""

    def __init__(self, backend, window: tuple[int, int], reuse: bool):
        self.backend = backend
        self.window = np.empty((1, 3, *window), np.float32)
        # Exact temporal reuse (see tiling.tiled_upscale): the last input and output of each window position.
        self.reuse: dict | None = {} if reuse else None


class Upscaler:
    """What one ``Upscale`` call runs: the bundle's network on ``num_streams`` sessions of one backend."""

    def __init__(self, bundle: Bundle, backend: str, device: str, precision: str, tile: tuple[int, int],
                 overlap: int, num_streams: int, threads: int, width: int, height: int, reuse: bool = True,
                 run_code: bool = True):
        self.bundle_path = bundle.path
        self.scale = bundle.scale
        self.backend = backend
        self.device = device
        self.precision = precision
        self.tile = tile
        self.overlap = overlap
        self.num_streams = num_streams
        self.threads = threads
        self.reuse = reuse
        self.window = window_shape(height, width, tile[0], tile[1], overlap)
        backend_class = load_backend_module(backend, device).Backend
        # TorchScript carries code: it is opened only when the user asked for the torch backend by name.
        options = {"run_code": run_code} if backend == "torch" else {}
        self._slots = []
        for _ in range(num_streams):
            try:
                session = backend_class(bundle, device=device, precision=precision, threads=threads,
                                        window=self.window, **options)
            except ValueError as e:
                raise ValueError(f"backend {backend!r} ({precision} on {device}): {e}") from None
            self._slots.append(_Slot(session, self.window, reuse))

    def process(self, slot: int, n: int, src_planes, dst_planes) -> None:
        """Upscale frame ``n`` (its 3 RGB planes, HxW float32) into ``dst_planes`` (sH x sW) using stream ``slot``.

        ``n`` identifies the frame for reuse across frames; the planes are only valid during the call, so nothing
        derived from them may be kept."""
        state = self._slots[slot]
        tiled_upscale(state.backend, [np.asarray(p) for p in src_planes], [np.asarray(p) for p in dst_planes],
                      self.scale, self.tile, self.overlap, buffer=state.window, reuse=state.reuse)

    def __repr__(self) -> str:
        return (f"Upscaler({self.bundle_path!r}, x{self.scale}, backend={self.backend!r}, device={self.device!r}, "
                f"precision={self.precision!r}, streams={self.num_streams}, threads={self.threads}, "
                f"tile={self.tile}, overlap={self.overlap}, window={self.window})")


def create(model, backend=None, device=None, tilesize=None, overlap=None, num_streams=None, precision=None,
           threads=None, scale=None, reuse=None, *, width: int, height: int) -> Upscaler:
    """Validate every argument of ``Upscale`` (each error names its argument) and open the sessions."""
    width = _int_arg("width", width, 1, 1 << 20)
    height = _int_arg("height", height, 1, 1 << 20)
    backend = _text_arg("backend", backend, "auto")
    if backend != "auto" and backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; choose one of {', '.join(['auto', *BACKENDS])}")
    device = _text_arg("device", device, "cpu")
    try:
        device_kind, _ = parse_device(device)
    except ValueError:
        raise ValueError(f"device: must be 'cpu', 'cuda', 'cuda:N' (NVIDIA), 'gpu' or 'gpu:N' (Intel, OpenVINO), "
                         f"not {device!r}") from None
    precision = _text_arg("precision", precision, "auto")
    if precision != "auto" and precision not in PRECISIONS:
        raise ValueError(f"precision: must be auto or one of {', '.join(PRECISIONS)}, not {precision!r}")
    tile = parse_tilesize(tilesize, width, height)
    overlap = DEFAULT_OVERLAP if overlap is None else _int_arg("overlap", overlap, 0, MAX_OVERLAP)
    if num_streams is not None:
        num_streams = _int_arg("num_streams", num_streams, 1, MAX_STREAMS)
    if threads is not None:
        threads = _int_arg("threads", threads, 0, MAX_THREADS)
    if scale is not None:
        scale = _int_arg("scale", scale, 1, 16)
    reuse = True if reuse is None else bool(_int_arg("reuse", reuse, 0, 1))

    if not isinstance(model, (str, os.PathLike)):
        raise ValueError(f"model: must be the path of a .stm bundle, not {model!r}")
    path = os.fspath(model)
    if not os.path.exists(path):
        raise ValueError(f"model: file not found: {path}")
    if os.path.isdir(path):
        raise ValueError(f"model: {path} is a directory, not a .stm bundle")
    try:
        bundle = Bundle.open(path)
    except BundleError as e:
        raise ValueError(f"model: {e}") from None
    if bundle.manifest["input"].get("channels") != "RGB":
        raise ValueError(f"model: {path}: the network takes {bundle.manifest['input'].get('channels')!r}, not RGB")
    if scale is not None and scale != bundle.scale:
        raise ValueError(f"scale: the bundle {path} upscales by {bundle.scale}, not {scale}; use a x{scale} bundle "
                         f"or leave scale unset")

    run_code = backend in ("torch", "trt")  # named by the user: they trust this bundle's code members
    if backend == "auto":
        backend = choose_backend(device, bundle)
    if precision == "auto":
        precision = choose_precision(bundle, backend, device_kind)
    streams, threads = default_parallelism(device_kind, num_streams, threads, cpu_count())
    return Upscaler(bundle, backend, device, precision, tile, overlap, streams, threads, width, height, reuse=reuse,
                    run_code=run_code)


def versions() -> dict[str, str]:
    """Versions of this package and of every library a backend may use ("not installed" when absent), read from
    package metadata so that nothing heavy is imported."""
    from vs_selftransfer import __version__

    out = {"selftransfer": __version__, "numpy": np.__version__}
    for key, distributions in (("onnxruntime", ("onnxruntime", "onnxruntime-gpu")), ("openvino", ("openvino",)),
                               ("torch", ("torch",)), ("torch_tensorrt", ("torch-tensorrt", "torch_tensorrt")),
                               ("tensorrt", ("tensorrt",))):
        out[key] = "not installed"
        for dist in distributions:
            try:
                out[key] = importlib.metadata.version(dist)
                break
            except importlib.metadata.PackageNotFoundError:
                continue
    return out
