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

from vs_selftransfer.backend_base import NATIVE_FLAGS, PRECISIONS, cpu_flags, native_support, parse_device
from vs_selftransfer.bundle import Bundle, BundleError
from vs_selftransfer.tiling import OVERLAP, auto_tile, tiled_upscale, window_shape

# name -> module; each module has `class Backend` and `available(device) -> str | None` (see the backend modules).
BACKENDS = {
    "ort": "vs_selftransfer.backend_ort",
    "ov": "vs_selftransfer.backend_ov",
    "torch": "vs_selftransfer.backend_torch",
    "trt": "vs_selftransfer.backend_trt",
}
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
        tile = auto_tile(width, height)
        return tile, tile
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


def backend_choice(device: str) -> tuple[str, str]:
    """"auto": (the fastest backend that can run here, why). CPU: OpenVINO (in this process, or in a worker process
    where vs-mlrt's OpenVINO library is loaded here, see backend_ov), else ONNX Runtime; both read only data
    members. Intel GPU: OpenVINO. CUDA: PyTorch built from the safetensors weights (data only: the TorchScript and
    TensorRT members carry code and are opened only when the user names that backend)."""
    kind, _ = parse_device(device)
    if kind == "cpu":
        try:
            module = load_backend_module("ov", device)
        except ValueError as e:
            return "ort", f"ort: OpenVINO, the faster CPU engine, is unusable ({e})"
        where = module.in_process_unavailable()
        return "ov", "ov: OpenVINO, the fastest CPU engine, " + (f"in a worker process ({where})" if where
                                                                  else "in this process")
    if kind == "gpu":
        return "ov", "ov: OpenVINO runs Intel GPUs"
    return "torch", "torch: PyTorch from the bundle's weights (data only) on CUDA"


def choose_backend(device: str, bundle: Bundle) -> str:
    """"auto" for ``backend``: see :func:`backend_choice`."""
    return backend_choice(device)[0]


# What "auto" may pick below fp32 per engine: int8 (a calibrated QDQ graph) and bf16 (the fp32 graph computed in
# bf16 by OpenVINO). ONNX Runtime has no fast bf16 CPU kernels.
AUTO_PRECISIONS = {"ov": ("int8", "bf16"), "ort": ("int8",)}


def precision_choice(bundle: Bundle, backend: str, device_kind: str, flags=None) -> tuple[str, str]:
    """"auto" for ``precision``: (precision, why).

    A precision below fp32 is used only where (1) ``fit`` measured it on this video's held-out frames, with this
    engine, within its Y-PSNR budget of fp32 (manifest ``precision.<p>``: trainer/quantize.py for int8,
    trainer/precision.py for bf16), and (2) this CPU computes it natively (``flags``: /proc/cpuinfo's by default):
    bf16 with AVX512-BF16 or AMX, int8 with VNNI or AMX, or, without VNNI, where fit measured the int8 graph faster
    than fp32. Among those, the one fit measured fastest relative to fp32; otherwise fp32. GPUs: fp32 (their backends' choice)."""
    if device_kind != "cpu":
        return "fp32", f"fp32: auto picks lower precisions on the CPU only, not on {device_kind}"
    records = bundle.manifest.get("precision")
    records = records if isinstance(records, dict) else {}
    flags = cpu_flags() if flags is None else flags
    usable, refused = [], []
    for order, name in enumerate(AUTO_PRECISIONS.get(backend, ())):
        record = records.get(name)
        if not isinstance(record, dict) or not isinstance(record.get("accepted"), bool):
            refused.append(f"{name} not measured for this bundle")
            continue
        loss = record.get("loss_db")
        number = isinstance(loss, (int, float)) and not isinstance(loss, bool)
        loss_text = f"{-loss:+.3f} dB" if number else "unknown loss"  # the change: a loss is a negative change
        if record.get("engine") != backend:
            refused.append(f"{name} measured on {record.get('engine')!r}, not {backend!r}")
            continue
        if record["accepted"] is not True and record.get("measured") is False:
            refused.append(f"{name} {record.get('reason', 'not measured')}")
            continue
        if record["accepted"] is not True:
            refused.append(f"{name} lost {f'{loss:.3f} dB' if number else 'an unknown amount'} on the held-out frames (budget {record.get('budget_db')} dB)")
            continue
        if name == "int8" and not bundle.has("model.int8.onnx"):
            refused.append("int8 accepted but model.int8.onnx is missing")
            continue
        # Speed as fit measured it against fp32 in the same run (records are measured at different times and
        # loads, so their seconds are compared only through their own fp32).
        speed = record.get("s_per_val_frame")
        speed = speed if isinstance(speed, dict) else {}
        mine, fp32 = speed.get(name), speed.get("fp32")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in (mine, fp32))
        speedup = fp32 / mine if numbers else 0.0
        native = native_support(name, flags)
        measured_faster = speedup > 1
        if native is None and not (name == "int8" and measured_faster):
            refused.append(f"{name} is not native on this CPU (no {'/'.join(NATIVE_FLAGS[name])})")
            continue
        how = f"native: {native}" if native else "measured faster than fp32"
        if name == "int8" and backend == "ov":
            from vs_selftransfer.backend_ov import int8_float_layers

            how += f", float layers in {int8_float_layers(bundle.manifest, flags)}"
        usable.append((-speedup, order, name, f"{name}: {loss_text} vs fp32 on the video's held-out frames "
                                             f"(budget {record.get('budget_db')} dB), {how}"))
    if not usable:
        return "fp32", "fp32: " + ("; ".join(refused) if refused else f"the {backend} backend runs fp32")
    _, _, name, why = min(usable)
    return name, why + ("" if not refused else f" (also: {'; '.join(refused)})")


def choose_precision(bundle: Bundle, backend: str, device_kind: str, flags=None) -> str:
    """"auto" for ``precision``: see :func:`precision_choice`."""
    return precision_choice(bundle, backend, device_kind, flags)[0]


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
        check_graph(bundle, backend, backend_class, device, precision, threads, options, self._slots[0].backend)

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


def require_probe(bundle: Bundle) -> None:
    """Refuse a bundle without a probe (format version 1): nothing would tie its graph to its weights."""
    if not bundle.has_probe:
        raise ValueError(f"model: {bundle.path}: the bundle has no probe (format version "
                         f"{bundle.manifest['format_version']}, written by an older selftransfer), so nothing ties its "
                         f"graph to its weights; re-export it: selftransfer export {bundle.path} -o NEW.stm")


def check_graph(bundle: Bundle, backend: str, backend_class, device: str, precision: str, threads: int,
                options: dict, session) -> None:
    """Run the graph ``session`` uses on the bundle's probe (recorded at export) before the first frame: a graph of
    another scale than the manifest's, one that is not the network of the bundle's weights, or one giving NaN is
    refused here (ValueError naming the member) instead of failing or turning black on every frame.

    ONNX Runtime, OpenVINO and PyTorch run the probe in a second session of the same member opened for the probe's
    shape (a session's window is fixed). A TensorRT engine is tied to its shapes: the weights are checked on the
    probe, and the engine on one window against the weights (eager PyTorch on the same GPU)."""
    from vs_selftransfer.bundle import check_probe_output, probe_input

    require_probe(bundle)
    x = probe_input(bundle.manifest)
    try:
        if backend == "trt":
            _check_engine(bundle, session, x)
            return
        probe_session = backend_class(bundle, device=device, precision=precision, threads=threads,
                                      window=x.shape[2:], **options)
        member = getattr(probe_session, "source", None) or ("model.int8.onnx" if precision == "int8" else "model.onnx")
        try:
            got = probe_session(x)
        except RuntimeError as e:
            h, w = x.shape[2:]
            raise BundleError(f"{bundle.path}: {member} fails on the {h}x{w} probe run as the manifest's "
                              f"x{bundle.scale} network (a graph of another scale fails so): {e}") from None
        check_probe_output(bundle.manifest, bundle.path, member, precision, got)
    except BundleError as e:
        raise ValueError(f"model: {e}") from None


def _check_engine(bundle: Bundle, session, x: np.ndarray) -> None:
    from vs_selftransfer.bundle import PROBE_TOLERANCE, check_probe_output

    import torch

    model = bundle.torch_model()
    with torch.inference_mode():
        check_probe_output(bundle.manifest, bundle.path, "weights.safetensors", "fp32", model(torch.from_numpy(x)))
        h, w = session.window
        # The probe's pixels repeated over the window: image-like content at the engine's own shape.
        window = np.ascontiguousarray(np.tile(x, (1, 1, -(-h // x.shape[2]), -(-w // x.shape[3])))[:, :, :h, :w])
        member = session.source if session.source == "model.trt.ts" else f"the TensorRT engine {session.source}"
        try:
            got = np.asarray(session(window), np.float32)
        except RuntimeError as e:
            raise BundleError(f"{bundle.path}: {member} fails on a {h}x{w} window: {e}") from None
        expected = model.to(session.torch_device)(torch.from_numpy(window).to(session.torch_device)).cpu().numpy()
    if got.shape != expected.shape:
        raise BundleError(f"{bundle.path}: {member} gives shape {got.shape} for a {h}x{w} window, the weights (x"
                          f"{bundle.scale}) give {expected.shape}: it is not this bundle's network")
    if not np.isfinite(got).all():
        raise BundleError(f"{bundle.path}: {member} gives non-finite values (NaN or infinity) on a {h}x{w} window")
    # fp32 engines convolve in TF32 on Ampere and later (10-bit mantissa, like fp16): the fp16 bound applies.
    diff = float(np.abs(got - expected).max())
    if diff > PROBE_TOLERANCE["fp16"]:
        raise BundleError(f"{bundle.path}: {member} differs from the bundle's weights by {diff:.3g} "
                          f"(> {PROBE_TOLERANCE['fp16']:g}) on a {h}x{w} window: it is not this bundle's network")


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
    overlap = OVERLAP if overlap is None else _int_arg("overlap", overlap, 0, MAX_OVERLAP)
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
    require_probe(bundle)  # before any session is opened (a TensorRT engine may take minutes to build)
    if bundle.manifest["input"].get("channels") != "RGB":
        raise ValueError(f"model: {path}: the network takes {bundle.manifest['input'].get('channels')!r}, not RGB")
    if scale is not None and scale != bundle.scale:
        raise ValueError(f"scale: the bundle {path} upscales by {bundle.scale}, not {scale}; use a x{scale} bundle "
                         f"or leave scale unset")

    run_code = backend in ("torch", "trt")  # named by the user: they trust this bundle's code members
    backend_why = f"{backend}: given"
    if backend == "auto":
        backend, backend_why = backend_choice(device)
    precision_why = f"{precision}: given"
    auto_precision = precision == "auto"
    if auto_precision:
        precision, precision_why = precision_choice(bundle, backend, device_kind)
    streams, threads = default_parallelism(device_kind, num_streams, threads, cpu_count())
    try:
        upscaler = Upscaler(bundle, backend, device, precision, tile, overlap, streams, threads, width, height,
                            reuse=reuse, run_code=run_code)
    except ValueError as e:
        if not auto_precision or precision == "fp32":
            raise
        # The engine refused what the CPU flags promised (a hypervisor hiding a feature from it, say): fp32.
        precision_why = f"fp32: the engine refused {precision} ({e})"
        precision = "fp32"
        upscaler = Upscaler(bundle, backend, device, precision, tile, overlap, streams, threads, width, height,
                            reuse=reuse, run_code=run_code)
    upscaler.choice = {"backend": backend_why, "precision": precision_why}
    LAST_UPSCALE.clear()
    LAST_UPSCALE.update(describe_upscaler(upscaler))
    return upscaler


# What the last Upscale call in this process runs and why: core.selftransfer.Version() reports it.
LAST_UPSCALE: dict[str, str] = {}


def describe_upscaler(upscaler: Upscaler) -> dict[str, str]:
    first = upscaler._slots[0].backend
    return {"last_upscale": (f"{upscaler.backend} {upscaler.precision} on {upscaler.device}, {upscaler.num_streams} "
                             f"stream(s) x {upscaler.threads} thread(s): {getattr(first, 'description', '')}"),
            "last_upscale_backend": upscaler.choice["backend"],
            "last_upscale_precision": upscaler.choice["precision"]}


def versions() -> dict[str, str]:
    """Versions of this package and of every library a backend may use ("not installed" when absent), read from
    package metadata so that nothing heavy is imported; what ``auto`` picks on this CPU and why (its native
    precisions from /proc/cpuinfo); and, once an Upscale was created in this process, what the last one runs and
    why (``last_upscale*``)."""
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
    flags = cpu_flags()
    native = {p: native_support(p, flags) for p in NATIVE_FLAGS}
    out["cpu_native"] = ", ".join(f"{p}: {f or 'no (' + '/'.join(NATIVE_FLAGS[p]) + ' absent)'}"
                                  for p, f in native.items())
    out["auto_cpu"] = ("backend ov (OpenVINO) if it loads, in a worker process where vs-mlrt's OpenVINO library is "
                       "already loaded, else ort; precision: per bundle, " +
                       (" or ".join(p for p, f in native.items() if f) or "fp32 only (no native bf16/int8)") +
                       " where fit measured it within budget, else fp32")
    out.update(LAST_UPSCALE)
    return out
