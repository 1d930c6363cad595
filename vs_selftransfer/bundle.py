"""The model bundle (``.stm``): the only contract between the trainer and the filter.

A zip (stored, not compressed) of:
  manifest.json       what the model is, how it was made, and the sha256/size of every other member
  weights.safetensors the weights (data only)
  model.onnx          the graph for ONNX Runtime / OpenVINO (data only), dynamic height/width
  model.ts            frozen TorchScript (carries code: only the ``torch`` backend opens it)       [optional]
  model.trt.ts        TensorRT engine via torch-tensorrt (code too: only the ``trt`` backend)      [optional]
  model.int8.onnx     per-video int8 model, when one was accepted (data only)                       [optional]

This one module writes and reads it; the trainer and the runtime share it. Everything is validated (member
allowlist, manifest schema, sizes, hashes) before any member's bytes are handed to anyone, and every problem comes
out as ``BundleError`` naming the bundle and what is wrong.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vs_selftransfer.files import atomic_write

FORMAT = "selftransfer-bundle"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# name -> (required, carries code)
MEMBERS = {
    "weights.safetensors": (True, False),
    "model.onnx": (True, False),
    "model.ts": (False, True),
    "model.trt.ts": (False, True),
    "model.int8.onnx": (False, False),
}
MAX_MEMBER_BYTES = 1 << 30
MAX_MANIFEST_BYTES = 1 << 20
ARCHS = ("carn_m", "carn")
SCALES = (2, 3, 4)
INPUT = {"channels": "RGB", "range": [0.0, 1.0], "layout": "NCHW", "dtype": "float32"}


class BundleError(ValueError):
    """A bundle cannot be used; the message says which file and why."""


def _fail(path, msg):
    raise BundleError(f"{path}: {msg}")


def _check_manifest(path, m) -> None:
    if not isinstance(m, dict):
        _fail(path, "manifest is not a JSON object")
    if m.get("format") != FORMAT:
        _fail(path, f"not a selftransfer bundle (manifest format is {m.get('format')!r}, expected {FORMAT!r})")
    v = m.get("format_version")
    if type(v) is not int:
        _fail(path, "manifest format_version is missing or not an integer")
    if v != FORMAT_VERSION:
        _fail(path, f"bundle format version {v} is not supported by this reader (supports {FORMAT_VERSION}); "
                    f"{'upgrade selftransfer' if v > FORMAT_VERSION else 're-export the bundle'}")
    if m.get("arch") not in ARCHS:
        _fail(path, f"manifest arch {m.get('arch')!r} is not one of {list(ARCHS)}")
    if type(m.get("scale")) is not int or m["scale"] not in SCALES:
        _fail(path, f"manifest scale {m.get('scale')!r} is not one of {list(SCALES)}")
    cfg = m.get("model_config")
    if not isinstance(cfg, dict) or cfg.get("arch") != m["arch"] or cfg.get("scale") != m["scale"]:
        _fail(path, "manifest model_config is missing or disagrees with arch/scale")
    for key in ("channels", "group"):
        if type(cfg.get(key)) is not int or not 1 <= cfg[key] <= 1024:
            _fail(path, f"manifest model_config.{key} is missing or out of range")
    if m.get("input") != INPUT:
        _fail(path, f"manifest input must be {INPUT}, not {m.get('input')!r}")
    members = m.get("members")
    if not isinstance(members, dict):
        _fail(path, "manifest members is missing or not an object")
    for name, info in members.items():
        if name not in MEMBERS:
            _fail(path, f"manifest lists unknown member {name!r}")
        if (not isinstance(info, dict) or type(info.get("size")) is not int or not 0 <= info["size"] <= MAX_MEMBER_BYTES
                or not isinstance(info.get("sha256"), str) or len(info["sha256"]) != 64):
            _fail(path, f"manifest entry for {name!r} needs an integer size and a sha256")
    for name, (required, _) in MEMBERS.items():
        if required and name not in members:
            _fail(path, f"bundle has no {name}")
    for key, typ in (("validation", dict), ("source", dict), ("degradation", dict), ("frames", dict),
                     ("train_config", dict), ("versions", dict), ("precision", dict)):
        if key in m and not isinstance(m[key], typ):
            _fail(path, f"manifest {key} must be a JSON {typ.__name__}")


ONNX_MEMBERS = ("model.onnx", "model.int8.onnx")


def check_onnx(data: bytes, what: str = "model.onnx") -> None:
    """Refuse an ONNX graph that is not self-contained data of the shape the runtime expects.

    The hashes only prove that the bundle is what its author wrote, not that the author is friendly. An ONNX tensor
    may point at an "external data" file by path (``/home/you/.ssh/id_rsa``, ``../../x``), which ONNX Runtime and
    OpenVINO would read when the graph is loaded; a bundle's graph must carry all its weights inline. The graph must
    also take one float (N, 3, H, W) input ``lr`` and give one float (N, 3, sH, sW) output ``sr``.
    """
    try:
        import onnx
    except ImportError:
        raise BundleError(f"{what}: cannot validate the ONNX graph: the onnx package is missing (pip install onnx)") from None
    try:
        model = onnx.ModelProto.FromString(data)
    except Exception as e:  # noqa: BLE001 - protobuf DecodeError and friends
        raise BundleError(f"{what}: not a valid ONNX model: {e}") from None
    external = onnx.TensorProto.EXTERNAL

    def tensors_of_attribute(a):
        yield from ([a.t] if a.HasField("t") else [])
        yield from a.tensors
        for sp in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
            yield sp.values
            yield sp.indices

    def graphs_of_attribute(a):
        yield from ([a.g] if a.HasField("g") else [])
        yield from a.graphs

    def check_nodes(nodes, depth):
        for node in nodes:
            for a in node.attribute:
                for t in tensors_of_attribute(a):
                    check_tensor(t)
                for g in graphs_of_attribute(a):
                    check_graph(g, depth + 1)

    def check_tensor(t):
        if t.data_location == external or len(t.external_data):
            raise BundleError(f"{what}: tensor {t.name!r} refers to external data; bundle graphs must be self-contained")

    def check_graph(g, depth):
        if depth > 32:
            raise BundleError(f"{what}: ONNX subgraphs nested too deeply")
        for t in g.initializer:
            check_tensor(t)
        for sp in g.sparse_initializer:
            check_tensor(sp.values)
            check_tensor(sp.indices)
        check_nodes(g.node, depth)

    check_graph(model.graph, 0)
    for f in model.functions:
        check_nodes(f.node, 1)

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    outputs = list(model.graph.output)

    def is_image(v, name):
        t = v.type.tensor_type
        dims = t.shape.dim
        return (v.name == name and v.type.HasField("tensor_type") and t.elem_type == onnx.TensorProto.FLOAT
                and len(dims) == 4 and dims[1].HasField("dim_value") and dims[1].dim_value == 3)

    if len(inputs) != 1 or not is_image(inputs[0], "lr"):
        raise BundleError(f"{what}: the graph must have one float input 'lr' of shape (N, 3, H, W), "
                          f"not {[i.name for i in inputs]}")
    if len(outputs) != 1 or not is_image(outputs[0], "sr"):
        raise BundleError(f"{what}: the graph must have one float output 'sr' of shape (N, 3, sH, sW), "
                          f"not {[o.name for o in outputs]}")


@dataclass
class Bundle:
    path: str
    manifest: dict
    _members: dict  # name -> bytes, all verified

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        path = str(path)
        if not os.path.exists(path):
            raise BundleError(f"{path}: model bundle not found")
        if not os.path.isfile(path):
            raise BundleError(f"{path}: not a file")
        try:
            zf = zipfile.ZipFile(path)
        except Exception as e:  # noqa: BLE001 - zipfile parses hostile bytes: BadZipFile, EOFError, struct.error...
            raise BundleError(f"{path}: not a selftransfer bundle (not a readable zip: {e})") from None
        with zf:
            try:
                infos = zf.infolist()
            except Exception as e:  # noqa: BLE001 - any structural damage
                raise BundleError(f"{path}: corrupt zip: {e}") from None
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                _fail(path, "duplicate member names")
            for n in names:
                if n != MANIFEST and n not in MEMBERS:
                    _fail(path, f"unknown member {n!r} (bundles hold only {[MANIFEST, *MEMBERS]}); refusing it")
            if MANIFEST not in names:
                _fail(path, "no manifest.json")
            raw = cls._read(zf, path, MANIFEST, MAX_MANIFEST_BYTES)
            try:
                manifest = json.loads(raw.decode("utf-8"))
            # ValueError covers JSONDecodeError, UnicodeDecodeError and ints longer than Python's 4300-digit limit.
            except (ValueError, RecursionError) as e:
                raise BundleError(f"{path}: manifest.json is not valid JSON: {e}") from None
            _check_manifest(path, manifest)
            listed = manifest["members"]
            for n in names:
                if n != MANIFEST and n not in listed:
                    _fail(path, f"member {n!r} is not listed in the manifest")
            members = {}
            for name, info in listed.items():
                if name not in names:
                    _fail(path, f"manifest lists {name!r} but the bundle does not contain it")
                stored = zf.getinfo(name).file_size
                if stored != info["size"]:
                    _fail(path, f"{name} is {stored} bytes, manifest says {info['size']}")
                data = cls._read(zf, path, name, info["size"])
                if len(data) != info["size"]:
                    _fail(path, f"{name} is {len(data)} bytes, manifest says {info['size']}")
                if hashlib.sha256(data).hexdigest() != info["sha256"]:
                    _fail(path, f"{name} does not match its sha256 in the manifest (corrupt or tampered)")
                members[name] = data
        for name in ONNX_MEMBERS:
            if name in members:
                check_onnx(members[name], f"{path}: {name}")
        return cls(path, manifest, members)

    @staticmethod
    def _read(zf, path, name, limit) -> bytes:
        try:
            info = zf.getinfo(name)
            if info.file_size > limit:
                _fail(path, f"{name} is larger than allowed ({info.file_size} > {limit} bytes)")
            with zf.open(info) as f:
                data = f.read(limit + 1)
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - zlib.error, BadZipFile (CRC), NotImplementedError, OSError...
            raise BundleError(f"{path}: cannot read member {name}: {e}") from None
        if len(data) > limit:
            _fail(path, f"{name} is larger than allowed")
        return data

    # -- accessors ------------------------------------------------------------------------------------------
    @property
    def scale(self) -> int:
        return self.manifest["scale"]

    @property
    def arch(self) -> str:
        return self.manifest["arch"]

    @property
    def sha256(self) -> str:
        """Identity of the model for engine cache keys: hash of the manifest (which hashes every member)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def has(self, name: str) -> bool:
        return name in self._members

    def member(self, name: str) -> bytes:
        if name not in self._members:
            raise BundleError(f"{self.path}: bundle has no {name}")
        return self._members[name]

    def model_config(self):
        from vs_selftransfer.model import ModelConfig
        try:
            return ModelConfig.from_dict(self.manifest["model_config"])
        except (TypeError, ValueError) as e:
            raise BundleError(f"{self.path}: bad model_config: {e}") from None

    def state_dict(self) -> dict:
        from safetensors.torch import load as load_safetensors
        try:
            return load_safetensors(self.member("weights.safetensors"))
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise BundleError(f"{self.path}: weights.safetensors is unreadable: {e}") from None

    def torch_model(self):
        """The network with the bundle's weights, in eval mode (for PyTorch evaluation and export checks)."""
        from vs_selftransfer.model import build_model, load_state
        try:
            return load_state(build_model(self.model_config()), self.state_dict()).eval()
        except ValueError as e:
            if isinstance(e, BundleError):
                raise
            raise BundleError(f"{self.path}: {e}") from None


def write_bundle(path: str | os.PathLike, manifest: dict, members: dict[str, bytes]) -> None:
    """Write atomically: a temp file in the same directory, fsync, rename. Fills manifest["members"]."""
    path = Path(path)
    manifest = dict(manifest)
    manifest.setdefault("format", FORMAT)
    manifest.setdefault("format_version", FORMAT_VERSION)
    manifest.setdefault("input", dict(INPUT))
    manifest["members"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in members.items()}
    _check_manifest(str(path), manifest)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(MANIFEST, json.dumps(manifest, indent=2, sort_keys=True))
        for n, b in members.items():
            zf.writestr(n, b)
    atomic_write(path, buf.getvalue())
