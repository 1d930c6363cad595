"""The model bundle (``.stm``): the only contract between the trainer and the filter.

A zip of stored (uncompressed) members:
  manifest.json       what the model is, how it was made, the sha256/size of every other member, and the probe
  weights.safetensors the weights (data only, float32)
  model.onnx          the graph for ONNX Runtime / OpenVINO (data only), dynamic height/width
  model.ts            frozen TorchScript (carries code: only the ``torch`` backend opens it)       [optional]
  model.trt.ts        TensorRT engine via torch-tensorrt (code too: only the ``trt`` backend)      [optional]
  model.int8.onnx     per-video int8 model, when one was accepted (data only)                       [optional]

This one module writes and reads it; the trainer and the runtime share it. ``Bundle.open`` reads only the zip's
directory and the manifest, and validates them (member allowlist, printable names, stored members inside the file,
size budgets, manifest schema and depth); it reads no member. Each member is read when someone asks for it
(:meth:`Bundle.member`), and its sha256 and content checks (ONNX graphs self-contained, weights float32 and finite)
are made then, so a backend only ever touches what it opens. :meth:`Bundle.verify` streams every member's hash
without keeping any. Every problem comes out as ``BundleError`` naming the bundle and what is wrong.

The probe (format version 2): a small deterministic input and the network's output on it, recorded at export.
The runtime runs the graph it is about to use on the probe before the first frame (see
:func:`check_probe_output`), which ties the graph to the weights and to the manifest's scale.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import os
import stat
import struct
import zipfile
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from vs_selftransfer.files import atomic_write

FORMAT = "selftransfer-bundle"
# 2: the manifest carries a probe. Version 1 bundles (no probe) still open, so that `info` can show them and
# `selftransfer export OLD.stm -o NEW.stm` can re-export them; the runtime refuses them (nothing ties their graph
# to their weights).
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
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
# All members together (the file itself may not be larger): a CARN-M bundle is a few MiB, a TensorRT engine for
# 1080p some tens; 2 GiB leaves room for big CARNs and never lets a bundle claim more than that.
MAX_TOTAL_BYTES = 2 << 30
# JSON nesting: our manifests nest 4 deep; 32 leaves room for any honest metadata and keeps every recursive
# consumer (json.dumps, repr, printing) far from Python's recursion limit.
MAX_MANIFEST_DEPTH = 32
ARCHS = ("carn_m", "carn")
SCALES = (2, 3, 4)
INPUT = {"channels": "RGB", "range": [0.0, 1.0], "layout": "NCHW", "dtype": "float32"}
_CHUNK = 1 << 20


class BundleError(ValueError):
    """A bundle cannot be used; the message says which file and why."""


def _fail(path, msg):
    raise BundleError(f"{path}: {msg}")


def _show(value, limit: int = 60) -> str:
    """A manifest value for an error message: repr (control characters escaped), cut to ``limit`` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def manifest_depth(value, limit: int = MAX_MANIFEST_DEPTH) -> int:
    """Nesting depth of a JSON value (a scalar is 0, ``{}`` is 1), counted without recursion; counting stops just
    past ``limit``."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, (dict, list)):
            deepest = max(deepest, depth)
            if depth > limit:
                return depth
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return deepest


def _check_manifest(path, m) -> None:
    if not isinstance(m, dict):
        _fail(path, "manifest is not a JSON object")
    if manifest_depth(m) > MAX_MANIFEST_DEPTH:
        _fail(path, f"manifest nests more than {MAX_MANIFEST_DEPTH} levels deep; not a selftransfer manifest")
    if m.get("format") != FORMAT:
        _fail(path, f"not a selftransfer bundle (manifest format is {_show(m.get('format'))}, expected {FORMAT!r})")
    v = m.get("format_version")
    if type(v) is not int:
        _fail(path, "manifest format_version is missing or not an integer")
    if v not in READABLE_VERSIONS:
        _fail(path, f"bundle format version {v} is not supported by this reader (supports {list(READABLE_VERSIONS)}); "
                    f"{'upgrade selftransfer' if v > FORMAT_VERSION else 're-export the bundle'}")
    if m.get("arch") not in ARCHS:
        _fail(path, f"manifest arch {_show(m.get('arch'))} is not one of {list(ARCHS)}")
    if type(m.get("scale")) is not int or m["scale"] not in SCALES:
        _fail(path, f"manifest scale {_show(m.get('scale'))} is not one of {list(SCALES)}")
    cfg = m.get("model_config")
    if not isinstance(cfg, dict) or cfg.get("arch") != m["arch"] or cfg.get("scale") != m["scale"]:
        _fail(path, "manifest model_config is missing or disagrees with arch/scale")
    for key in ("channels", "group"):
        if type(cfg.get(key)) is not int or not 1 <= cfg[key] <= 1024:
            _fail(path, f"manifest model_config.{key} is missing or out of range")
    if m.get("input") != INPUT:
        _fail(path, f"manifest input must be {INPUT}, not {_show(m.get('input'))}")
    members = m.get("members")
    if not isinstance(members, dict):
        _fail(path, "manifest members is missing or not an object")
    for name, info in members.items():
        if name not in MEMBERS:
            _fail(path, f"manifest lists unknown member {_show(name)}")
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
    if v >= 2 or "probe" in m:
        _check_probe(path, m)


# -- the probe ----------------------------------------------------------------------------------------------------
# The probe input is PROBE_SIDE x PROBE_SIDE LR pixels of 8-bit RGB (stored exactly, base64); the expected outputs
# are float16 (base64), which keeps a x4 probe at 32 KiB of manifest. Every weight of the network acts on any
# input size, so a small probe exercises the whole graph.
PROBE_SIDE = 16
PROBE_MAX_SIDE = 64
PROBE_KEYS = {"shape", "input", "output", "int8_output"}
# Allowed max |graph output - recorded output| on the probe, beyond the float16 rounding of the record, by the
# precision the graph runs at: about 4x the differences measured on the official CARN-M x2/x4 and on random
# weights (docs/hardening.md). fp32: every engine is within the record's rounding. bf16 (OpenVINO, PyTorch): 0.010.
# fp16 (CUDA): half precision has 3 more mantissa bits than bf16. int8: the record is ONNX Runtime's output of the
# int8 graph; OpenVINO's int8 kernels differ from it by 0.010. A graph that is not the bundle's network (another
# scale, other weights, a nearest-neighbour resize) misses by 0.3 or more.
PROBE_TOLERANCE = {"fp32": 1e-3, "fp16": 3e-2, "bf16": 4e-2, "int8": 4e-2}


def _b64(text, nbytes: int, path, what: str) -> bytes:
    if not isinstance(text, str) or len(text) > 4 * (nbytes + 2) // 3 + 4:
        _fail(path, f"manifest probe.{what} must be a base64 string of {nbytes} bytes")
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        _fail(path, f"manifest probe.{what} is not valid base64")
    if len(raw) != nbytes:
        _fail(path, f"manifest probe.{what} holds {len(raw)} bytes, a {what} of this probe has {nbytes}")
    return raw


def _check_probe(path, m) -> None:
    probe = m.get("probe")
    if not isinstance(probe, dict):
        _fail(path, "manifest has no probe (format version 2 bundles record one at export)")
    if set(probe) - PROBE_KEYS or not {"shape", "input", "output"} <= set(probe):
        _fail(path, f"manifest probe must have the keys shape, input, output (and int8_output with an int8 "
                    f"graph), not {_show(sorted(probe))}")
    shape = probe["shape"]
    if (not isinstance(shape, list) or len(shape) != 4 or any(type(d) is not int for d in shape)
            or shape[:2] != [1, 3] or not all(8 <= d <= PROBE_MAX_SIDE for d in shape[2:])):
        _fail(path, f"manifest probe.shape must be [1, 3, H, W] with 8 <= H, W <= {PROBE_MAX_SIDE}, "
                    f"not {_show(shape)}")
    h, w, s = shape[2], shape[3], m["scale"]
    _b64(probe["input"], 3 * h * w, path, "input")
    with_int8 = "model.int8.onnx" in m["members"]
    if with_int8 != ("int8_output" in probe):
        _fail(path, "manifest probe.int8_output must be present exactly when the bundle has model.int8.onnx")
    for key in ("output", "int8_output") if with_int8 else ("output",):
        out = np.frombuffer(_b64(probe[key], 2 * 3 * h * s * w * s, path, key), np.float16)
        if not np.isfinite(out).all():
            _fail(path, f"manifest probe.{key} holds non-finite values")


def make_probe(lr_uint8: np.ndarray, output: np.ndarray, int8_output: np.ndarray | None = None) -> dict:
    """The manifest's probe block: ``lr_uint8`` (1, 3, h, w) uint8, the fp32 network's output on it (/255 as
    float32) and, with an int8 graph, that graph's output."""
    lr_uint8 = np.asarray(lr_uint8)
    if lr_uint8.dtype != np.uint8 or lr_uint8.ndim != 4 or lr_uint8.shape[:2] != (1, 3):
        raise ValueError(f"the probe input must be a (1, 3, h, w) uint8 array, not {lr_uint8.dtype} {lr_uint8.shape}")

    def f16(a):
        a = np.asarray(a, np.float32)
        if not np.isfinite(a).all():
            raise ValueError("the network's output on the probe is not finite")
        return base64.b64encode(np.ascontiguousarray(a, np.float16).tobytes()).decode("ascii")

    block = {"shape": list(lr_uint8.shape), "input": base64.b64encode(np.ascontiguousarray(lr_uint8).tobytes())
             .decode("ascii"), "output": f16(output)}
    if int8_output is not None:
        block["int8_output"] = f16(int8_output)
    return block


def probe_as_float(lr_uint8: np.ndarray) -> np.ndarray:
    """8-bit probe pixels as the network sees them: float32 in [0, 1] (the same numbers at export and at run)."""
    return np.asarray(lr_uint8, np.uint8).astype(np.float32) / np.float32(255)


def probe_input(manifest: dict) -> np.ndarray:
    """The probe input as the runtime feeds it: float32 (1, 3, h, w) in [0, 1]."""
    probe = manifest["probe"]
    return probe_as_float(np.frombuffer(base64.b64decode(probe["input"]), np.uint8).reshape(probe["shape"]))


def probe_expected(manifest: dict, member: str) -> np.ndarray:
    """The output recorded at export for the graph ``member`` (float32, (1, 3, s*h, s*w))."""
    probe, s = manifest["probe"], manifest["scale"]
    n, c, h, w = probe["shape"]
    key = "int8_output" if member == "model.int8.onnx" else "output"
    return np.frombuffer(base64.b64decode(probe[key]), np.float16).reshape(n, c, h * s, w * s).astype(np.float32)


# float16 keeps 11 significant bits: the recorded output is within 2**-11 of the true one, relative.
_FLOAT16_ROUNDING = 2.0 ** -10


def check_probe_output(manifest: dict, path, member: str, precision: str, got) -> float:
    """Compare what graph ``member`` (running at ``precision``) gave on the probe with the recorded output; the max
    absolute difference, or BundleError naming the member for a wrong scale, non-finite values or a mismatch
    beyond ``PROBE_TOLERANCE[precision]`` (plus the float16 rounding of the record)."""
    expected = probe_expected(manifest, member)
    h, w = manifest["probe"]["shape"][2:]
    s = manifest["scale"]
    got = np.asarray(got, dtype=np.float32)
    if got.shape != expected.shape:
        oh, ow = (got.shape[2:] if got.ndim == 4 else ("?", "?"))
        _fail(path, f"{member} turns the {h}x{w} probe into {oh}x{ow} (shape {got.shape}), but the manifest says "
                    f"x{s}, which gives {h * s}x{w * s}: the graph does not match the manifest; re-export the bundle")
    if not np.isfinite(got).all():
        _fail(path, f"{member} gives non-finite values (NaN or infinity) on the probe ({precision}): the graph or "
                    f"its weights are broken")
    error = np.abs(got - expected)
    tolerance = PROBE_TOLERANCE[precision]
    if (error - _FLOAT16_ROUNDING * np.abs(expected) > tolerance).any():
        _fail(path, f"{member} does not reproduce the probe recorded at export ({precision}: max difference "
                    f"{float(error.max()):.3g}, allowed {tolerance:g}): the graph is not the network of this bundle's "
                    f"weights; re-export the bundle")
    return float(error.max())


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


# -- the zip directory --------------------------------------------------------------------------------------------
# The reader parses the zip structure itself, strictly: bundles are written by write_bundle (stored members, no
# zip64, no comment, the central directory right before its end record), and a reader that accepts only that
# cannot be walked into decompression, overlapping members, or a million-entry directory.
_EOCD = struct.Struct("<4sHHHHIIH")
_CENTRAL = struct.Struct("<4sHHHHHHIIIHHHHHII")
_LOCAL = struct.Struct("<4sHHHHHIIIHH")
_METHODS = {8: "deflate", 9: "deflate64", 12: "bzip2", 14: "lzma", 93: "zstandard", 95: "xz", 98: "ppmd"}
_MAX_ENTRIES = 1 + len(MEMBERS)


class _Entry(NamedTuple):
    offset: int  # of the member's data in the file
    size: int
    crc: int


def _member_name(raw: bytes, path) -> str:
    if b"\x00" in raw:
        _fail(path, f"member name {raw!r} contains a NUL byte; refusing it")
    if not raw or any(b < 0x21 or b > 0x7E for b in raw):
        _fail(path, f"member name {raw!r} contains non-printable or non-ASCII characters; refusing it")
    return raw.decode("ascii")


def _read_directory(f, size: int, path) -> dict[str, _Entry]:
    """name -> where its data is, for every entry of the zip open as ``f`` (``size`` bytes)."""
    if size < _EOCD.size:
        _fail(path, "not a selftransfer bundle (not a readable zip: too short)")
    # The end record is the last 22 bytes unless the zip has a comment (up to 64 KiB) after it; the 20 bytes before
    # it would hold a zip64 locator.
    for tail_start in (max(0, size - _EOCD.size - 20), max(0, size - _EOCD.size - 0xFFFF)):
        f.seek(tail_start)
        tail = f.read(size - tail_start)
        if (at := tail.rfind(b"PK\x05\x06")) >= 0:
            break
    if at < 0 or len(tail) - at < _EOCD.size:
        _fail(path, "not a selftransfer bundle (not a readable zip: no end-of-central-directory record)")
    _, disk, cd_disk, n_disk, n_total, cd_size, cd_offset, comment = _EOCD.unpack_from(tail, at)
    eocd = tail_start + at
    if at + _EOCD.size + comment != len(tail):
        _fail(path, "not a selftransfer bundle (not a readable zip: bytes after the end record)")
    if (at >= 20 and tail[at - 20:at - 16] == b"PK\x06\x07") or 0xFFFF in (n_disk, n_total) \
            or 0xFFFFFFFF in (cd_size, cd_offset):
        _fail(path, "zip64 archive; a bundle is a plain zip (re-export it)")
    if disk or cd_disk or n_disk != n_total:
        _fail(path, "multi-disk zip; not a bundle")
    if n_total > _MAX_ENTRIES:
        _fail(path, f"the zip has {n_total} entries; a bundle has at most {_MAX_ENTRIES}")
    if cd_offset + cd_size != eocd:
        _fail(path, "corrupt zip: the central directory is not where its end record says")
    f.seek(cd_offset)
    cd = f.read(cd_size)
    entries, pos = {}, 0
    for _ in range(n_total):
        if pos + _CENTRAL.size > len(cd):
            _fail(path, "corrupt zip: truncated central directory")
        (sig, _, _, flags, method, _, _, crc, csize, usize, nlen, elen, clen, _, _, _,
         local) = _CENTRAL.unpack_from(cd, pos)
        if sig != b"PK\x01\x02":
            _fail(path, "corrupt zip: bad central directory entry")
        raw = cd[pos + _CENTRAL.size:pos + _CENTRAL.size + nlen]
        pos += _CENTRAL.size + nlen + elen + clen
        if len(raw) != nlen or pos > len(cd):
            _fail(path, "corrupt zip: truncated central directory")
        name = _member_name(raw, path)
        if name in entries:
            _fail(path, f"duplicate member names ({name!r} appears twice)")
        if name != MANIFEST and name not in MEMBERS:
            _fail(path, f"unknown member {name!r} (bundles hold only {[MANIFEST, *MEMBERS]}); refusing it")
        if flags & 0x41:
            _fail(path, f"member {name} is encrypted; bundles are not")
        if method != zipfile.ZIP_STORED:
            _fail(path, f"member {name} is compressed ({_METHODS.get(method, f'method {method}')}); bundle members "
                        f"are stored uncompressed (re-export the bundle)")
        if csize != usize:
            _fail(path, f"member {name} is stored but its sizes disagree ({csize} != {usize})")
        limit = MAX_MANIFEST_BYTES if name == MANIFEST else MAX_MEMBER_BYTES
        if usize > limit:
            _fail(path, f"{name} is larger than allowed ({usize} > {limit} bytes)")
        entries[name] = (local, usize, crc, raw)
    if pos != len(cd):
        _fail(path, "corrupt zip: the central directory has trailing bytes")
    if sum(e[1] for e in entries.values()) > MAX_TOTAL_BYTES:
        _fail(path, f"members add up to more than the {MAX_TOTAL_BYTES >> 30} GiB a bundle may hold")
    out, end_of_previous = {}, 0
    for name, (local, usize, crc, raw) in sorted(entries.items(), key=lambda kv: kv[1][0]):
        if local < end_of_previous or local + _LOCAL.size > cd_offset:
            _fail(path, f"corrupt zip: member {name} overlaps another one or the central directory")
        f.seek(local)
        header = f.read(_LOCAL.size)
        sig, _, _, method, _, _, _, _, _, nlen, elen = _LOCAL.unpack(header)
        if sig != b"PK\x03\x04" or method != zipfile.ZIP_STORED or f.read(nlen) != raw:
            _fail(path, f"corrupt zip: the local header of {name} does not match the central directory")
        start = local + _LOCAL.size + nlen + elen
        end_of_previous = start + usize
        if end_of_previous > cd_offset:
            _fail(path, f"corrupt zip: {name} claims {usize} bytes, more than the file holds")
        out[name] = _Entry(start, usize, crc)
    return out


def _open_regular(path):
    """The bundle as a binary file, refusing anything that is not a regular file (a FIFO would block a read)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        _fail(path, "model bundle not found")
    except OSError as e:
        _fail(path, f"cannot open the bundle: {e.strerror or e}")
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        _fail(path, "not a file")
    return os.fdopen(fd, "rb"), (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class Bundle:
    """An open, validated bundle. ``manifest`` is the parsed manifest; members are read on demand."""

    def __init__(self, path: str, manifest: dict, entries: dict[str, _Entry], identity: tuple):
        self.path = path
        self.manifest = manifest
        self._entries = entries
        self._identity = identity
        self._cache: dict[str, bytes] = {}

    @classmethod
    def open(cls, path: str | os.PathLike) -> "Bundle":
        path = str(path)
        if not os.path.exists(path):
            raise BundleError(f"{path}: model bundle not found")
        if not os.path.isfile(path):
            raise BundleError(f"{path}: not a file")
        f, identity = _open_regular(path)
        with f:
            try:
                entries = _read_directory(f, identity[2], path)
            except struct.error as e:
                raise BundleError(f"{path}: not a selftransfer bundle (not a readable zip: {e})") from None
            if MANIFEST not in entries:
                _fail(path, "no manifest.json")
            m = entries[MANIFEST]
            f.seek(m.offset)
            raw = f.read(m.size)
        if len(raw) != m.size or zlib.crc32(raw) != m.crc:
            _fail(path, "manifest.json is corrupt (its CRC does not match)")
        try:
            manifest = json.loads(raw.decode("utf-8"))
        # ValueError covers JSONDecodeError, UnicodeDecodeError and ints longer than Python's 4300-digit limit.
        except ValueError as e:
            raise BundleError(f"{path}: manifest.json is not valid JSON: {e}") from None
        except RecursionError:
            raise BundleError(f"{path}: manifest nests more than {MAX_MANIFEST_DEPTH} levels deep; "
                              f"not a selftransfer manifest") from None
        _check_manifest(path, manifest)
        listed = manifest["members"]
        for n in entries:
            if n != MANIFEST and n not in listed:
                _fail(path, f"member {n!r} is not listed in the manifest")
        for name, info in listed.items():
            if name not in entries:
                _fail(path, f"manifest lists {name!r} but the bundle does not contain it")
            if entries[name].size != info["size"]:
                _fail(path, f"{name} is {entries[name].size} bytes, manifest says {info['size']}")
        return cls(path, manifest, {n: e for n, e in entries.items() if n != MANIFEST}, identity)

    def _reopen(self):
        f, identity = _open_regular(self.path)
        if identity != self._identity:
            f.close()
            _fail(self.path, "the bundle changed on disk after it was opened; open it again")
        return f

    def _read(self, name: str, keep: bool) -> bytes | None:
        entry, sha = self._entries[name], self.manifest["members"][name]["sha256"]
        h, data = hashlib.sha256(), None
        with self._reopen() as f:
            f.seek(entry.offset)
            if keep:
                data = f.read(entry.size)
                got = len(data)
                h.update(data)
            else:
                got = 0
                while got < entry.size and (chunk := f.read(min(_CHUNK, entry.size - got))):
                    h.update(chunk)
                    got += len(chunk)
        if got != entry.size:
            _fail(self.path, f"{name} is truncated ({got} of {entry.size} bytes)")
        if h.hexdigest() != sha:
            _fail(self.path, f"{name} does not match its sha256 in the manifest (corrupt or tampered)")
        return data

    def verify(self) -> "Bundle":
        """Check every member against its sha256 (streamed: nothing is kept in memory). Returns the bundle."""
        for name in self._entries:
            if name not in self._cache:
                self._read(name, keep=False)
        return self

    # -- accessors ------------------------------------------------------------------------------------------
    @property
    def scale(self) -> int:
        return self.manifest["scale"]

    @property
    def arch(self) -> str:
        return self.manifest["arch"]

    @property
    def has_probe(self) -> bool:
        return "probe" in self.manifest

    @property
    def sha256(self) -> str:
        """Identity of the model for engine cache keys: hash of the manifest (which hashes every member)."""
        return hashlib.sha256(json.dumps(self.manifest, sort_keys=True).encode()).hexdigest()

    def has(self, name: str) -> bool:
        return name in self._entries

    def member(self, name: str) -> bytes:
        """A member's bytes, read now (once), checked against its sha256 and, for ONNX graphs, validated."""
        if name in self._cache:
            return self._cache[name]
        if name not in self._entries:
            raise BundleError(f"{self.path}: bundle has no {name}")
        data = self._read(name, keep=True)
        if name in ONNX_MEMBERS:
            check_onnx(data, f"{self.path}: {name}")
        self._cache[name] = data
        return data

    def model_config(self):
        from vs_selftransfer.model import ModelConfig
        try:
            return ModelConfig.from_dict(self.manifest["model_config"])
        except (TypeError, ValueError) as e:
            raise BundleError(f"{self.path}: bad model_config: {e}") from None

    def state_dict(self) -> dict:
        """The weights, each a finite float32 tensor (anything else is refused, naming the tensor)."""
        import torch
        from safetensors.torch import load as load_safetensors
        try:
            state = load_safetensors(self.member("weights.safetensors"))
        except BundleError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise BundleError(f"{self.path}: weights.safetensors is unreadable: {e}") from None
        for key, tensor in state.items():
            if tensor.dtype != torch.float32:
                _fail(self.path, f"weights.safetensors: tensor {_show(key)} is {str(tensor.dtype).removeprefix('torch.')}; "
                                 f"bundle weights are float32")
            if not bool(torch.isfinite(tensor).all()):
                _fail(self.path, f"weights.safetensors: tensor {_show(key)} holds NaN or infinite values")
        return state

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


def printable(value) -> str:
    """``value`` as text that is safe to print on a terminal: every control or format character (ESC and so the
    start of any escape sequence, CR, newlines, bidirectional overrides, ...) is shown escaped (``\\x1b``)."""
    text = value if isinstance(value, str) else str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
