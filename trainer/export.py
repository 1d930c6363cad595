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

import torch

from vs_selftransfer import backend_trt
from vs_selftransfer.backend_ort import make_session, session_runner
from vs_selftransfer.graph_check import CHECK_SHAPES, GraphCheckError, check_graph, check_image
from vs_selftransfer.model import CARN, ModelConfig, build_model, load_state, official_to_single_scale, torch_runner
from vs_selftransfer.bundle import (MEMBERS, PROBE_SIDE, Bundle, check_onnx, check_probe_output, make_probe,
                                    printable, probe_as_float, write_bundle)

ONNX_OPSET = 18
# Export-time check: every fp32 graph must reproduce the eager model to this max absolute difference (the TensorRT
# fp16 engine to backend_trt.TRT_FP16_TOLERANCE).
CHECK_TOLERANCE = 1e-4
# The largest LR side the ONNX graph declares: 8K input, far beyond any tile.
MAX_SIDE = 8192
# Manifest fields that export_bundle writes itself; ``extra`` may not override them.
RESERVED = ("format", "format_version", "arch", "scale", "model_config", "input", "members", "created", "versions",
            "tensorrt", "export_checks", "probe")


class ExportCheckError(RuntimeError):
    """An exported graph does not reproduce the model: nothing was written."""


# --------------------------------------------------------------------------------------------------------------
# export
# --------------------------------------------------------------------------------------------------------------
def export_bundle(model: CARN, path: str | os.PathLike, *, extra: dict | None = None, torchscript: bool = True,
                  tensorrt: bool | str = "auto", check: bool = True, trt_shapes: dict | None = None,
                  int8: dict | None = None, val: list | None = None) -> dict:
    """Write a complete bundle for ``model`` to ``path`` (atomically) and return its manifest.

    ``extra``: more manifest fields (source, frames, degradation, train_config, validation, ...), JSON values.
    ``tensorrt``: "auto" (build a TensorRT engine when CUDA and torch-tensorrt are present), True (required: error
    otherwise) or False. ``check``: run every exported graph against the eager model and refuse to write a bundle
    whose graphs differ by more than CHECK_TOLERANCE (TRT_FP16_TOLERANCE for the fp16 engine).
    ``int8``: {"calib": [LR frames], "val": [(LR, HR) pairs]} (RGB uint8 HWC) to calibrate a per-video int8 graph
    (selftransfer_trainer.quantize), plus "pairs" (the training pairs file) and "qat" (a QATConfig) to make it by
    quantization-aware fine-tuning (selftransfer_trainer.qat); it is shipped only when its measured loss is within
    the budget, and the decision is recorded in the manifest's ``precision.int8`` either way.
    ``val``: held-out (LR, HR) pairs (RGB uint8 HWC; default: ``int8``'s) on which the bf16 loss is measured and
    recorded as ``precision.bf16`` (selftransfer_trainer.precision), which gates the runtime's bf16.
    """
    if not isinstance(model, CARN):
        raise TypeError(f"model must be a vs_selftransfer.model CARN/CARN-M network, not {type(model).__name__}")
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
    shapes = _check_trt_shapes(trt_shapes or backend_trt.TRT_SHAPES)
    build_trt = tensorrt is True or (tensorrt == "auto" and backend_trt.available() is None)
    if tensorrt is True and (reason := backend_trt.available()):
        raise RuntimeError(f"a TensorRT engine was required but cannot be built: {reason}")

    # Work on a private fp32 CPU copy: the caller's model keeps its device, dtype and train/eval mode.
    model = copy.deepcopy(model).float().cpu().eval()
    cfg = model.cfg
    checks: dict[str, float] = {}
    members = {"weights.safetensors": weights_bytes(model), "model.onnx": onnx_bytes(model)}
    check_onnx(members["model.onnx"], "exported model.onnx")
    eager = torch_runner(model, "cpu", channels_last=False)
    if check:
        checks["model.onnx"] = _check_graph("model.onnx", lambda: _onnx_runner(members["model.onnx"]), eager,
                                            CHECK_TOLERANCE)
    if torchscript:
        members["model.ts"] = torchscript_bytes(model)
        if check:
            checks["model.ts"] = _check_graph("model.ts", lambda: _torchscript_runner(members["model.ts"]), eager,
                                              CHECK_TOLERANCE)
    trt_info = None
    if build_trt:
        members["model.trt.ts"], trt_info = backend_trt.tensorrt_bytes(model, shapes)
        if check:
            checks["model.trt.ts"] = _check_graph(
                "model.trt.ts", lambda: backend_trt.engine_runner(members["model.trt.ts"]), eager,
                backend_trt.TRT_FP16_TOLERANCE, shapes=backend_trt.trt_check_shapes(shapes))
            trt_info["check_max_abs_diff"] = checks["model.trt.ts"]

    precision = {}
    if int8 is not None:
        from selftransfer_trainer.quantize import quantize_for_video

        data, report = quantize_for_video(members["model.onnx"], int8["calib"], int8["val"], cfg.scale, model=model,
                                          pairs_path=int8.get("pairs"), qat=int8.get("qat"))
        if data is not None:
            check_onnx(data, "calibrated model.int8.onnx")
            members["model.int8.onnx"] = data
        precision["int8"] = report
    val = val if val is not None else (int8 or {}).get("val")
    if val:
        from selftransfer_trainer.precision import measure_bf16

        precision["bf16"] = measure_bf16(members["model.onnx"], val, cfg.scale)

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
    manifest["probe"] = probe_block(model, members, cfg.scale)
    write_bundle(path, manifest, members)
    # Read it back through the one reader the runtime uses: what we return is what every consumer will see.
    return Bundle.open(path).verify().manifest


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


# -- checks ----------------------------------------------------------------------------------------------------
# The probe's input: check_image's gradients, edges and noise at PROBE_SIDE x PROBE_SIDE, in 8-bit steps.
PROBE_SEED = 20261201


def probe_block(model: CARN, members: dict[str, bytes], scale: int) -> dict:
    """The manifest's probe (vs_selftransfer.bundle): a deterministic 8-bit input, the eager fp32 network's output
    on it and, with an int8 graph, that graph's output (ONNX Runtime). The runtime runs the graph it is about to use
    on the probe at creation and refuses one that does not reproduce the record. The ONNX graph is held to the
    runtime's own fp32 rule here, so a bundle that would be refused is never written."""
    lr = (check_image((1, 3, PROBE_SIDE, PROBE_SIDE), seed=PROBE_SEED) * 255).round().to(torch.uint8).numpy()
    x = probe_as_float(lr)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    int8 = _onnx_runner(members["model.int8.onnx"])(x) if "model.int8.onnx" in members else None
    block = make_probe(lr, expected, int8)
    record = {"scale": scale, "probe": block}
    try:
        check_probe_output(record, "exported bundle", "model.onnx", "fp32", _onnx_runner(members["model.onnx"])(x))
    except ValueError as e:
        raise ExportCheckError(f"export check failed: {e}; nothing was written") from None
    return block


def _check_graph(name, make_runner, eager, tolerance, shapes=CHECK_SHAPES) -> float:
    """``vs_selftransfer.graph_check.check_graph``, a failure said as the export's: nothing is written."""
    try:
        return check_graph(name, make_runner, eager, tolerance, shapes)
    except GraphCheckError as e:
        raise ExportCheckError(f"export check failed: {e}; nothing was written") from e


def _onnx_runner(data: bytes):
    # One thread: the check inputs are small, and a thread pool's barriers cost more than they save on them
    # (badly so on a loaded machine).
    return session_runner(make_session(data, threads=1))


def _torchscript_runner(data: bytes):
    with _quiet():
        module = torch.jit.load(io.BytesIO(data), map_location="cpu")
    return torch_runner(module, "cpu", channels_last=False)


# -- helpers ---------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _quiet():
    """Silence the exporters' chatter (progress prints, torchvision-missing notices, TorchScript's deprecation
    FutureWarning: the torch backend's model.ts is TorchScript)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._export")]
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

    from vs_selftransfer.files import check_output_path

    out = check_output_path(args.output, args.force, inputs=[args.checkpoint])
    group = args.group
    if group is None and args.arch == "carn":
        group = 1
    model, extra = load_for_export(args.checkpoint, arch=args.arch, scale=args.scale, channels=args.channels,
                                   group=group)
    tensorrt = {"auto": "auto", "yes": True, "no": False}[args.tensorrt]
    if tensorrt is True and (reason := backend_trt.available()):
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
    bundle = Bundle.open(args.bundle).verify()
    if args.json:
        # ensure_ascii escapes every control character (and all non-ASCII) as \uXXXX: safe on any terminal.
        print(json.dumps(bundle.manifest, indent=2, sort_keys=True, ensure_ascii=True))
        return 0
    print(describe(bundle))
    return 0


def describe(bundle: Bundle) -> str:
    """What ``selftransfer info`` prints. Every string that comes from the manifest goes through ``printable``: a
    manifest is written by whoever made the bundle, and must not be able to drive the terminal."""
    m = bundle.manifest
    cfg = m["model_config"]
    p = printable
    probe = "a probe ties the graphs to the weights" if bundle.has_probe else \
        "no probe: the filter refuses this bundle, re-export it"
    lines = [f"{p(bundle.path)}: selftransfer bundle v{m['format_version']} (valid: manifest, sizes and sha256 "
             f"checked; {probe})",
             f"  model:       {m['arch']} x{m['scale']}, {cfg['channels']} channels, group {cfg['group']}",
             f"  input:       {m['input']['channels']} float in [{m['input']['range'][0]}, {m['input']['range'][1]}], "
             f"{m['input']['layout']}"]
    if "created" in m:
        lines.append(f"  created:     {p(m['created'])}")
    src = m.get("source")
    if isinstance(src, dict) and src:
        desc = src.get("path") or src.get("name") or ""
        sha = src.get("sha256")
        lines.append(f"  source:      {p(desc)}" + (f" (sha256 {p(str(sha)[:16])}...)" if sha else ""))
    setting = m.get("setting")
    if isinstance(setting, dict) and isinstance(setting.get("text"), str):
        lines.append(f"  setting:     {p(setting['text'])}")
        target = setting.get("target")
        if isinstance(target, dict) and target.get("kind") == "teacher":
            lines.append(f"  targets:     {p(str(target.get('what', 'a teacher')))} ({p(str(target.get('model')))})")
    frames = m.get("frames")
    if isinstance(frames, dict) and frames:
        parts = [f"{k} {len(v)}" if isinstance(v, list) else f"{k} {v}" for k, v in frames.items()
                 if isinstance(v, (list, int, float, str))]
        lines.append(f"  frames:      {p(', '.join(parts))}")
    deg = m.get("degradation")
    if isinstance(deg, dict) and deg:
        lines.append(f"  degradation: {p(', '.join(f'{k}={v}' for k, v in deg.items()))}")
    val = m.get("validation")
    if isinstance(val, dict) and val:
        numbers = _fmt_validation(val)
        if numbers:
            lines.append("  validation:  " + p(", ".join(numbers)))
        for key in ("shipped", "message"):
            if isinstance(val.get(key), str):
                lines.append(f"  {key + ':':12s} {p(val[key])}")
    precision = m.get("precision")
    if isinstance(precision, dict) and precision:
        for name, record in precision.items():
            lines.append(f"  {p(name) + ':':12s} {p(_fmt_precision(record))}")
    from vs_selftransfer.runtime import backend_choice, precision_choice  # what Upscale's defaults run here, and why
    auto_backend, why = backend_choice("cpu")
    lines.append(f"  auto here:   {p(why)}; {p(precision_choice(bundle, auto_backend, 'cpu')[1])}")
    lines.append("  members:")
    for name, info in m["members"].items():
        code = "carries code: only the {} backend opens it".format("trt" if "trt" in name else "torch") \
            if MEMBERS[name][1] else "data only"
        lines.append(f"    {name:20s} {_size(info['size']):>9s}  {code}")
    trt = m.get("tensorrt")
    if isinstance(trt, dict):
        lines.append(p(f"  tensorrt:    {trt.get('precision')} engine for {trt.get('gpu')} (sm "
                       f"{trt.get('compute_capability')}), TensorRT {trt.get('tensorrt')}, shapes "
                       f"{trt.get('min_shape')}..{trt.get('max_shape')}"))
    versions = m.get("versions")
    if isinstance(versions, dict) and versions:
        lines.append("  versions:    " + p(", ".join(f"{k} {v}" for k, v in versions.items())))
    return "\n".join(lines)


def _fmt_precision(record) -> str:
    """One precision record of the manifest (trainer/quantize.py, trainer/precision.py) in words."""
    if not isinstance(record, dict):
        return "unreadable record"
    if record.get("measured") is False:
        return f"not measured ({record.get('reason', 'no reason given')})"
    num = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    words = ["accepted" if record.get("accepted") is True else "refused"]
    if num(record.get("loss_db")):
        words.append(f"{-record['loss_db']:+.3f} dB vs fp32 on {record.get('frames', 'the')} held-out frames "
                     f"(budget {record.get('budget_db')} dB)")
    engine = f"measured with {record.get('engine')}"
    if isinstance(record.get("float_layers"), str):
        engine += f", {record['float_layers']} float layers"
    words.append(engine)
    speed = record.get("s_per_val_frame")
    if isinstance(speed, dict) and all(num(v) for v in speed.values()) and speed:
        order = sorted(speed, key=lambda k: k != "fp32")  # fp32 first: the others are read against it
        words.append(" -> ".join(f"{k} {speed[k]:.2f}" for k in order) + " s/frame")
    return ", ".join(words)


def _fmt_validation(val: dict) -> list[str]:
    """The numbers of the validation block ("bicubic_psnr_y 30.123 dB", ...), nested dicts flattened (walked
    without recursion: the reader bounds the depth, this does not rely on it)."""
    out, stack = [], [("", iter(val.items()))]
    while stack:
        prefix, items = stack[-1]
        for k, v in items:
            if isinstance(v, dict):
                stack.append((f"{prefix}{k}.", iter(v.items())))
                break
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                psnr = "psnr" in (prefix + k).lower()
                out.append(f"{prefix}{k} {v:.3f} dB" if psnr else f"{prefix}{k} {v:g}")
            elif v is None and "psnr" in k.lower():
                out.append(f"{prefix}{k} -")
        else:
            stack.pop()
    return out


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
