"""Hostile bundles (issue 12, cases 4, 5, 6 and 8): each test reproduces a report that the reader or the runtime
used to accept, and checks it is now refused, before any work, with a message naming what is wrong.

  case 4  decompression bombs and members read whether or not anyone uses them
  case 5  a graph that is not tied to the manifest (scale) or to the weights (another graph, NaN), bad weights
  case 6  `selftransfer info` printing escape sequences raw; deep manifests crashing it
  case 8  NUL bytes in member names; bundles written 0600
"""
import hashlib
import io
import json
import os
import stat
import tracemalloc
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from selftransfer_trainer.cli import main
from vs_selftransfer.bundle import (MAX_MANIFEST_DEPTH, Bundle, BundleError, make_probe, probe_input,
                                    write_bundle)
from vs_selftransfer.runtime import create

GIB = 1 << 30
# Digests of 2**30 zero bytes (hashlib.sha256 / zlib.crc32 of bytes(1 << 30)), so the test need not hash 1 GiB.
ZEROS_GIB_SHA256 = "49bc20df15e412a64472421e13fe86ff1c5165e18b2afccf160d4dc19fe68a14"
ZEROS_GIB_CRC32 = 0x5B64C2B0


# -- helpers -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def parts(tiny_bundle):
    with zipfile.ZipFile(tiny_bundle) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
    return manifest, members


def variant(path, parts, members=None, **fields) -> Path:
    """The tiny bundle with manifest fields and members replaced, written by the project's own writer (so the
    hashes are right: what is tested is the check behind them)."""
    manifest, original = parts
    manifest = {k: v for k, v in json.loads(json.dumps(manifest)).items() if k != "members"}
    manifest.update(fields)
    write_bundle(path, manifest, {**original, **(members or {})})
    return Path(path)


def raw_zip(path, entries, compression=zipfile.ZIP_STORED) -> Path:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


def entries(manifest, members):
    return [("manifest.json", json.dumps(manifest).encode()), *members.items()]


class CountingFile:
    """A file object that counts the bytes read through it."""

    def __init__(self, f, counter):
        self._f, self._counter = f, counter

    def read(self, *args):
        data = self._f.read(*args)
        self._counter[0] += len(data)
        return data

    def readinto(self, b):
        n = self._f.readinto(b)
        self._counter[0] += n or 0
        return n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __iter__(self):
        return iter(self._f)

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def bytes_read(monkeypatch, tmp_path):
    """Count every byte read from files under tmp_path (zipfile opens them with io.open, os.fdopen calls it)."""
    counter = [0]
    real_open = io.open

    def counting_open(file, *args, **kwargs):
        f = real_open(file, *args, **kwargs)
        name = file if isinstance(file, (str, os.PathLike)) else getattr(f, "name", "")
        if isinstance(file, int):
            name = os.readlink(f"/proc/self/fd/{file}")
        if str(name).startswith(str(tmp_path)) and "b" in (args[0] if args else kwargs.get("mode", "r")):
            return CountingFile(f, counter)
        return f

    monkeypatch.setattr(io, "open", counting_open)
    return counter


def gib_of_zeros_deflated() -> bytes:
    """A raw deflate stream of 2**30 zero bytes, made without compressing 1 GiB: one fully flushed 1 MiB segment
    (independent of what precedes it) repeated 1024 times, then an empty final block."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    return segment * 1024 + zlib.compressobj(9, zlib.DEFLATED, -15).flush()


def bomb_bundle(path, manifest, members) -> Path:
    """The report's bomb: a valid bundle plus model.ts and model.trt.ts, each 1 GiB of zeros deflated to 1 MiB and
    listed in the manifest with their true size and sha256."""
    m = json.loads(json.dumps(manifest))
    m["members"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)} for n, b in members.items()}
    for name in ("model.ts", "model.trt.ts"):
        m["members"][name] = {"sha256": ZEROS_GIB_SHA256, "size": GIB}
    stream = gib_of_zeros_deflated()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("manifest.json", json.dumps(m))
        for name, data in members.items():
            if name != "model.ts":
                zf.writestr(name, data)
    # Append the two deflated members by hand (zipfile would have to compress 2 GiB to write them).
    data = bytearray(buf.getvalue())
    eocd = data.rfind(b"PK\x05\x06")
    cd_size, cd_offset = int.from_bytes(data[eocd + 12:eocd + 16], "little"), \
        int.from_bytes(data[eocd + 16:eocd + 20], "little")
    central, body = bytes(data[cd_offset:cd_offset + cd_size]), bytes(data[:cd_offset])
    count = int.from_bytes(data[eocd + 10:eocd + 12], "little")
    for name in ("model.ts", "model.trt.ts"):
        info = zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0))
        info.compress_type, info.CRC, info.compress_size, info.file_size = \
            zipfile.ZIP_DEFLATED, ZEROS_GIB_CRC32, len(stream), GIB
        info.header_offset = len(body)
        body += info.FileHeader(zip64=False) + stream
        central += _central_entry(info)
        count += 1
    end = b"PK\x05\x06" + b"\x00" * 4 + count.to_bytes(2, "little") * 2 + len(central).to_bytes(4, "little") \
        + len(body).to_bytes(4, "little") + b"\x00\x00"
    Path(path).write_bytes(body + central + end)
    return Path(path)


def _central_entry(info: zipfile.ZipInfo) -> bytes:
    import struct
    name = info.filename.encode()
    dostime = info.date_time[3] << 11 | info.date_time[4] << 5 | info.date_time[5] // 2
    dosdate = (info.date_time[0] - 1980) << 9 | info.date_time[1] << 5 | info.date_time[2]
    return struct.pack("<4sBBBBHHHHIIIHHHHHII", b"PK\x01\x02", 20, 3, 20, 0, 0, info.compress_type, dostime,
                       dosdate, info.CRC, info.compress_size, info.file_size, len(name), 0, 0, 0, 0, 0,
                       info.header_offset) + name


# -- case 4: decompression bombs, lazy members ---------------------------------------------------------------------
def test_the_reports_bomb_is_refused_before_anything_is_decompressed(tmp_path, parts, monkeypatch, bytes_read):
    """4 MB on disk, 2 GiB of zeros inside: `info` took 9 s and 3.67 GB, Upscale(auto) 3.2 GB. Now the directory
    alone refuses it: no decompressor is ever made, and only the zip's directory and the manifest are read."""
    manifest, members = parts
    path = bomb_bundle(tmp_path / "bomb.stm", manifest, members)
    assert path.stat().st_size < 4 << 20
    with zipfile.ZipFile(path) as zf:  # a well-formed zip, as the report's was
        assert {i.filename: i.file_size for i in zf.infolist()}["model.trt.ts"] == GIB
    decompressors = []
    real = zipfile._get_decompressor
    monkeypatch.setattr(zipfile, "_get_decompressor", lambda t: decompressors.append(t) or real(t))
    tracemalloc.start()
    try:
        with pytest.raises(BundleError, match=r"model\.(trt\.)?ts is compressed \(deflate\); bundle members are "
                                              r"stored uncompressed"):
            Bundle.open(path)
        with pytest.raises(ValueError, match="model: .*compressed"):
            create(str(path), backend="ort", width=16, height=16)
        assert main(["info", str(path)]) == 2
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert decompressors == []
    assert peak < 16 << 20, f"{peak / 2**20:.0f} MiB allocated"
    assert bytes_read[0] < 3 * (1 << 20), f"{bytes_read[0]} bytes read for three refusals"


def test_compressed_members_are_refused_whatever_the_ratio(tmp_path, parts):
    manifest, members = parts
    for method, label in ((zipfile.ZIP_DEFLATED, "deflate"), (zipfile.ZIP_LZMA, "lzma"), (zipfile.ZIP_BZIP2, "bzip2")):
        p = raw_zip(tmp_path / f"{label}.stm", entries(manifest, members), compression=method)
        with pytest.raises(BundleError, match=f"compressed \\({label}\\)"):
            Bundle.open(p)


def test_a_stored_member_cannot_claim_more_bytes_than_the_file_holds(tmp_path, parts):
    manifest, members = parts
    data = bytearray(raw_zip(tmp_path / "a.stm", entries(manifest, members)).read_bytes())
    # Grow model.ts's sizes in its central entry (compressed and uncompressed: a stored member has them equal).
    at = next(i for i in range(len(data)) if data[i:i + 4] == b"PK\x01\x02"
              and data[i + 46:i + 46 + int.from_bytes(data[i + 28:i + 30], "little")] == b"model.ts")
    data[at + 20:at + 28] = (GIB - 1).to_bytes(4, "little") * 2
    p = tmp_path / "claims.stm"
    p.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="model.ts claims .* more than the file holds"):
        Bundle.open(p)


def test_members_are_read_only_when_used(tmp_path, parts, bytes_read, monkeypatch):
    """Opening reads the directory and the manifest; the ort backend reads model.onnx and never the TorchScript
    member, which carries code; `info` streams the hashes without holding a member in memory."""
    manifest, members = parts
    big = bytes(64 << 20)  # a 64 MiB stored member: what reading it whole would cost is plain to see
    path = variant(tmp_path / "big.stm", parts, members={"model.trt.ts": big}, tensorrt={"precision": "fp16"})
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        manifest_size = zf.getinfo("manifest.json").file_size
    bytes_read[0] = 0
    b = Bundle.open(path)
    assert bytes_read[0] < manifest_size + 4096  # the directory and the manifest
    bytes_read[0] = 0
    create(str(path), backend="ort", threads=1, width=16, height=16)
    assert bytes_read[0] < size - len(big) - len(members["model.ts"]) + (64 << 10)
    read_members = []
    real_read = Bundle._read
    monkeypatch.setattr(Bundle, "_read", lambda self, name, keep: read_members.append((name, keep))
                        or real_read(self, name, keep))
    create(str(path), backend="auto", threads=1, width=16, height=16)
    assert {n for n, _ in read_members} == {"model.onnx"}
    read_members.clear()
    tracemalloc.start()
    try:
        assert main(["info", str(path)]) == 0
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert {n for n, keep in read_members} == set(b.manifest["members"]) and not any(k for _, k in read_members)
    assert peak < 16 << 20, f"info held {peak / 2**20:.0f} MiB"


@pytest.mark.parametrize("renamed,name,match", [
    ("model.ts", b"model.ts\x00.exe", "NUL byte"),
    ("model.onnx", b"model.onnx\x1b[2J", "non-printable"),
    ("manifest.json", b"manifest.json\r", "non-printable"),
    ("model.onnx", b"mod\xc3\xa9l.onnx", "non-ASCII"),
])
def test_nul_and_non_printable_member_names_are_refused(tmp_path, parts, renamed, name, match):
    """Case 8: zipfile cuts a name at its NUL, so "model.ts\\0.exe" was read as model.ts and accepted: the reader
    now reads the raw name and refuses it."""
    manifest, members = parts
    placeholder = "Q" * len(name)
    listed = [(placeholder if n == renamed else n, d) for n, d in entries(manifest, members)]
    data = raw_zip(tmp_path / "n.stm", listed).read_bytes()
    assert data.count(placeholder.encode()) == 2  # its local header and its central entry
    p = tmp_path / "named.stm"
    p.write_bytes(data.replace(placeholder.encode(), name))
    with pytest.raises(BundleError, match=match):
        Bundle.open(p)


def test_zip64_comments_prepended_bytes_and_too_many_entries_are_refused(tmp_path, parts):
    manifest, members = parts
    good = raw_zip(tmp_path / "g.stm", entries(manifest, members)).read_bytes()
    cases = {"prepended": b"MZ" + good, "trailing": good + b"junk"}
    cases["zip64"] = good[:-12] + b"\xff\xff" + good[-10:]  # the entry count says "see the zip64 record"
    many = io.BytesIO()
    with zipfile.ZipFile(many, "w") as zf:
        for i in range(20):
            zf.writestr(f"x{i}", b"")
    cases["many"] = many.getvalue()
    for label, data in cases.items():
        p = tmp_path / f"{label}.stm"
        p.write_bytes(data)
        with pytest.raises(BundleError):
            Bundle.open(p)


def test_a_bundle_replaced_after_opening_is_refused_not_misread(tmp_path, parts, tiny_bundle):
    p = variant(tmp_path / "a.stm", parts)
    b = Bundle.open(p)
    variant(tmp_path / "a.stm", parts, validation={"message": "another one"})
    with pytest.raises(BundleError, match="changed on disk"):
        b.member("model.onnx")


# -- case 5: the probe ties the graph to the manifest and the weights ----------------------------------------------
def _graph(nodes, initializers=()) -> bytes:
    lr = helper.make_tensor_value_info("lr", TensorProto.FLOAT, ["N", 3, "H", "W"])
    sr = helper.make_tensor_value_info("sr", TensorProto.FLOAT, ["N", 3, "sH", "sW"])
    model = helper.make_model(helper.make_graph(nodes, "g", [lr], [sr], initializer=list(initializers)),
                              opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    return model.SerializeToString()


def nearest_x2_graph() -> bytes:
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    return _graph([helper.make_node("Resize", ["lr", "", "scales"], ["sr"], mode="nearest")], [scales])


def nan_x2_graph() -> bytes:
    scales = helper.make_tensor("scales", TensorProto.FLOAT, [4], [1, 1, 2, 2])
    nan = helper.make_tensor("nan", TensorProto.FLOAT, [], [float("nan")])
    return _graph([helper.make_node("Resize", ["lr", "", "scales"], ["up"], mode="nearest"),
                   helper.make_node("Mul", ["up", "nan"], ["sr"])], [scales, nan])


def test_export_records_a_probe_that_every_cpu_backend_reproduces(tiny_bundle):
    b = Bundle.open(tiny_bundle)
    probe = b.manifest["probe"]
    assert probe["shape"] == [1, 3, 16, 16] and b.manifest["format_version"] == 2
    x = probe_input(b.manifest)
    assert x.dtype == np.float32 and 0 <= x.min() and x.max() <= 1 and len(np.unique(x)) > 50  # image-like
    for backend in ("ort", "ov", "torch"):
        create(str(tiny_bundle), backend=backend, threads=1, width=40, height=24)


def test_a_manifest_that_lies_about_the_scale_is_refused_at_creation(tmp_path, parts):
    """The report: manifest x4 around an x2 graph was accepted and then failed on every frame."""
    manifest, _ = parts
    lr = (probe_input(manifest) * 255).round().astype(np.uint8)
    lie = variant(tmp_path / "x4.stm", parts, scale=4, model_config={**manifest["model_config"], "scale": 4},
                  probe=make_probe(lr, np.zeros((1, 3, 64, 64), np.float32)))
    for backend in ("ort", "ov", "torch"):
        # ONNX Runtime and PyTorch return the x2 output; OpenVINO refuses to write it into an x4-sized buffer.
        with pytest.raises(ValueError, match=r"model: .*(model\.onnx|model\.ts) (turns the 16x16 probe into 32x32 .*"
                                             r"manifest says x4|fails on the 16x16 probe run as the manifest's x4)"):
            create(str(lie), backend=backend, threads=1, width=32, height=32)


@pytest.mark.parametrize("backend", ["ort", "ov"])
def test_a_graph_that_is_not_the_weights_network_is_refused(tmp_path, parts, backend):
    """A nearest-neighbour Resize in place of the network ran silently; NaN output became black frames."""
    p = variant(tmp_path / "nn.stm", parts, members={"model.onnx": nearest_x2_graph()})
    with pytest.raises(ValueError, match=r"model\.onnx does not reproduce the probe .*max difference"):
        create(str(p), backend=backend, threads=1, width=32, height=32)
    p = variant(tmp_path / "nan.stm", parts, members={"model.onnx": nan_x2_graph()})
    with pytest.raises(ValueError, match=r"model\.onnx gives non-finite values"):
        create(str(p), backend=backend, threads=1, width=32, height=32)


def test_weights_must_be_finite_float32(tmp_path, parts):
    import torch
    from safetensors.torch import load, save

    manifest, members = parts
    state = load(members["weights.safetensors"])
    key = sorted(state)[0]
    bad = {"int32": {**state, key: state[key].to(torch.int32)},
           "nan": {**state, key: torch.full_like(state[key], float("nan"))}}
    for label, weights in bad.items():
        without_ts = {n: d for n, d in members.items() if n != "model.ts"}
        m = {k: v for k, v in manifest.items() if k != "members"}
        p = tmp_path / f"{label}.stm"
        write_bundle(p, m, {**without_ts, "weights.safetensors": save(weights)})
        match = "is int32; bundle weights are float32" if label == "int32" else "holds NaN or infinite values"
        with pytest.raises(BundleError, match=match):
            Bundle.open(p).state_dict()
        with pytest.raises(ValueError, match=match):  # the torch backend builds from the weights here
            create(str(p), backend="torch", threads=1, width=16, height=16)


def test_a_bundle_without_a_probe_is_refused_by_the_filter_and_can_be_re_exported(tmp_path, parts):
    manifest, members = parts
    old = {k: v for k, v in manifest.items() if k not in ("members", "probe")}
    old["format_version"] = 1
    p = tmp_path / "v1.stm"
    write_bundle(p, old, members)
    assert not Bundle.open(p).has_probe
    with pytest.raises(ValueError, match=r"no probe .* re-export it: selftransfer export .*v1\.stm -o NEW\.stm"):
        create(str(p), backend="ort", width=16, height=16)
    assert main(["export", str(p), "-o", str(tmp_path / "v2.stm"), "--tensorrt", "no"]) == 0
    assert Bundle.open(tmp_path / "v2.stm").has_probe
    create(str(tmp_path / "v2.stm"), backend="ort", threads=1, width=16, height=16)
    no_probe_v2 = {**old, "format_version": 2}
    with pytest.raises(BundleError, match="no probe"):
        write_bundle(tmp_path / "bad.stm", no_probe_v2, members)


# -- case 6: info prints nothing that drives the terminal; any depth -----------------------------------------------
HOSTILE = "\x1b[2J\x1b]0;pwned\x07ok\r\n/tmp/x.stm: selftransfer bundle v2 (valid: forged)\u202e"


def test_info_escapes_control_characters_from_the_manifest(tmp_path, parts, capsys):
    p = variant(tmp_path / "h.stm", parts, created=HOSTILE, source={"path": HOSTILE, "sha256": HOSTILE},
                validation={"message": HOSTILE, "shipped": HOSTILE, HOSTILE: 1.0},
                degradation={HOSTILE: HOSTILE}, frames={"train": HOSTILE}, versions={HOSTILE: HOSTILE},
                precision={"int8": {"note": HOSTILE}}, tensorrt={"gpu": HOSTILE})
    assert main(["info", str(p)]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\u202e")
    assert "\\x1b[2J" in out and "\\r\\n" in out  # shown, escaped
    assert sum(line.startswith("/tmp/x.stm") for line in out.splitlines()) == 0  # no forged line
    assert main(["info", str(p), "--json"]) == 0
    out = capsys.readouterr().out
    assert not any(c in out for c in "\x1b\x07\r\u202e") and json.loads(out)["created"] == HOSTILE


def _nested(depth):
    node = {"psnr_y": 30.0}
    for _ in range(depth - 1):
        node = {"n": node}
    return node


def test_a_manifest_nested_1200_deep_is_refused_clearly(tmp_path, parts, capsys):
    manifest, members = parts
    deep = {**manifest, "validation": _nested(1200)}
    p = raw_zip(tmp_path / "deep.stm", entries(deep, members))
    assert main(["info", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"nests more than {MAX_MANIFEST_DEPTH} levels deep" in err and "Traceback" not in err
    ok = variant(tmp_path / "ok.stm", parts, validation=_nested(MAX_MANIFEST_DEPTH - 2))
    assert main(["info", str(ok)]) == 0
    assert "n.n.n." in capsys.readouterr().out


def test_describe_walks_any_depth_without_recursion(tiny_bundle):
    from selftransfer_trainer.export import describe

    b = Bundle.open(tiny_bundle)
    b.manifest = {**b.manifest, "validation": _nested(20000)}  # deeper than the reader allows, on purpose
    assert "psnr_y 30.000 dB" in describe(b)


# -- case 8: file mode ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_bundles_get_the_users_file_mode(tmp_path, parts, umask):
    old = os.umask(umask)
    try:
        p = variant(tmp_path / "m.stm", parts)
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask
