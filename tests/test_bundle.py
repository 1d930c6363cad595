"""The bundle reader refuses every malformed or hostile bundle with BundleError, and nothing else.

Hand-written cases for each rule, then a property-based fuzz test (hypothesis) that mutates a real bundle at the
byte level, mutates its manifest with random JSON, and mutates members while keeping the hashes consistent (so the
content checks behind the hashes are exercised too).
"""
import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import onnx
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vs_selftransfer.bundle import FORMAT_VERSION, MEMBERS, Bundle, BundleError, check_onnx, write_bundle

FUZZ_BYTES_EXAMPLES = 200
FUZZ_MANIFEST_EXAMPLES = 150
FUZZ_MEMBER_EXAMPLES = 100


# -- helpers -------------------------------------------------------------------------------------------------------
def read_parts(path) -> tuple[dict, dict]:
    with zipfile.ZipFile(path) as zf:
        manifest = json.loads(zf.read("manifest.json"))
        members = {n: zf.read(n) for n in zf.namelist() if n != "manifest.json"}
    return manifest, members


def raw_zip(path, entries: list[tuple[str, bytes]]) -> Path:
    """Write a zip exactly as given: no validation, duplicates allowed (what an attacker can do)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in entries:
            zf.writestr(name, data)
    Path(path).write_bytes(buf.getvalue())
    return Path(path)


def rebuild(path, manifest: dict, members: dict, rehash: bool = False) -> Path:
    manifest = json.loads(json.dumps(manifest))
    if rehash:
        manifest["members"] = {n: {"sha256": hashlib.sha256(b).hexdigest(), "size": len(b)}
                               for n, b in members.items()}
    return raw_zip(path, [("manifest.json", json.dumps(manifest).encode()), *members.items()])


@pytest.fixture(scope="module")
def parts(tiny_bundle):
    return read_parts(tiny_bundle)


# -- the valid bundle ------------------------------------------------------------------------------------------------
def test_valid_bundle_opens_and_members_match_their_hashes(tiny_bundle, parts):
    manifest, members = parts
    b = Bundle.open(tiny_bundle)
    assert b.manifest == manifest and b.scale == 2 and b.arch == "carn_m"
    for name, data in members.items():
        assert b.member(name) == data
        assert manifest["members"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
    with pytest.raises(BundleError, match="no model.trt.ts"):
        b.member("model.trt.ts")
    assert b.model_config().channels == 8
    assert set(b.state_dict()) == set(b.torch_model().state_dict())


# -- hand-written refusals --------------------------------------------------------------------------------------------
def test_unknown_member_holding_a_pickle_is_refused(tmp_path, parts):
    manifest, members = parts
    evil = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, evil)  # a pickled state dict
    for name, blob in (("weights.pth", evil.getvalue()), ("model.pkl", pickle.dumps({"w": [1.0]}))):
        # unlisted...
        p = rebuild(tmp_path / "a.stm", manifest, {**members, name: blob})
        with pytest.raises(BundleError, match=f"unknown member '{name}'"):
            Bundle.open(p)
        # ...and listed with a correct hash: still refused, the allowlist is not negotiable
        p = rebuild(tmp_path / "b.stm", manifest, {**members, name: blob}, rehash=True)
        with pytest.raises(BundleError, match="unknown member"):
            Bundle.open(p)


@pytest.mark.parametrize("version,hint", [(FORMAT_VERSION + 1, "upgrade selftransfer"), (0, "re-export"),
                                          ("1", "not an integer"), (None, "not an integer")])
def test_wrong_format_version_is_refused(tmp_path, parts, version, hint):
    manifest, members = parts
    p = rebuild(tmp_path / "v.stm", {**manifest, "format_version": version}, members)
    with pytest.raises(BundleError, match=hint):
        Bundle.open(p)


def test_bad_sha_is_refused(tmp_path, parts):
    manifest, members = parts
    weights = bytearray(members["weights.safetensors"])
    weights[-1] ^= 0x01
    p = rebuild(tmp_path / "s.stm", manifest, {**members, "weights.safetensors": bytes(weights)})
    b = Bundle.open(p)  # the reader reads no member until asked
    with pytest.raises(BundleError, match="weights.safetensors does not match its sha256"):
        b.verify()
    with pytest.raises(BundleError, match="weights.safetensors does not match its sha256"):
        b.member("weights.safetensors")
    assert b.member("model.onnx") == members["model.onnx"]


def test_wrong_size_is_refused(tmp_path, parts):
    manifest, members = parts
    m = json.loads(json.dumps(manifest))
    m["members"]["model.onnx"]["size"] -= 1
    with pytest.raises(BundleError, match="model.onnx is .* bytes, manifest says"):
        Bundle.open(rebuild(tmp_path / "z.stm", m, members))


def test_truncated_zip_is_refused(tmp_path, tiny_bundle):
    data = tiny_bundle.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 100):
        p = tmp_path / "t.stm"
        p.write_bytes(data[:cut])
        with pytest.raises(BundleError):
            Bundle.open(p)


@pytest.mark.parametrize("content", [b"", b"hello, I am text renamed .stm\n", b"PK\x03\x04garbage"])
def test_not_a_zip_is_refused(tmp_path, content):
    p = tmp_path / "x.stm"
    p.write_bytes(content)
    with pytest.raises(BundleError, match="not a selftransfer bundle"):
        Bundle.open(p)


def test_missing_path_and_directory_are_refused(tmp_path):
    with pytest.raises(BundleError, match="not found"):
        Bundle.open(tmp_path / "nope.stm")
    with pytest.raises(BundleError, match="not a file"):
        Bundle.open(tmp_path)


def test_missing_manifest_is_refused(tmp_path, parts):
    _, members = parts
    with pytest.raises(BundleError, match="no manifest.json"):
        Bundle.open(raw_zip(tmp_path / "m.stm", list(members.items())))


def test_duplicate_members_are_refused(tmp_path, parts):
    manifest, members = parts
    entries = [("manifest.json", json.dumps(manifest).encode()), *members.items(),
               ("model.onnx", b"second copy")]
    with pytest.warns(UserWarning, match="Duplicate name"):
        p = raw_zip(tmp_path / "d.stm", entries)
    with pytest.raises(BundleError, match="duplicate"):
        Bundle.open(p)


def test_listed_but_absent_and_present_but_unlisted_members_are_refused(tmp_path, parts):
    manifest, members = parts
    without_ts = {n: b for n, b in members.items() if n != "model.ts"}
    with pytest.raises(BundleError, match="lists 'model.ts' but the bundle does not contain it"):
        Bundle.open(rebuild(tmp_path / "a.stm", manifest, without_ts))
    m = json.loads(json.dumps(manifest))
    del m["members"]["model.ts"]
    with pytest.raises(BundleError, match="'model.ts' is not listed"):
        Bundle.open(rebuild(tmp_path / "b.stm", m, members))


def _set(d, path, value):
    d = json.loads(json.dumps(d))
    node = d
    for k in path[:-1]:
        node = node[k]
    if value is _DELETE:
        del node[path[-1]]
    else:
        node[path[-1]] = value
    return d


_DELETE = object()


@pytest.mark.parametrize("path,value,match", [
    (("format",), "zip-of-something", "not a selftransfer bundle"),
    (("arch",), "edsr", "arch"),
    (("arch",), _DELETE, "arch"),
    (("scale",), 5, "scale"),
    (("scale",), "2", "scale"),
    (("scale",), True, "scale"),
    (("model_config", "scale"), 3, "disagrees"),
    (("model_config", "channels"), -8, "channels"),
    (("model_config", "group"), "4", "group"),
    (("model_config",), [], "model_config"),
    (("input", "layout"), "NHWC", "input"),
    (("input", "range"), [0, 255], "input"),
    (("members",), [], "members"),
    (("members", "model.onnx", "sha256"), "abc", "sha256"),
    (("members", "model.onnx", "size"), -1, "size"),
    (("members", "model.onnx", "size"), 1.5, "size"),
    (("members", "weights.safetensors"), _DELETE, "weights.safetensors"),
    (("validation",), [31.0], "validation"),
    (("source",), "video.mp4", "source"),
])
def test_wrong_manifest_fields_are_refused(tmp_path, parts, path, value, match):
    manifest, members = parts
    if path[0] == "members" and value is _DELETE:
        members = {n: b for n, b in members.items() if n != path[-1]}
    with pytest.raises(BundleError, match=match):
        Bundle.open(rebuild(tmp_path / "f.stm", _set(manifest, path, value), members))


@pytest.mark.parametrize("raw", [b"[1, 2]", b"{not json", b"\xff\xfe{}", b"[" * 100000 + b"]" * 100000,
                                 b'{"format_version": ' + b"1" * 5000 + b"}"])
def test_manifest_that_is_not_a_json_object_is_refused(tmp_path, parts, raw):
    _, members = parts
    with pytest.raises(BundleError, match="manifest"):
        Bundle.open(raw_zip(tmp_path / "j.stm", [("manifest.json", raw), *members.items()]))


def _onnx_with(members, edit) -> dict:
    model = onnx.ModelProto.FromString(members["model.onnx"])
    edit(model)
    return {**members, "model.onnx": model.SerializeToString()}


def test_onnx_pointing_at_external_data_is_refused(tmp_path, parts):
    """Consistent hashes do not make a graph harmless: a tensor that reads a file by path must be refused."""
    manifest, members = parts

    def point_outside(model):
        t = model.graph.initializer[0]
        t.ClearField("raw_data")
        t.data_location = onnx.TensorProto.EXTERNAL
        entry = t.external_data.add()
        entry.key, entry.value = "location", "../../../../etc/passwd"

    p = rebuild(tmp_path / "e.stm", manifest, _onnx_with(members, point_outside), rehash=True)
    with pytest.raises(BundleError, match="external data"):
        Bundle.open(p).member("model.onnx")


def test_onnx_with_the_wrong_signature_is_refused(tmp_path, parts):
    manifest, members = parts

    def rename_input(model):
        old = model.graph.input[0].name
        model.graph.input[0].name = "image"
        for node in model.graph.node:
            node.input[:] = ["image" if i == old else i for i in node.input]

    p = rebuild(tmp_path / "i.stm", manifest, _onnx_with(members, rename_input), rehash=True)
    with pytest.raises(BundleError, match="one float input 'lr'"):
        Bundle.open(p).member("model.onnx")
    p = rebuild(tmp_path / "g.stm", manifest, {**members, "model.onnx": b"\x08\x07garbage" * 10}, rehash=True)
    with pytest.raises(BundleError, match="model.onnx"):
        Bundle.open(p).member("model.onnx")


def test_write_bundle_refuses_a_bad_manifest_and_writes_nothing(tmp_path, parts):
    manifest, members = parts
    out = tmp_path / "w.stm"
    with pytest.raises(BundleError, match="scale"):
        write_bundle(out, {**manifest, "scale": 7}, members)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_check_onnx_accepts_the_exported_graph(parts):
    check_onnx(parts[1]["model.onnx"])


# -- property-based fuzzing -------------------------------------------------------------------------------------------
def _open_or_bundle_error(path) -> Bundle | None:
    """The property: Bundle.open, verify and member either succeed on a bundle whose members match their hashes,
    or raise BundleError. Any other exception type propagates and fails the test."""
    try:
        b = Bundle.open(path).verify()
        for name, info in b.manifest["members"].items():
            data = b.member(name)
            assert len(data) == info["size"] and hashlib.sha256(data).hexdigest() == info["sha256"]
    except BundleError:
        return None
    return b


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def structure(tiny_bundle):
    """Byte ranges of the zip's structure (local headers, central directory, end record): mutations aimed there
    reach the zip parser, where mutations of member data would only ever fail the hash check."""
    data = tiny_bundle.read_bytes()
    with zipfile.ZipFile(tiny_bundle) as zf:
        infos = zf.infolist()
        starts = [i.header_offset for i in infos]
        regions = [(s, s + 30 + len(i.filename.encode())) for s, i in zip(starts, infos)]
    regions.append((data.find(b"PK\x01\x02"), len(data)))  # central directory and end record
    return data, regions


mutation = st.one_of(
    st.tuples(st.just("flip"), st.floats(0, 1, exclude_max=True), st.integers(1, 255)),
    st.tuples(st.just("truncate"), st.floats(0, 1, exclude_max=True), st.just(0)),
    st.tuples(st.just("insert"), st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1, exclude_max=True), st.integers(1, 64)),
    st.tuples(st.just("overwrite"), st.floats(0, 1, exclude_max=True),
              st.sampled_from([b"\x00\x00\x00\x00", b"\xff\xff\xff\xff", b"\xff\xff", b"\x08\x00", b"\x0c\x00",
                               b"\x0e\x00", b"\x01\x00", b"PK\x05\x06", b"PK\x06\x06", b"PK\x01\x02"])),
)


def _mutate(data: bytes, ops, regions, where) -> bytes:
    buf = bytearray(data)
    for (kind, frac, arg), region in zip(ops, where):
        lo, hi = regions[region] if region is not None else (0, len(buf))
        lo, hi = min(lo, len(buf)), min(hi, len(buf))
        if hi <= lo:
            lo, hi = 0, len(buf)
        if not buf:
            break
        pos = min(lo + int(frac * (hi - lo)), len(buf) - 1)
        if kind == "flip":
            buf[pos] ^= arg
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = arg
        elif kind == "delete":
            del buf[pos:pos + arg]
        else:
            buf[pos:pos + len(arg)] = arg
    return bytes(buf)


@settings(max_examples=FUZZ_BYTES_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_byte_mutations_raise_only_bundle_error(structure, fuzz_dir, data):
    original, regions = structure
    ops = data.draw(st.lists(mutation, min_size=1, max_size=4))
    where = [data.draw(st.one_of(st.none(), st.integers(0, len(regions) - 1))) for _ in ops]
    p = fuzz_dir / "bytes.stm"
    p.write_bytes(_mutate(original, ops, regions, where))
    _open_or_bundle_error(p)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=FUZZ_MANIFEST_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_manifest_mutations_raise_only_bundle_error(parts, fuzz_dir, data):
    manifest, members = parts
    manifest = json.loads(json.dumps(manifest))
    for _ in range(data.draw(st.integers(1, 3))):
        paths = list(_paths(manifest))
        path = data.draw(st.sampled_from(paths))
        action = data.draw(st.sampled_from(["set", "delete", "add"]))
        if not path:  # the root itself
            manifest = data.draw(json_values) if action == "set" else manifest
            if not isinstance(manifest, (dict, list)):
                break
            continue
        parent = manifest
        for k in path[:-1]:
            parent = parent[k]
        if action == "set":
            parent[path[-1]] = data.draw(json_values)
        elif action == "delete":
            del parent[path[-1]]
        elif isinstance(parent, dict):
            parent[data.draw(st.sampled_from([*MEMBERS, "x", "members", "input", "tensorrt"]))] = data.draw(json_values)
    p = fuzz_dir / "manifest.stm"
    raw_zip(p, [("manifest.json", json.dumps(manifest).encode()), *members.items()])
    b = _open_or_bundle_error(p)
    if b is not None:
        # what passed the reader must be usable through its accessors, or fail with BundleError
        try:
            b.model_config()
        except BundleError:
            pass


@settings(max_examples=FUZZ_MEMBER_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_member_mutations_with_consistent_hashes_raise_only_bundle_error(parts, fuzz_dir, data):
    """A hostile author controls the hashes too: the checks behind them (ONNX validation, weights parsing,
    architecture fit) must hold on their own."""
    manifest, members = parts
    name = data.draw(st.sampled_from(["model.onnx", "weights.safetensors"]))
    ops = data.draw(st.lists(mutation, min_size=1, max_size=3))
    blob = members[name]
    head = (0, min(len(blob), 512))  # protobuf/safetensors headers live at the start
    where = [data.draw(st.sampled_from([None, 0])) for _ in ops]
    mutated = {**members, name: _mutate(blob, ops, [head], where)}
    p = rebuild(fuzz_dir / "member.stm", manifest, mutated, rehash=True)
    b = _open_or_bundle_error(p)
    if b is not None and name == "weights.safetensors":
        try:
            model = b.torch_model()
        except BundleError:
            return
        with torch.no_grad():
            y = model(torch.rand(1, 3, 8, 8))  # mutated weight values are still weights: the model must run
        assert y.shape == (1, 3, 16, 16)
