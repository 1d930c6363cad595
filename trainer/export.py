"""Export a model as a bundle (``.stm``) and inspect bundles: ``selftransfer export`` and ``selftransfer info``.

A bundle holds the weights (safetensors) and the same network as ready-to-run graphs: ``model.onnx`` (data only,
for ONNX Runtime and OpenVINO), ``model.ts`` (frozen TorchScript, for the ``torch`` backend) and, on a CUDA machine
with torch-tensorrt, ``model.trt.ts`` (a TensorRT fp16 engine wrapped in TorchScript). Every graph is run against
the eager PyTorch model before anything is written: a graph that does not reproduce the weights never ships.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import logging
import os
import platform
import sys
import warnings
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from vs_selftransfer.model import CARN, ModelConfig, build_model, load_state, official_to_single_scale
from vs_selftransfer.bundle import MEMBERS, Bundle, check_onnx, write_bundle

ONNX_OPSET = 18
# Export-time check: every fp32 graph must reproduce the eager model to this max absolute difference.
CHECK_TOLERANCE = 1e-4
# A TensorRT fp16 engine cannot meet the fp32 bound: fp16 has an 11-bit mantissa (about 5e-4 relative on values
# near 1) and the error accumulates over CARN-M's ~40 convolutions. 2e-2 is about 5 levels of 8-bit output: it
# catches a broken engine (wrong weights, wrong layout, garbage) while accepting honest half-precision rounding.
TRT_FP16_TOLERANCE = 2e-2
# Check inputs: one odd non-square size (catches padding/stride mistakes) and one square size with a batch of 2
# (the ONNX graph and TorchScript module claim a dynamic batch).
CHECK_SHAPES = ((1, 3, 37, 53), (2, 3, 64, 64))
# The largest LR side the ONNX graph declares: 8K input, far beyond any tile.
MAX_SIDE = 8192
# TensorRT engine profile (LR input, NCHW): from small tiles to a whole 1080p frame, tuned for whole 1080p frames.
TRT_SHAPES = {"min": (1, 3, 16, 16), "opt": (1, 3, 1080, 1920), "max": (1, 3, 1088, 1920)}
# Manifest fields that export_bundle writes itself; ``extra`` may not override them.
RESERVED = ("format", "format_version", "arch", "scale", "model_config", "input", "members", "created", "versions",
            "tensorrt", "export_checks")


class ExportCheckError(RuntimeError):
    """An exported graph does not reproduce the model: nothing was written."""


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------
def export_bundle(model: CARN, path: str | os.PathLike, *, extra: dict | None = None, torchscript: bool = True,
                  tensorrt: bool | str = "auto", check: bool = True, trt_shapes: dict | None = None,
                  int8: dict | None = None) -> dict:
    """Write a complete bundle for ``model`` to ``path`` (atomically) and return its manifest.

    ``extra``: more manifest fields (source, frames, degradation, train_config, validation, ...), JSON values.
    ``tensorrt``: "auto" (build a TensorRT engine when CUDA and torch-tensorrt are present), True (required: error
    otherwise) or False. ``check``: run every exported graph against the eager model and refuse to write a bundle
    whose graphs differ by more than CHECK_TOLERANCE (TRT_FP16_TOLERANCE for the fp16 engine).
    ``int8``: {"calib": [LR frames], "val": [(LR, HR) pairs]} (RGB uint8 HWC) to calibrate a per-video int8 graph
    (trainer.quantize); it is shipped only when its measured loss is within the budget, and the decision is
    recorded in the manifest's ``precision.int8`` either way.
    """
    if not isinstance(model, CARN):
        raise TypeError(f"model must be a trainer.model CARN/CARN-M network, not {type(model).__name__}")
    if tensorrt not in ("auto", True, False):
        raise ValueError(f"tensorrt must be 'auto', True or False, not {tensorrt!r}")
    if not isinstance(torchscript, bool) or not isinstance(check, bool):
        raise TypeError("torchscript and check must be booleans")
    extra = _check_extra(extra)
    path = Path(path)
    if path.is_dir():
        raise IsADirectoryError(f"output path is a directory: {path}")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {path.parent}")
    shapes = _check_trt_shapes(trt_shapes or TRT_SHAPES)
    build_trt = tensorrt is True or (tensorrt == "auto" and tensorrt_unavailable() is None)
    if tensorrt is True and (reason := tensorrt_unavailable()):
        raise RuntimeError(f"a TensorRT engine was required but cannot be built: {reason}")

    # Work on a private fp32 CPU copy: the caller's model keeps its device, dtype and train/eval mode.
    model = copy.deepcopy(model).float().cpu().eval()
    cfg = model.cfg
    checks: dict[str, float] = {}
    members = {"weights.safetensors": weights_bytes(model), "model.onnx": onnx_bytes(model)}
    check_onnx(members["model.onnx"], "exported model.onnx")
    if check:
        checks["model.onnx"] = _check_graph("model.onnx", lambda: _onnx_runner(members["model.onnx"]), model,
                                            CHECK_TOLERANCE)
    if torchscript:
        members["model.ts"] = torchscript_bytes(model)
        if check:
            checks["model.ts"] = _check_graph("model.ts", lambda: _torchscript_runner(members["model.ts"]), model,
                                              CHECK_TOLERANCE)
    trt_info = None
    if build_trt:
        members["model.trt.ts"], trt_info = tensorrt_bytes(model, shapes)
        if check:
            checks["model.trt.ts"] = _check_graph("model.trt.ts", lambda: _tensorrt_runner(members["model.trt.ts"]),
                                                  model, TRT_FP16_TOLERANCE, shapes=trt_check_shapes(shapes))
            trt_info["check_max_abs_diff"] = checks["model.trt.ts"]

    precision = None
    if int8 is not None:
        from selftransfer_trainer.quantize import quantize_for_video

        data, report = quantize_for_video(members["model.onnx"], int8["calib"], int8["val"], cfg.scale)
        if data is not None:
            check_onnx(data, "calibrated model.int8.onnx")
            members["model.int8.onnx"] = data
        precision = {"int8": report}

    manifest = {
        "arch": cfg.arch,
        "scale": cfg.scale,
        "model_config": cfg.to_dict(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(build_trt),
        **extra,
    }
    if checks:
        manifest["export_checks"] = {"tolerance": CHECK_TOLERANCE, "max_abs_diff": checks}
    if trt_info:
        manifest["tensorrt"] = trt_info
    if precision:
        manifest["precision"] = precision
    write_bundle(path, manifest, members)
    # Read it back through the one reader the runtime uses: what we return is what every consumer will see.
    return Bundle.open(path).manifest


def weights_bytes(model: CARN) -> bytes:
    from safetensors.torch import save
    # Contiguous clones: safetensors refuses views and shared storage.
    return save({k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()})


def onnx_bytes(model: CARN) -> bytes:
    """The model as a self-contained ONNX graph: input "lr" (N, 3, H, W), output "sr" (N, 3, sH, sW), dynamic N/H/W.

    The torch.export-based exporter (torch.onnx ``dynamo=True``): the TorchScript-based one is deprecated. Its
    optimizer folds constants; the graph is the bare sequence of Conv/Relu/Concat/Add/DepthToSpace, the same one the
    legacy exporter gives (we compared ops and initializers), so ONNX Runtime and OpenVINO see a clean graph.
    """
    from torch.export import Dim

    example = torch.rand(1, 3, 64, 64)
    dims = {0: Dim("batch", min=1, max=64), 2: Dim("height", min=1, max=MAX_SIDE), 3: Dim("width", min=1, max=MAX_SIDE)}
    with _quiet():
        program = torch.onnx.export(
            model, (example,), dynamo=True, input_names=["lr"], output_names=["sr"], opset_version=ONNX_OPSET,
            dynamic_shapes=(dims,), optimize=True, external_data=False, verbose=False, report=False)
    proto = program.model_proto
    # The exporter records the Python stack of every op (file paths of the exporting machine): not model data.
    for node in proto.graph.node:
        del node.metadata_props[:]
    proto.producer_name = "selftransfer"
    return proto.SerializeToString()


def torchscript_bytes(model: CARN) -> bytes:
    """Frozen TorchScript (traced: CARN has no data-dependent control flow, so the trace is shape-generic)."""
    example = torch.rand(1, 3, 64, 64)
    with _quiet(), torch.no_grad():
        frozen = torch.jit.freeze(torch.jit.trace(model, (example,)))
        buf = io.BytesIO()
        torch.jit.save(frozen, buf)
    return buf.getvalue()


def tensorrt_unavailable() -> str | None:
    """None when a TensorRT engine can be built here, else why not."""
    if not torch.cuda.is_available():
        return "no CUDA device is available"
    try:
        import torch_tensorrt  # noqa: F401
    except ImportError:
        return "torch-tensorrt is not installed (pip install 'selftransfer[tensorrt]')"
    except Exception as e:  # noqa: BLE001 - a broken CUDA/TensorRT install fails in many ways at import
        return f"torch-tensorrt does not import: {e}"
    return None


def tensorrt_bytes(model: CARN, shapes: dict, precision: str = "fp16",
                   device: "torch.device | None" = None) -> tuple[bytes, dict]:
    """A TensorRT engine for the input range ``shapes`` (min/opt/max; all equal for a static engine), wrapped in
    TorchScript, and the facts that tie it to this machine (GPU, TensorRT version, shapes, precision).

    For fp16 the model is cast to half before compiling, so the engine is fp16 by construction whatever TensorRT's
    typing mode (strong typing is the default from TensorRT 10); its input and output are then float16.
    """
    import tempfile

    import torch_tensorrt

    if precision not in ("fp16", "fp32"):
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
    major, minor = torch.cuda.get_device_capability(device)
    info = {
        "precision": precision,
        "input_dtype": "float16" if precision == "fp16" else "float32",
        "min_shape": list(shapes["min"]),
        "opt_shape": list(shapes["opt"]),
        "max_shape": list(shapes["max"]),
        "torch_tensorrt": _version_of("torch-tensorrt"),
        "tensorrt": _version_of("tensorrt"),
        "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name(device),
        "compute_capability": f"{major}.{minor}",
    }
    return data, info


# -- checks ----------------------------------------------------------------------------------------------------
def check_input(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """A deterministic image-like input in [0, 1]: smooth gradients, edges and a little noise (real content has all
    three; pure noise alone would exercise only one regime of the network)."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = shape
    yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
    base = torch.stack([xx, yy, (xx + yy) / 2])[:c]
    edges = ((torch.sin(xx * 23) * torch.cos(yy * 17)) > 0).float()
    img = 0.6 * base + 0.3 * edges + 0.1 * torch.rand(n, c, h, w, generator=g)
    return img.clamp(0, 1).contiguous()


def trt_check_shapes(shapes: dict) -> list[tuple[int, ...]]:
    """Check shapes inside an engine's profile: its smallest shape and an odd one near 37x53 (clamped to the range)."""
    lo, hi = shapes["min"], shapes["max"]
    odd = tuple(min(hi[i], max(lo[i], v)) for i, v in enumerate((1, 3, 37, 53)))
    return [tuple(lo)] if odd == tuple(lo) else [tuple(lo), odd]


def _check_graph(name, make_runner, model, tolerance, shapes=CHECK_SHAPES) -> float:
    """Run the graph (``make_runner()`` loads it) on check inputs against the eager model; the max abs difference,
    or ExportCheckError when it does not load, does not run, or differs by more than ``tolerance``."""
    try:
        run = make_runner()
    except Exception as e:  # noqa: BLE001 - a graph that does not load is a failed check, said as such
        raise ExportCheckError(f"export check failed: {name} does not load: {e}; nothing was written") from e
    worst = 0.0
    for i, shape in enumerate(shapes):
        x = check_input(shape, seed=i)
        with torch.no_grad():
            expected = model(x).numpy()
        try:
            got = np.asarray(run(x.numpy()), dtype=np.float32)
        except Exception as e:  # noqa: BLE001 - a graph that does not run is a failed check, said as such
            raise ExportCheckError(f"export check failed: {name} does not run on a {shape} input: {e}; "
                                   f"nothing was written") from e
        if got.shape != expected.shape:
            raise ExportCheckError(f"export check failed: {name} returned shape {got.shape} for input {shape}, "
                                   f"expected {expected.shape}; nothing was written")
        diff = float(np.abs(got - expected).max()) if np.isfinite(got).all() else float("inf")
        if not diff <= tolerance:
            raise ExportCheckError(f"export check failed: {name} differs from the PyTorch model by {diff:.3g} "
                                   f"(> {tolerance:g}) on a {shape[2]}x{shape[3]} input; nothing was written")
        worst = max(worst, diff)
    return worst


def _onnx_runner(data: bytes):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    # One thread: the check inputs are small, and a thread pool's barriers cost more than they save on them
    # (badly so on a loaded machine).
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    session = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
    return lambda x: session.run(["sr"], {"lr": x})[0]


def _torchscript_runner(data: bytes):
    with _quiet():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x)).numpy()
    return run


def _tensorrt_runner(data: bytes, precision: str = "fp16", device: "torch.device | None" = None):
    import torch_tensorrt  # noqa: F401 - registers the TensorRT engine class TorchScript refers to

    device = device or torch.device("cuda", torch.cuda.current_device())
    dtype = torch.half if precision == "fp16" else torch.float32
    with _quiet():
        module = torch.jit.load(io.BytesIO(data), map_location=device)

    def run(x):
        with torch.inference_mode():
            return module(torch.from_numpy(x).to(device, dtype)).float().cpu().numpy()
    return run


# -- helpers ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (progress prints, torchvision-missing notices, TorchScript's deprecation
    FutureWarning: TorchScript is what issue 2 asks for and what torch-tensorrt serializes to)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export", "torch_tensorrt")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.(onnx|jit|export)")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _check_extra(extra) -> dict:
    if extra is None:
        return {}
    if not isinstance(extra, dict):
        raise TypeError(f"extra must be a dict of manifest fields, not {type(extra).__name__}")
    clash = sorted(set(extra) & set(RESERVED))
    if clash:
        raise ValueError(f"extra may not set {clash}: export_bundle writes those fields itself")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"extra must hold JSON values only: {e}") from None
    for key in ("validation", "source", "degradation", "frames", "train_config", "precision"):
        if key in extra and not isinstance(extra[key], dict):
            raise ValueError(f"extra[{key!r}] must be a dict, not {type(extra[key]).__name__}")
    return copy.deepcopy(extra)


def _check_trt_shapes(shapes) -> dict:
    try:
        out = {k: tuple(int(v) for v in shapes[k]) for k in ("min", "opt", "max")}
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"trt_shapes must map min/opt/max to NCHW shapes, not {shapes!r}") from None
    for k, s in out.items():
        if len(s) != 4 or s[1] != 3 or min(s) < 1:
            raise ValueError(f"trt_shapes[{k!r}] must be (N, 3, H, W) with positive sizes, not {s}")
    if not all(a <= b <= c for a, b, c in zip(out["min"], out["opt"], out["max"])):
        raise ValueError(f"trt_shapes must satisfy min <= opt <= max in every dimension: {out}")
    return out


def _version_of(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _versions(with_trt: bool) -> dict:
    from vs_selftransfer import __version__
    out = {"selftransfer": __version__, "python": platform.python_version(), "torch": torch.__version__}
    dists = ["onnx", "onnxscript", "onnxruntime", "safetensors", "numpy"]
    if with_trt:
        dists += ["torch-tensorrt", "tensorrt"]
    for d in dists:
        if (v := _version_of(d)) is not None:
            out[d] = v
    return out


# --------------------------------------------------------------------------------------------------------------
# loading what the CLI is given
# --------------------------------------------------------------------------------------------------------------
# Manifest fields a training checkpoint may carry into the bundle.
CHECKPOINT_FIELDS = ("source", "frames", "degradation", "train_config", "validation", "generic_shipped")


def load_for_export(path: str | os.PathLike, *, arch: str | None = None, scale: int | None = None,
                    channels: int | None = None, group: int | None = None) -> tuple[CARN, dict]:
    """(model, extra manifest fields) from a training checkpoint, a bundle, or a plain .pth/.safetensors state dict.

    Training checkpoints and bundles describe their own architecture; a plain state dict needs ``scale`` (and
    ``arch``/``channels``/``group`` when they are not CARN-M's defaults). Raises UserError for every bad input.
    """
    from vs_selftransfer.errors import UserError

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise IsADirectoryError(f"checkpoint is a directory, not a file: {path}")
    overrides = {k: v for k, v in (("arch", arch), ("scale", scale), ("channels", channels), ("group", group))
                 if v is not None}

    def agree(cfg: ModelConfig, what: str) -> None:
        for k, v in overrides.items():
            if getattr(cfg, k) != v:
                raise UserError(f"--{k} {v} disagrees with the {what}, which is {k}={getattr(cfg, k)!r}")

    if path.suffix == ".stm":  # re-export a bundle, e.g. to add a TensorRT engine on a GPU machine
        bundle = Bundle.open(path)
        cfg = bundle.model_config()
        agree(cfg, "bundle")
        return bundle.torch_model(), {k: v for k, v in bundle.manifest.items() if k not in RESERVED}
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            state, extra, cfg = load_file(str(path)), {}, None
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path} is not a readable safetensors file: {e}") from None
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - UnpicklingError for code-carrying pickles, zip errors for garbage
            raise UserError(f"{path} is not a weights-only PyTorch checkpoint: {str(e).splitlines()[0]}") from None
        if not isinstance(obj, dict):
            raise UserError(f"{path} does not hold a state dict or a training checkpoint")
        if isinstance(obj.get("model"), dict) and isinstance(obj.get("model_config"), dict):
            try:
                cfg = ModelConfig.from_dict(obj["model_config"])
            except (TypeError, ValueError) as e:
                raise UserError(f"{path}: bad model_config in the checkpoint: {e}") from None
            agree(cfg, "training checkpoint")
            state = obj["model"]
            # train.py's resumable checkpoint.pt holds the weights of the last step and, under "best", the best
            # validated ones: the latter are what training ships (its model.pth holds only those).
            best = obj.get("best")
            if obj.get("format") == "selftransfer-train-checkpoint" and isinstance(best, dict) \
                    and isinstance(best.get("model"), dict):
                state = best["model"]
            extra = {k: obj[k] for k in CHECKPOINT_FIELDS if k in obj}
            try:
                json.dumps(extra)
            except (TypeError, ValueError):
                extra = {k: v for k, v in extra.items() if _is_json(v)}
        else:
            state, extra, cfg = obj, {}, None
    if cfg is None:
        if "scale" not in overrides:
            raise UserError(f"{path} is a plain state dict: pass --scale (and --arch/--channels/--group unless it "
                            f"is CARN-M with 64 channels and group 4)")
        try:
            cfg = ModelConfig(**overrides)
        except ValueError as e:
            raise UserError(str(e)) from None
    try:
        model = load_state(build_model(cfg), official_to_single_scale(state, cfg.scale))
    except ValueError as e:
        raise UserError(f"{path}: {e}") from None
    return model, extra


def _is_json(v) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------------------
# CLI
# --------------------------------------------------------------------------------------------------------------
def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="training checkpoint (trainer/train.py), bundle (.stm), or .pth/.safetensors "
                                      "weights (then --scale is needed)")
    p.add_argument("-o", "--output", required=True, help="bundle to write (.stm)")
    p.add_argument("--force", action="store_true", help="overwrite the output if it exists")
    p.add_argument("--arch", choices=["carn_m", "carn"], help="architecture of plain weights (default carn_m)")
    p.add_argument("--scale", type=int, choices=[2, 3, 4], help="upscaling factor of plain weights")
    p.add_argument("--channels", type=int, help="feature channels of plain weights (default 64)")
    p.add_argument("--group", type=int, help="conv groups of plain weights (default 4 for CARN-M, 1 for CARN)")
    p.add_argument("--no-torchscript", action="store_true", help="leave out model.ts (the torch backend then "
                                                                  "builds the network from the weights)")
    p.add_argument("--tensorrt", choices=["auto", "yes", "no"], default="auto",
                   help="add a TensorRT fp16 engine: auto = when CUDA and torch-tensorrt are present (default)")


def run_export(args) -> int:
    from vs_selftransfer.errors import UserError

    out = Path(args.output)
    if out.is_dir():
        raise IsADirectoryError(f"output is a directory: {out}")
    if out.exists() and not args.force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it")
    if not out.parent.is_dir():
        raise FileNotFoundError(f"output directory does not exist: {out.parent}")
    if not os.access(out.parent, os.W_OK):
        raise PermissionError(f"output directory is not writable: {out.parent}")
    group = args.group
    if group is None and args.arch == "carn":
        group = 1
    model, extra = load_for_export(args.checkpoint, arch=args.arch, scale=args.scale, channels=args.channels,
                                   group=group)
    tensorrt = {"auto": "auto", "yes": True, "no": False}[args.tensorrt]
    if tensorrt is True and (reason := tensorrt_unavailable()):
        raise UserError(f"--tensorrt yes: cannot build a TensorRT engine here: {reason}")
    torch.set_num_threads(max(1, min(torch.get_num_threads(), os.cpu_count() or 1)))
    try:
        manifest = export_bundle(model, out, extra=extra, torchscript=not args.no_torchscript, tensorrt=tensorrt)
    except ExportCheckError as e:
        print(f"selftransfer export: error: {e}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{n} {_size(i['size'])}" for n, i in manifest["members"].items())
    print(f"wrote {out}: {manifest['arch']} x{manifest['scale']} ({sizes})")
    return 0


def add_info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="model bundle (.stm)")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")


def run_info(args) -> int:
    bundle = Bundle.open(args.bundle)
    if args.json:
        print(json.dumps(bundle.manifest, indent=2, sort_keys=True))
        return 0
    print(describe(bundle))
    return 0


def describe(bundle: Bundle) -> str:
    m = bundle.manifest
    cfg = m["model_config"]
    lines = [f"{bundle.path}: selftransfer bundle v{m['format_version']} (valid: manifest, sizes and sha256 checked)",
             f"  model:       {m['arch']} x{m['scale']}, {cfg['channels']} channels, group {cfg['group']}",
             f"  input:       {m['input']['channels']} float in [{m['input']['range'][0]}, {m['input']['range'][1]}], "
             f"{m['input']['layout']}"]
    if "created" in m:
        lines.append(f"  created:     {m['created']}")
    src = m.get("source")
    if isinstance(src, dict) and src:
        desc = src.get("path") or src.get("name") or ""
        sha = src.get("sha256")
        lines.append(f"  source:      {desc}" + (f" (sha256 {str(sha)[:16]}...)" if sha else ""))
    frames = m.get("frames")
    if isinstance(frames, dict) and frames:
        parts = [f"{k} {len(v)}" if isinstance(v, list) else f"{k} {v}" for k, v in frames.items()
                 if isinstance(v, (list, int, float, str))]
        lines.append(f"  frames:      {', '.join(parts)}")
    deg = m.get("degradation")
    if isinstance(deg, dict) and deg:
        lines.append(f"  degradation: {', '.join(f'{k}={v}' for k, v in deg.items())}")
    val = m.get("validation")
    if isinstance(val, dict) and val:
        numbers = _fmt_validation(val)
        if numbers:
            lines.append("  validation:  " + ", ".join(numbers))
        for key in ("shipped", "message"):
            if isinstance(val.get(key), str):
                lines.append(f"  {key + ':':12s} {val[key]}")
    precision = m.get("precision")
    if isinstance(precision, dict) and precision:
        lines.append(f"  precision:   {json.dumps(precision, sort_keys=True)}")
    lines.append("  members:")
    for name, info in m["members"].items():
        code = "carries code: only the {} backend opens it".format("trt" if "trt" in name else "torch") \
            if MEMBERS[name][1] else "data only"
        lines.append(f"    {name:20s} {_size(info['size']):>9s}  {code}")
    trt = m.get("tensorrt")
    if isinstance(trt, dict):
        lines.append(f"  tensorrt:    {trt.get('precision')} engine for {trt.get('gpu')} (sm {trt.get('compute_capability')}), "
                     f"TensorRT {trt.get('tensorrt')}, shapes {trt.get('min_shape')}..{trt.get('max_shape')}")
    versions = m.get("versions")
    if isinstance(versions, dict) and versions:
        lines.append("  versions:    " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    return "\n".join(lines)


def _fmt_validation(val: dict, prefix: str = "") -> list[str]:
    """The numbers of the validation block ("bicubic_psnr_y 30.123 dB", ...), nested dicts flattened."""
    out = []
    for k, v in val.items():
        if isinstance(v, dict):
            out += _fmt_validation(v, f"{prefix}{k}.")
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            psnr = "psnr" in (prefix + k).lower()
            out.append(f"{prefix}{k} {v:.3f} dB" if psnr else f"{prefix}{k} {v:g}")
        elif v is None and "psnr" in k.lower():
            out.append(f"{prefix}{k} -")
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
