"""OpenVINO backend (``ov``, part of the default install). Reads ``model.onnx`` (or ``model.int8.onnx``) from memory,
as data, and compiles it for the static window shape (OpenVINO is faster on static shapes). Precision bf16 only
where the CPU computes it natively (AVX512_BF16 / AMX): elsewhere OpenVINO would silently fall back to fp32, so we
refuse instead of pretending.

Next to vs-mlrt. ``vapoursynth-mlrt-ov`` ships its own ``libopenvino.so`` (same soname as the ``openvino`` wheel's,
different build), and VapourSynth loads it when it autoloads plugins, before any script runs. Our ``openvino``
Python module then refuses to load in that process ("OpenVINO Python version ... mismatches with OpenVINO Runtime
library version"), whatever the script imports first. In that case the engine runs in a worker process of ours
(:class:`_WorkerEngine`): a fresh interpreter that loads only the ``openvino`` wheel and this module, receives the
graph once, and then computes each window from a shared-memory buffer into a shared-memory buffer, so a frame
crosses the process boundary without serialisation: the per-call cost is one small message each way plus a copy of
the output out of the shared buffer (measured in scripts/bench_inference.py: ours-ov-worker against ours-ov-inproc).
The worker is ours to pick versions for, so the fastest engine stays available whichever vs-mlrt is installed;
it exits when its socket closes, i.e. when the session is closed or this process ends.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import mmap
import os
import pickle
import socket
import subprocess
import sys
import tempfile
import threading

import numpy as np

from vs_selftransfer.backend_base import check_args, check_input, onnx_member, parse_device

DEVICES = ("cpu", "gpu")
_HINTS = {"fp32": "f32", "bf16": "bf16", "fp16": "f16", "int8": "f32"}  # int8: QDQ layers int8, see FLOAT_LAYERS
_CAPABILITY = {"bf16": "BF16", "fp16": "FP16"}
# An int8 graph keeps a few layers in float (trainer/quantize.py). OpenVINO computes them at its precision hint:
# bf16 makes the int8 graph about 1.4x faster again on a CPU with native bf16 (docs/benchmarks.md). It is used
# only where fit measured the int8 graph with bf16 float layers within budget (manifest precision.int8.float_layers).
FLOAT_LAYERS = ("fp32", "bf16")
MISMATCH = "mismatches with OpenVINO Runtime library version"
# A worker that has not answered the opening request in this long is reported as stuck (compiling CARN-M for a
# 1080p window takes a few seconds).
WORKER_OPEN_TIMEOUT_S = 300


def available(device: str = "cpu") -> str | None:
    """None when this backend can run on ``device`` (in this process or in a worker), else the reason and what to
    install."""
    try:
        kind, index = parse_device(device)
    except ValueError as e:
        return str(e)
    if kind == "cuda":
        return "OpenVINO does not run on NVIDIA GPUs (its GPU plugin is for Intel GPUs): use the trt or torch backend"
    reason = in_process_unavailable()
    if reason is not None and not _worker_possible(reason):
        return reason
    if kind == "cpu":
        return None
    if reason is not None:  # listing Intel GPUs needs openvino; the worker checks the device when it opens
        return None
    target = _ov_device(kind, index)
    try:
        devices = import_openvino().Core().available_devices
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


def foreign_openvino_runtime() -> str | None:
    """The path of a ``libopenvino.so`` mapped into this process that is not the one of our ``openvino`` package
    (vs-mlrt's, loaded by VapourSynth's plugin autoload), or None. Read from /proc/self/maps, so nothing is loaded
    to find out."""
    if sys.modules.get("openvino") is not None:
        return None  # ours is loaded and working: whatever came later bound to it
    try:  # the installed package's location, whatever sys.modules says
        spec = importlib.machinery.PathFinder.find_spec("openvino")
    except (ImportError, ValueError):
        spec = None
    ours = {os.path.realpath(p) for p in (spec.submodule_search_locations or [])} if spec else set()
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            maps = f.read()
    except OSError:
        return None
    for line in maps.splitlines():
        fields = line.split(None, 5)
        path = fields[5] if len(fields) == 6 else ""
        if os.path.basename(path).startswith("libopenvino.so"):
            real = os.path.realpath(path)
            if not any(real.startswith(d + os.sep) for d in ours):
                return real
    return None


def in_process_unavailable() -> str | None:
    """None when ``import openvino`` works in this process, else why not (without trying where it cannot work)."""
    foreign = foreign_openvino_runtime()
    if foreign is not None:
        return (f"another OpenVINO runtime library is loaded in this process ({foreign}, typically vs-mlrt's "
                f"core.ov plugin, which VapourSynth autoloads), so the openvino Python module cannot load here")
    try:
        import_openvino()
    except ImportError as e:
        return _import_failure(e)
    return None


def _worker_possible(reason: str) -> bool:
    """Whether a worker process can run OpenVINO where this process cannot: only when another runtime library is
    in the way (not when openvino is missing or broken)."""
    return ("another OpenVINO runtime library" in reason or MISMATCH in reason) and _python_executable() is not None


def _import_failure(error: ImportError) -> str:
    try:
        installed = importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):
        installed = False
    if not installed:
        return "OpenVINO is not installed (pip install openvino, or reinstall selftransfer)"
    first = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
    if MISMATCH in str(error):
        return (f"another OpenVINO runtime library was loaded in this process first (typically vs-mlrt's core.ov "
                f"plugin); the openvino Python module {MISMATCH} ({first})")
    return f"OpenVINO is installed but does not import: {first}"


def _ov_device(kind: str, index: int) -> str:
    return "CPU" if kind == "cpu" else ("GPU" if index == 0 else f"GPU.{index}")


class _Engine:
    """A compiled graph and its infer request, in this process."""

    def __init__(self, onnx: bytes, *, what: str, kind: str, index: int, precision: str, threads: int,
                 window: tuple[int, int] | None, float_layers: str = "fp32"):
        ov = import_openvino()
        core = ov.Core()
        target = _ov_device(kind, index)
        if kind != "cpu" and target not in core.available_devices:
            raise RuntimeError(f"OpenVINO sees no {target} device (it has {core.available_devices})")
        hint = "bf16" if precision == "int8" and float_layers == "bf16" else precision
        if hint in _CAPABILITY:
            caps = core.get_property(target, "OPTIMIZATION_CAPABILITIES")
            if _CAPABILITY[hint] not in caps:
                what_needs = f"precision {precision}" + (" with bf16 float layers" if hint != precision else "")
                raise ValueError(f"{what_needs} needs a {target} that computes {hint} natively "
                                 f"({'AVX512_BF16 or AMX' if hint == 'bf16' else 'FP16 units'}); this one "
                                 f"offers {list(caps)}: use fp32")
        try:
            model = core.read_model(model=onnx)  # bytes: parsed as ONNX data, nothing executed
            if window is not None:
                model.reshape({model.input(0): ov.PartialShape([1, 3, *window])})
        except Exception as e:  # noqa: BLE001 - OpenVINO raises RuntimeError subclasses of its own
            raise RuntimeError(f"{what}: OpenVINO cannot read it: {e}") from None
        config = {
            "PERFORMANCE_HINT": "LATENCY",
            "NUM_STREAMS": 1,
            "INFERENCE_PRECISION_HINT": _HINTS[hint],
        }
        if threads and kind == "cpu":
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self.compiled = core.compile_model(model, target, config)
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"{what}: OpenVINO cannot compile it for {target}: {e}") from None
        self.actual = self.compiled.get_property("INFERENCE_PRECISION_HINT").get_type_name()
        if self.actual != _HINTS[hint]:  # OpenVINO falls back silently; a bf16 run must really be bf16
            raise ValueError(f"OpenVINO compiled precision {precision} as {self.actual} on this {target}: use fp32")
        self.target = target
        self.request = self.compiled.create_infer_request()
        self._ov = ov

    def infer_into(self, x: np.ndarray, out: np.ndarray) -> None:
        # Both tensors wrap our arrays: OpenVINO reads x in place and writes straight into ``out``.
        self.request.set_input_tensor(self._ov.Tensor(x, shared_memory=True))
        self.request.set_output_tensor(self._ov.Tensor(out, shared_memory=True))
        self.request.infer()

    def close(self) -> None:
        self.request = self.compiled = None


def _python_executable() -> str | None:
    """The interpreter to start a worker with. Hosts that embed Python (vspipe, editors) may report themselves as
    sys.executable; then the environment's own python is used."""
    candidates = [sys.executable, os.path.join(sys.prefix, "bin", "python3"), os.path.join(sys.prefix, "bin", "python")]
    for exe in candidates:
        if exe and os.path.basename(exe).startswith("python") and os.access(exe, os.X_OK):
            return exe
    return None


class _SharedBuffer:
    """An anonymous shared-memory file holding one input window and its output, mapped by both processes."""

    def __init__(self, fd: int | None = None):
        if fd is None:
            if hasattr(os, "memfd_create"):
                fd = os.memfd_create("selftransfer-ov", os.MFD_CLOEXEC)
            else:  # no memfd (not Linux): an unlinked temporary file in tmpfs where there is one
                shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
                f = tempfile.TemporaryFile(dir=shm)
                fd = os.dup(f.fileno())
                f.close()
        self.fd = fd
        self.size = 0
        self.map: mmap.mmap | None = None

    def ensure(self, size: int, grow: bool) -> None:
        """Map at least ``size`` bytes (the owner grows the file first)."""
        if self.size >= size:
            return
        if grow:
            os.ftruncate(self.fd, size)
        if self.map is not None:
            self.map.close()
        self.map = mmap.mmap(self.fd, size)
        self.size = size

    def arrays(self, shape_in: tuple, shape_out: tuple) -> tuple[np.ndarray, np.ndarray]:
        n_in = int(np.prod(shape_in)) * 4
        offset = -(-n_in // 4096) * 4096  # page-aligned output
        return (np.frombuffer(self.map, np.float32, int(np.prod(shape_in)), 0).reshape(shape_in),
                np.frombuffer(self.map, np.float32, int(np.prod(shape_out)), offset).reshape(shape_out))

    @staticmethod
    def bytes_for(shape_in: tuple, shape_out: tuple) -> int:
        return -(-int(np.prod(shape_in)) * 4 // 4096) * 4096 + int(np.prod(shape_out)) * 4

    def close(self) -> None:
        if self.map is not None:
            try:
                self.map.close()
            except BufferError:  # an array still views it; the mapping goes with the process
                pass
            self.map = None
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _send(sock: socket.socket, message) -> None:
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    sock.sendall(len(data).to_bytes(8, "little") + data)


def _recv(sock: socket.socket):
    """The next message, or EOFError when the other side has gone."""
    def exactly(n: int) -> bytes:
        chunks, left = [], n
        while left:
            chunk = sock.recv(min(left, 1 << 20))
            if not chunk:
                raise EOFError("the other side closed the connection")
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    size = int.from_bytes(exactly(8), "little")
    # Both ends are this module, started by us over a private socketpair: nothing else can write to it.
    return pickle.loads(exactly(size))


class _WorkerEngine:
    """The same engine in a worker process (see the module docstring); ``infer_into`` has the same contract."""

    def __init__(self, onnx: bytes, *, what: str, kind: str, index: int, precision: str, threads: int,
                 window: tuple[int, int] | None, why: str, float_layers: str = "fp32"):
        exe = _python_executable()
        if exe is None:
            raise RuntimeError(f"the ov backend cannot run here ({why}) and no Python executable was found to run "
                               f"it in a worker process")
        self.buffer = _SharedBuffer()
        parent, child = socket.socketpair()
        self._stderr = tempfile.TemporaryFile()  # the worker's output, quoted when it fails
        env = dict(os.environ)
        # The worker imports exactly what this process would: the same search path, nothing from VapourSynth.
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))
        code = ("import sys; from vs_selftransfer.backend_ov import worker_main; "
                "worker_main(int(sys.argv[1]), int(sys.argv[2]))")
        try:
            self.process = subprocess.Popen([exe, "-c", code, str(child.fileno()), str(self.buffer.fd)],
                                            pass_fds=(child.fileno(), self.buffer.fd), stdin=subprocess.DEVNULL,
                                            stdout=self._stderr, stderr=self._stderr, env=env, close_fds=True)
        except OSError as e:
            parent.close()
            self.buffer.close()
            self._stderr.close()
            raise RuntimeError(f"the ov backend cannot start its worker process ({exe}): {e}") from None
        finally:
            child.close()
        self.sock = parent
        self.pid = self.process.pid
        parent.settimeout(WORKER_OPEN_TIMEOUT_S)
        try:
            _send(parent, {"onnx": onnx, "what": what, "kind": kind, "index": index, "precision": precision,
                           "threads": threads, "window": window, "float_layers": float_layers})
            reply = _recv(parent)
        except (OSError, EOFError) as e:
            said = self._worker_output()
            self.close()
            raise RuntimeError(f"the ov worker process failed while opening {what}: {e}{said}") from None
        parent.settimeout(None)
        if reply[0] == "error":
            self.close()
            raise (ValueError if reply[1] == "ValueError" else RuntimeError)(reply[2])
        self.target, self.actual = reply[1], reply[2]

    def _worker_output(self) -> str:
        try:
            self._stderr.seek(0)
            text = self._stderr.read().decode("utf-8", "replace").strip()
        except (OSError, ValueError):
            return ""
        return f"; the worker said: {text.splitlines()[-1]}" if text else ""

    def infer_into(self, x: np.ndarray, out: np.ndarray) -> None:
        self.buffer.ensure(_SharedBuffer.bytes_for(x.shape, out.shape), grow=True)
        shared_in, shared_out = self.buffer.arrays(x.shape, out.shape)
        shared_in[...] = x
        try:
            _send(self.sock, ("infer", x.shape, out.shape, self.buffer.size))
            reply = _recv(self.sock)  # blocks without the GIL while the worker computes
        except (OSError, EOFError) as e:
            raise RuntimeError(f"the ov worker process (pid {self.pid}) died: {e}{self._worker_output()}") from None
        if reply[0] != "ok":
            raise RuntimeError(reply[2])
        out[...] = shared_out

    def close(self) -> None:
        sock, self.sock = getattr(self, "sock", None), None
        if sock is not None:
            sock.close()  # the worker reads EOF and exits
        process = getattr(self, "process", None)
        if process is not None and process.poll() is None:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        self.buffer.close()
        self._stderr.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown: the worker exits on EOF anyway
            pass


def worker_main(sock_fd: int, buffer_fd: int) -> None:
    """The worker process: open the engine from the first message, then compute windows until the socket closes."""
    sock = socket.socket(fileno=sock_fd)
    buffer = _SharedBuffer(buffer_fd)
    try:
        spec = _recv(sock)
    except EOFError:
        return
    try:
        engine = _Engine(spec.pop("onnx"), **spec)
    except Exception as e:  # noqa: BLE001 - every failure goes back to the parent with its message
        _send(sock, ("error", type(e).__name__, str(e)))
        return
    _send(sock, ("ready", engine.target, engine.actual))
    while True:
        try:
            _, shape_in, shape_out, size = _recv(sock)
        except EOFError:
            break
        try:
            buffer.ensure(size, grow=False)
            x, out = buffer.arrays(shape_in, shape_out)
            engine.infer_into(x, out)
            reply = ("ok",)
        except Exception as e:  # noqa: BLE001
            reply = ("error", type(e).__name__, f"ov backend: inference failed on input {shape_in}: {e}")
        _send(sock, reply)
    engine.close()


def int8_float_layers(manifest: dict, flags=None) -> str:
    """What the int8 graph's float layers compute in here: bf16 where fit measured the graph so (manifest
    ``precision.int8.float_layers``, inside the budget) and this CPU computes bf16 natively; else fp32, which is at
    least as close to the fp32 network as what fit measured."""
    from vs_selftransfer.backend_base import native_support

    record = (manifest.get("precision") or {}).get("int8")
    measured = record.get("float_layers") if isinstance(record, dict) else None
    return "bf16" if measured == "bf16" and native_support("bf16", flags) is not None else "fp32"


def open_engine(onnx: bytes, *, what: str = "model.onnx", device: str = "cpu", precision: str = "fp32",
                threads: int = 0, window: tuple[int, int] | None = None, float_layers: str = "fp32"):
    """An engine for a graph given as bytes: in this process where OpenVINO loads here, else in a worker process.
    ``engine.infer_into(x, out)`` computes x (1, 3, h, w) float32 into ``out``; ``engine.close()`` ends it. The
    trainer measures precisions with it, so that what it measures is what the runtime will run."""
    kind, index = parse_device(device)
    if (reason := available(device)) is not None:
        raise RuntimeError(f"the ov backend cannot run on {device!r}: {reason}")
    if float_layers not in FLOAT_LAYERS:
        raise ValueError(f"float_layers must be one of {FLOAT_LAYERS}, not {float_layers!r}")
    if float_layers != "fp32" and precision != "int8":
        raise ValueError(f"float_layers applies to the int8 graph only, not to precision {precision}")
    options = dict(what=what, kind=kind, index=index, precision=precision, threads=threads, window=window,
                   float_layers=float_layers)
    why = in_process_unavailable()
    if why is None:
        return _Engine(onnx, **options)
    return _WorkerEngine(onnx, why=why, **options)


class Backend:
    name = "ov"

    def __init__(self, bundle, *, device: str = "cpu", precision: str = "fp32", threads: int = 0,
                 window: tuple[int, int] | None = None):
        kind, index, self.window = check_args(self.name, bundle, device, precision, threads, window, devices=DEVICES)
        if (reason := available(device)) is not None:
            raise RuntimeError(f"the ov backend cannot run on {device!r}: {reason}")
        member = onnx_member(bundle, precision)
        self.float_layers = int8_float_layers(bundle.manifest) if precision == "int8" and kind == "cpu" else "fp32"
        self.engine = open_engine(bundle.member(member), what=f"{bundle.path}: {member}", device=device,
                                  precision=precision, threads=threads, window=self.window,
                                  float_layers=self.float_layers)
        self._lock = threading.Lock()  # an infer request is not reentrant; a backend per stream avoids waiting here
        self.scale = bundle.scale
        self.precision = precision
        self.device = device
        where = f"worker process {self.engine.pid}" if isinstance(self.engine, _WorkerEngine) else "in process"
        computes = self.engine.actual + (" float layers" if precision == "int8" else "")
        self.description = (f"ov {self.engine.target} {precision} ({computes}), {threads or 'all'} threads, "
                            f"window {self.window}, {where}")

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = check_input(self.name, x, self.window)
        n, c, h, w = x.shape
        out = np.empty((n, c, h * self.scale, w * self.scale), np.float32)
        try:
            with self._lock:
                self.engine.infer_into(x, out)
        except RuntimeError as e:
            if str(e).startswith("ov backend") or "worker process" in str(e):
                raise
            raise RuntimeError(f"ov backend: inference failed on input {x.shape}: {e}") from None
        except Exception as e:  # noqa: BLE001
            raise RuntimeError(f"ov backend: inference failed on input {x.shape}: {e}") from None
        return out

    def close(self) -> None:
        self.engine.close()
